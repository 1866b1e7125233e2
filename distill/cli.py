"""`llamba distill stage1|stage2|stage3|all` and `llamba eval`: thin shells over distill.run and distill.evaluate."""

from __future__ import annotations

import dataclasses
import json

import click

from llamba.distill.config import DEFAULT_TOTAL_TOKENS, DistillConfig
from llamba.distill.evaluate import EvalOptions
from llamba.distill.options import click_options, pick
from llamba.distill.stages import STAGES
from llamba.errors import guarded
from llamba.threads import configure as configure_threads


def quiet_hf() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


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


def config_of(values: dict, *stage_options) -> DistillConfig:
    """The run's config from a command's keyword arguments: DistillConfig's own fields, and the stage option
    classes' fields (StageSpec fields only those stages read) as spec overrides for every stage."""
    cfg = pick(DistillConfig, values)
    for options in stage_options:
        cfg.spec_overrides.update(dataclasses.asdict(pick(options, values)))
    return cfg


def _make_stage_command(stage: int):
    record = STAGES[stage]

    @click_options(DistillConfig, record.options)
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

        cfg = config_of(o, record.options)
        cfg.init_from = init_from
        configure_threads(cfg.threads)
        summary = distill_stage(stage, cfg)
        if not _is_main_process() or summary.get("already_done"):  # distill_stage said so in one line
            return
        click.echo(
            f"stage {stage}: {summary['tokens']} tokens, loss {summary['final_loss']:.4f}, "
            f"{summary['tok_s']:.0f} tok/s -> {cfg.out}/stage{stage}"
        )

    command.__doc__ = f"Stage {stage}: {record.name}."
    return click.command(name=f"stage{stage}")(command)


for _k in STAGES:
    distill.add_command(_make_stage_command(_k))


@distill.command(name="all")
@click_options(DistillConfig, *(s.options for s in STAGES.values()))
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
    from llamba.distill.run import distill_all

    run = config_of(o, *(s.options for s in STAGES.values()))
    run.tokens, run.eval_tokens = run.tokens or DEFAULT_TOTAL_TOKENS, eval_tokens
    configure_threads(run.threads)
    result = distill_all(run)
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
@click_options(EvalOptions)
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
def eval_cmd(model, teacher, long_ctx, long_lengths, long_seeds, long_needle_seeds, as_json, **o):
    """Teacher vs student: the chat report (what the student generates, beside the teacher), perplexity on the
    data's held-out split, mean KL, top-1 agreement, per-layer hidden-state error; with --long, the long-context
    report."""
    quiet_hf()
    from pathlib import Path

    from llamba.distill.evaluate import evaluate

    opts = EvalOptions(**o)
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
        from llamba.distill.long_eval import LongSettings, check_lengths, parse_lengths
        from llamba.distill.teacher import get_teacher, resolve_device

        settings = LongSettings(parse_lengths(long_lengths), seeds=long_seeds, needle_seeds=long_needle_seeds)
        model = load_model(model, device=resolve_device(opts.device))
        teacher = get_teacher(teacher, model.device)
        check_lengths(settings.lengths, teacher.model.config)
    ev = evaluate(model, teacher, opts)
    if long_ctx:
        from llamba.distill.long_eval import long_report

        ev["long"] = long_report(
            model, teacher.model, teacher.tokenizer, settings, log=lambda m: click.echo(m, err=True)
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
