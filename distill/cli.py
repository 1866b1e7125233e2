"""`llamba distill stage1|stage2|stage3|all` and `llamba eval`: thin shells over distill.run and distill.evaluate."""

from __future__ import annotations

import dataclasses
import json

import click

from llamba.distill.distributed import STRATEGIES, TEACHER_STRATEGIES
from llamba.distill.init import INIT_CHOICES
from llamba.distill.options import click_options, option, pick
from llamba.distill.stages import (
    DEFAULT_BATCH,
    DEFAULT_LR,
    DEFAULT_SEQ_LEN,
    PRECISIONS,
    STAGES,
    TOKEN_SHARE,
    StageSpec,
)
from llamba.errors import guarded
from llamba.threads import configure as configure_threads


def quiet_hf() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@dataclasses.dataclass
class RunOptions:
    """What every `llamba distill` command reads (stage-only options: the stage records' option classes)."""

    teacher: str = option(
        "default", "'default' (embedded SmolLM2-135M-Instruct), a .gguf file, a HF directory or hub name."
    )
    data: str | None = option(
        None,
        "default: 'chat', conversations sampled from the teacher with its chat "
        "template (shipped for the embedded teacher, else sampled once and cached; "
        "'chat:N' for N of them); 'python-docs' for CPython's language reference; a "
        ".txt/.jsonl/.parquet file or directory; or a HF dataset name.",
    )
    text_field: str = option("text", "Field holding the text in JSONL/Parquet.")
    out: str = option(
        "runs/distill",
        "Run directory (re-run the same command to resume; another teacher, data or setting is refused).",
    )
    tokens: int | None = option(
        None,
        f"Token budget (all: the total, split over the stages by the records' token shares {TOKEN_SHARE}).",
        low=1,
    )
    seq_len: int | None = option(None, f"Sequence length (default per stage: {DEFAULT_SEQ_LEN}).", low=2)
    batch_size: int | None = option(
        None, f"Sequences per micro-batch (default per stage: {DEFAULT_BATCH}).", low=1
    )
    grad_accum: int | None = option(None, f"Micro-batches per step ({StageSpec.grad_accum}).", low=1)
    lr: float | None = option(
        None, f"Peak LR of the WSD schedule (default per stage: {DEFAULT_LR}).", low=0, low_open=True
    )
    seed: int = option(StageSpec.seed, "Seed of the student init and the batch order.")
    init: str = option("llamba", "Mixer init of the student (stage 1 start).", choices=INIT_CHOICES)
    qk_heads: int | None = option(
        None,
        "B/C head groups of the student's mixers (n_qk_heads; default: one per "
        "teacher attention head). The teacher's KV-head count (3 for SmolLM2) shares "
        "B and C like GQA shares K and V: fewer weights and a faster forward; see "
        "BENCHMARKS.md for its quality cost.",
        low=1,
    )
    precision: str = option(
        StageSpec.precision,
        "auto = bf16 on a GPU that supports it (FSDP2: bf16 params/compute, "
        "fp32 master weights and reductions; DDP / one process: bf16 autocast) and bf16 autocast on "
        "a CPU with avx512_bf16/amx_bf16 (LLAMBA_CPU_BF16=0 disables), fp32 elsewhere; fp32 turns "
        "both off.",
        choices=PRECISIONS,
    )
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    ckpt_every: float = option(120.0, "Seconds between resumable checkpoints.", low=0)
    no_progress: bool = option(False, "No progress bar.")
    strategy: str = option(
        "auto",
        "Student data parallelism under torchrun: auto = FSDP2 with >1 process, none "
        "with 1; ddp replicates (whole-model stages: the model, per-block stages: each "
        "block).",
        choices=STRATEGIES,
    )
    teacher_strategy: str = option(
        "auto",
        "Teacher under torchrun: replicate, fsdp (FSDP2 per decoder layer), or "
        "auto = fsdp only when the memory plan does not fit with a replicated "
        "teacher.",
        choices=TEACHER_STRATEGIES,
    )
    activation_checkpointing: bool = option(False, "Recompute each block's activations in backward.")
    threads: int | None = option(
        None,
        "Torch threads per process (default: auto = the cores other processes leave "
        "free, re-checked every 5 s while training, so a busy machine slows a stage "
        "down instead of stalling it at OpenMP barriers).",
        low=1,
    )
    stream: bool = option(
        False,
        "Read --data lazily (JSONL/Parquet files, a directory of them, or a HF dataset in "
        "streaming mode), tokenize and pack on the fly; the data position is checkpointed "
        "and resumes exactly.",
    )
    stream_shards: int = option(
        StageSpec.stream_shards,
        "Virtual shards of the stream: each rank reads its own; the number of processes must divide it.",
        low=1,
    )

    SPEC_FIELDS = (
        "seq_len",
        "batch_size",
        "grad_accum",
        "lr",
        "seed",
        "precision",
        "stream",
        "stream_shards",
    )

    def run_kwargs(self, *stage_options) -> dict:
        """Keyword arguments of distill.run.distill_stage / distill_all (less the command's own)."""
        spec = {k: getattr(self, k) for k in self.SPEC_FIELDS if getattr(self, k) is not None}
        for opts in stage_options:
            spec.update(dataclasses.asdict(opts))
        return dict(
            teacher=self.teacher,
            out=self.out,
            data=self.data,
            init=self.init,
            qk_heads=self.qk_heads,
            device=self.device,
            text_field=self.text_field,
            progress=not self.no_progress,
            ckpt_every_s=self.ckpt_every,
            strategy=self.strategy,
            teacher_strategy=self.teacher_strategy,
            activation_checkpointing=self.activation_checkpointing,
            **spec,
        )


def _is_main_process() -> bool:
    """Under torchrun only rank 0 prints."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _print_eval(ev: dict, title: str = "held-out evaluation") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{title} ({ev['tokens']} tokens)")
    for col in ("teacher ppl", "student ppl", "ratio", "KL(t||s)", "top-1 agree"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{ev['teacher_ppl']:.2f}",
        f"{ev['student_ppl']:.2f}",
        f"{ev['ppl_ratio']:.3f}",
        f"{ev['kl']:.4f}",
        f"{ev['top1_agreement']:.3f}",
    )
    console = Console()
    chat = ev.get("chat")
    if chat and "skipped" not in chat:
        print_chat_report(chat, console)
    console.print(table)
    if "layer_rel_err" in ev:
        errs = " ".join(f"{e:.3f}" for e in ev["layer_rel_err"])
        console.print(f"per-layer relative hidden-state error (teacher-forced): {errs}")
    errs = " ".join(f"{e:.3f}" for e in ev["stream_rel_err"])
    console.print(f"per-layer relative hidden-state error (free-running):   {errs}")


def print_chat_report(chat: dict, console=None, examples: bool = True, tables: bool = True) -> None:
    """The chat report (distill/chat_eval.py) as a table, then a few answers side by side."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="chat report (prompts never seen in training; greedy)")
    for col in ("check", "teacher", "student", "student / teacher"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{chat['fact_questions']} factual questions right",
        str(chat["teacher_facts_right"]),
        f"{chat['student_facts_right']} ({chat['student_right_of_teacher_right']} of the teacher's)",
        f"{chat['fact_retained']:.0%} kept",
    )
    table.add_row(
        f"perplexity, teacher's answers ({chat['chat_tokens']} tokens)",
        f"{chat['chat_teacher_ppl']:.2f}",
        f"{chat['chat_student_ppl']:.2f}",
        f"{chat['chat_ppl_ratio']:.2f}",
    )
    table.add_row(
        f"perplexity, general prose ({chat['prose_tokens']} tokens)",
        f"{chat['prose_teacher_ppl']:.2f}",
        f"{chat['prose_student_ppl']:.2f}",
        f"{chat['prose_ppl_ratio']:.2f}",
    )
    table.add_row(
        f"answers ending within {chat['open_max_new_tokens']} tokens",
        "",
        f"{chat['eos_rate']:.0%} of {chat['open_prompts']}",
        f"{chat['empty_answers']} empty",
    )
    if tables:
        console.print(table)
    if examples:
        for ex in chat.get("show", []):
            console.print(f"[bold]> {ex['prompt']}[/bold]", highlight=False)
            console.print(f"  teacher: {_clip(ex['teacher'])}", highlight=False, markup=False)
            console.print(f"  student: {_clip(ex['student'])}", highlight=False, markup=False)


def _clip(text: str, n: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def distill() -> None:
    """MOHAWK staged distillation of a Llama teacher into a Llamba student.

    \b
    stage1  matrix orientation: student mixing matrix -> teacher attention maps, per layer
    stage2  hidden-state alignment: student block on hidden_states[i] -> hidden_states[i+1]
    stage3  end-to-end knowledge distillation (soft-label CE at temperature T)
    all     init + the three stages + held-out teacher vs student perplexity
    """


def _make_stage_command(stage: int):
    record = STAGES[stage]

    @click_options(RunOptions, record.options)
    @click.option(
        "--init-from",
        type=click.Path(exists=True, file_okay=False),
        default=None,
        help="Start from this Llamba checkpoint instead of the run's previous stage / init.",
    )
    @guarded
    def command(init_from, **o):
        quiet_hf()
        from llamba.distill.run import distill_stage

        run = pick(RunOptions, o)
        configure_threads(run.threads)
        summary = distill_stage(
            stage, tokens=run.tokens, init_from=init_from, **run.run_kwargs(pick(record.options, o))
        )
        if not _is_main_process() or summary.get("already_done"):  # distill_stage said so in one line
            return
        click.echo(
            f"stage {stage}: {summary['tokens']} tokens, loss {summary['final_loss']:.4f}, "
            f"{summary['tok_s']:.0f} tok/s -> {run.out}/stage{stage}"
        )

    command.__doc__ = f"Stage {stage}: {record.name}."
    return click.command(name=f"stage{stage}")(command)


for _k in STAGES:
    distill.add_command(_make_stage_command(_k))


@distill.command(name="all")
@click_options(RunOptions, *(s.options for s in STAGES.values()))
@click.option(
    "--eval-tokens",
    type=click.IntRange(min=2),
    default=2048,
    show_default=True,
    help="Held-out tokens for the final teacher vs student comparison.",
)
@guarded
def all_cmd(eval_tokens, **o):
    """Init, every stage in order and the held-out evaluation, resumable (the README's main job)."""
    quiet_hf()
    from llamba.distill.run import DEFAULT_TOTAL_TOKENS, distill_all

    run = pick(RunOptions, o)
    configure_threads(run.threads)
    result = distill_all(
        tokens=run.tokens or DEFAULT_TOTAL_TOKENS,
        eval_tokens=eval_tokens,
        **run.run_kwargs(*(pick(s.options, o) for s in STAGES.values())),
    )
    if not _is_main_process():
        return
    init = result["init"]
    if result.get("already_done"):
        click.echo(
            f"this run had already finished: the results saved in {run.out} (use a new --out to train again)"
        )
    click.echo(
        f"after init ({run.init}): student ppl {init['student_ppl']:.2f} vs teacher {init['teacher_ppl']:.2f}"
    )
    for k, s in result["stages"].items():
        was = " (finished before)" if s.get("already_done") else ""
        click.echo(
            f"stage {k}: {s['tokens']} tokens, loss {s['final_loss']:.4f}, {s['tok_s']:.0f} tok/s{was}"
        )
    _print_eval(result["eval"])


@distill.command(name="chat-data")
@click.option("--teacher", default="default", show_default=True, help="As in `llamba distill`.")
@click.option(
    "--n",
    "n",
    type=click.IntRange(min=2),
    default=None,
    help="Conversations to sample (default: what `--data chat` uses).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=48,
    show_default=True,
    help="Conversations sampled together (one KV cache).",
)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--ship",
    is_flag=True,
    help="Also copy the files into the package's distill/chat/ (how the shipped "
    "files for the embedded teacher are made).",
)
@guarded
def chat_data_cmd(teacher, n, batch_size, device, ship):
    """Sample the chat corpus and the chat report's teacher answers now (else the first `distill` or `eval`
    does it): the teacher answers the prompt set through its chat template, one generator per conversation.
    Resumable; files land in the cache (LLAMBA_CACHE, default ~/.cache/llamba/data) keyed by the teacher's weights
    and the settings, so a file sampled on a GPU box is found on a CPU one."""
    quiet_hf()
    from dataclasses import replace

    import torch

    from llamba.atomic import atomic_write
    from llamba.distill import chat_prompts
    from llamba.distill.chat_data import (
        SHIPPED_DIR,
        ChatSettings,
        corpus_path,
        teacher_chat,
        teacher_fingerprint,
    )
    from llamba.distill.chat_eval import FACT_SETTINGS, OPEN_SETTINGS
    from llamba.distill.teacher import get_teacher, resolve_device

    dev = resolve_device(device)
    t = get_teacher(teacher, dev, torch.float32)
    fp = teacher_fingerprint(t.model)
    for settings in (
        ChatSettings(n=n or ChatSettings().n),
        replace(FACT_SETTINGS, n=len(chat_prompts.FACT_EVAL)),
        replace(OPEN_SETTINGS, n=len(chat_prompts.OPEN_EVAL)),
    ):
        records = teacher_chat(t.model, t.tokenizer, settings, batch_size=batch_size, log=click.echo)
        ended = sum(r["ended"] for r in records)
        path = corpus_path(fp, settings)
        click.echo(f"{settings.prompt_set}: {len(records)} conversations ({ended} ended with EOS) in {path}")
        if ship and path.is_file():
            dest = atomic_write(SHIPPED_DIR / path.name, "".join(json.dumps(r) + "\n" for r in records))
            click.echo(f"  shipped as {dest}")


@click.command(name="eval")
@click.option(
    "--model", required=True, type=click.Path(), help="Llamba checkpoint directory (e.g. RUN/stage3)."
)
@click.option("--teacher", default="default", show_default=True)
@click.option("--data", default=None, help="As in `llamba distill` (its held-out split is used).")
@click.option("--text-field", default="text", show_default=True)
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=2), default=2048, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--stream", is_flag=True, help="Evaluate on the held-out documents of a `distill --stream` run."
)
@click.option(
    "--chat/--no-chat",
    default=True,
    show_default=True,
    help="Also the generation-based chat report on prompts that never enter training: factual answers "
    "kept, chat and general-prose perplexity ratios, answers that end (needs a chat template).",
)
@click.option(
    "--long/--no-long",
    "long_ctx",
    default=False,
    show_default=True,
    help="Also the long-context report (distill/long_eval.py): passkey and needle retrieval at "
    "--long-lengths, hidden at 10/50/90% depth, teacher and student greedy through the chat "
    "template; perplexity by position bucket on long held-out text. Minutes per length on a CPU.",
)
@click.option(
    "--long-lengths",
    default="512,1k,2k,4k,8k",
    show_default=True,
    help="Lengths (prompt + answer tokens) for --long, comma-separated, k = 1024; at most the teacher's "
    "max_position_embeddings.",
)
@click.option(
    "--long-seeds",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Passkey prompts per length and depth.",
)
@click.option(
    "--long-needle-seeds",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Needle-question prompts per length and depth (0: none).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@guarded
def eval_cmd(
    model,
    teacher,
    data,
    text_field,
    seq_len,
    max_tokens,
    batch_size,
    device,
    stream,
    chat,
    long_ctx,
    long_lengths,
    long_seeds,
    long_needle_seeds,
    as_json,
):
    """Teacher vs student: the chat report (what the student generates, beside the teacher), perplexity on the
    data's held-out split, mean KL, top-1 agreement, per-layer hidden-state error; with --long, the long-context
    report."""
    quiet_hf()
    from pathlib import Path

    from llamba.distill.evaluate import evaluate

    stage = Path(model)
    if (stage / "spec.json").is_file() and not (stage / "DONE.json").is_file():
        click.echo(
            f"warning: {stage} has no DONE.json: its stage did not finish, so these weights may be from "
            "an interrupted run; re-run the distill command to finish it",
            err=True,
        )
    # load both once (student first: a wrong --model fails before the teacher loads) and check lengths
    if long_ctx:
        from llamba.checkpoints import load_model
        from llamba.distill.long_eval import check_lengths, parse_lengths
        from llamba.distill.teacher import get_teacher, resolve_device

        lengths = parse_lengths(long_lengths)
        model = load_model(model, device=resolve_device(device))
        teacher = get_teacher(teacher, model.device)
        check_lengths(lengths, teacher.model.config)
    ev = evaluate(
        model,
        teacher=teacher,
        data=data,
        seq_len=seq_len,
        max_tokens=max_tokens,
        batch_size=batch_size,
        device=device,
        text_field=text_field,
        stream=stream,
        chat=chat,
    )
    if long_ctx:
        from llamba.distill.long_eval import long_report

        ev["long"] = long_report(
            model,
            teacher.model,
            teacher.tokenizer,
            lengths,
            seeds=long_seeds,
            needle_seeds=long_needle_seeds,
            log=lambda m: click.echo(m, err=True),
        )
    if as_json:
        click.echo(json.dumps(ev, indent=1))
    else:
        _print_eval(ev)
        if long_ctx:
            print_long_report(ev["long"])


def print_long_report(report: dict) -> None:
    """The long-context report (distill/long_eval.py): retrieval by length x depth, then perplexity by position."""
    from rich.console import Console
    from rich.table import Table

    from llamba.distill.long_eval import tables

    console = Console()
    if "skipped" in report:
        console.print(f"long context: {report['skipped']}")
    for title, header, rows in tables(report):
        table = Table(title=title)
        for col in header:
            table.add_column(col, justify="right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
