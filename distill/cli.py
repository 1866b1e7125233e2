"""`llamba distill stage1|stage2|stage3|all` and `llamba eval`: thin shells over distill.run and distill.evaluate."""

from __future__ import annotations

import functools
import json

import click

from llamba.distill.distributed import STRATEGIES, TEACHER_STRATEGIES
from llamba.distill.stages import DEFAULT_EPOCHS, DEFAULT_LR, DEFAULT_SEQ_LEN

ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, OSError)


def _quiet_hf() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _one_line_errors(fn):
    """Bad input -> one-line click error, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from llamba.distill.run import Interrupted

        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except Interrupted as e:
            raise click.ClickException(str(e)) from None
        except ERRORS as e:
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    return wrapper


def common_options(fn):
    options = [
        click.option(
            "--teacher",
            default="default",
            show_default=True,
            help="'default' (embedded SmolLM2-135M-Instruct), a .gguf file, a HF directory or hub name.",
        ),
        click.option(
            "--data",
            default=None,
            help="default: CPython's language reference (offline); 'teacher[:N]' for "
            "teacher samples; a .txt/.jsonl/.parquet file or directory; or a HF dataset name.",
        ),
        click.option(
            "--text-field", default="text", show_default=True, help="Field holding the text in JSONL/Parquet."
        ),
        click.option(
            "--out",
            "out",
            default="runs/distill",
            show_default=True,
            type=click.Path(file_okay=False),
            help="Run directory (re-run the same command to resume).",
        ),
        click.option(
            "--tokens",
            type=click.IntRange(min=1),
            default=None,
            help="Token budget (all: the total, split 3.75/33.75/62.5% over the stages).",
        ),
        click.option(
            "--seq-len",
            type=click.IntRange(min=2),
            default=None,
            help=f"Sequence length (default per stage: {DEFAULT_SEQ_LEN}).",
        ),
        click.option(
            "--batch-size", type=click.IntRange(min=1), default=None, help="Sequences per micro-batch (4)."
        ),
        click.option(
            "--grad-accum", type=click.IntRange(min=1), default=None, help="Micro-batches per step (1)."
        ),
        click.option(
            "--lr",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            help=f"Peak LR of the WSD schedule (default per stage: {DEFAULT_LR}).",
        ),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option(
            "--init",
            type=click.Choice(["llamba", "attention"]),
            default="llamba",
            show_default=True,
            help="Mixer init of the student (stage 1 start).",
        ),
        click.option(
            "--precision",
            type=click.Choice(["auto", "bf16", "fp32"]),
            default="auto",
            show_default=True,
            help="auto = bf16 on a GPU that supports it (FSDP2: bf16 params/compute, fp32 master weights and "
            "reductions; DDP / one process: bf16 autocast) and bf16 autocast on a CPU with avx512_bf16/amx_bf16 "
            "(LLAMBA_CPU_BF16=0 disables), fp32 elsewhere; fp32 turns both off.",
        ),
        click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N"),
        click.option(
            "--temperature",
            type=click.FloatRange(min=0, min_open=True),
            default=1.0,
            show_default=True,
            help="Stage 3 KD temperature.",
        ),
        click.option(
            "--hard-weight",
            type=click.FloatRange(min=0),
            default=0.0,
            show_default=True,
            help="Stage 3 weight of the hard-label CE.",
        ),
        click.option("--freeze-mlp", is_flag=True, help="Stage 3: freeze MLPs (MOHAWK/Phi-Mamba variant)."),
        click.option(
            "--mixer-only", is_flag=True, help="Stage 2: align the mixer output to the attention output."
        ),
        click.option(
            "--epochs",
            type=click.IntRange(min=1),
            default=None,
            help=f"Stage 2: passes over tokens/epochs distinct tokens, the teacher's states cached in memory "
            f"(default per stage: {DEFAULT_EPOCHS}).",
        ),
        click.option(
            "--ckpt-every",
            type=click.FloatRange(min=0),
            default=120.0,
            show_default=True,
            help="Seconds between resumable checkpoints.",
        ),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
        click.option(
            "--strategy",
            type=click.Choice(STRATEGIES),
            default="auto",
            show_default=True,
            help="Student data parallelism under torchrun: auto = FSDP2 with >1 process, none with 1; ddp "
            "replicates (stage 3: the model, stages 1-2: each block).",
        ),
        click.option(
            "--teacher-strategy",
            type=click.Choice(TEACHER_STRATEGIES),
            default="auto",
            show_default=True,
            help="Teacher under torchrun: replicate, fsdp (FSDP2 per decoder layer), or auto = fsdp only when the "
            "memory plan does not fit with a replicated teacher.",
        ),
        click.option(
            "--activation-checkpointing", is_flag=True, help="Recompute each block's activations in backward."
        ),
        click.option(
            "--stream",
            is_flag=True,
            help="Read --data lazily (JSONL/Parquet files, a directory of them, or a HF dataset in streaming mode), "
            "tokenize and pack on the fly; the data position is checkpointed and resumes exactly.",
        ),
        click.option(
            "--stream-shards",
            type=click.IntRange(min=1),
            default=8,
            show_default=True,
            help="Virtual shards of the stream: each rank reads its own; the number of processes must divide it.",
        ),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _is_main_process() -> bool:
    """Under torchrun only rank 0 prints."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _run_kwargs(o: dict) -> dict:
    """The options every `distill` command passes to distill.run the same way."""
    return dict(
        teacher=o["teacher"],
        out=o["out"],
        data=o["data"],
        init=o["init"],
        device=o["device"],
        text_field=o["text_field"],
        progress=not o["no_progress"],
        ckpt_every_s=o["ckpt_every"],
        strategy=o["strategy"],
        teacher_strategy=o["teacher_strategy"],
        activation_checkpointing=o["activation_checkpointing"],
        **_spec_kwargs(o),
    )


def _spec_kwargs(o: dict) -> dict:
    keys = (
        "seq_len",
        "batch_size",
        "grad_accum",
        "lr",
        "seed",
        "precision",
        "temperature",
        "hard_weight",
        "freeze_mlp",
        "mixer_only",
        "epochs",
        "stream",
        "stream_shards",
    )
    return {k: o[k] for k in keys if o.get(k) is not None}


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
    console.print(table)
    if "layer_rel_err" in ev:
        errs = " ".join(f"{e:.3f}" for e in ev["layer_rel_err"])
        console.print(f"per-layer relative hidden-state error (teacher-forced): {errs}")
    errs = " ".join(f"{e:.3f}" for e in ev["stream_rel_err"])
    console.print(f"per-layer relative hidden-state error (free-running):   {errs}")


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
    @common_options
    @click.option(
        "--init-from",
        type=click.Path(exists=True, file_okay=False),
        default=None,
        help="Start from this Llamba checkpoint instead of the run's previous stage / init.",
    )
    @_one_line_errors
    def command(**o):
        _quiet_hf()
        from llamba.distill.run import distill_stage

        summary = distill_stage(
            stage,
            tokens=o["tokens"],
            init_from=o["init_from"],
            **_run_kwargs(o),
        )
        if not _is_main_process():
            return
        click.echo(
            f"stage {stage}: {summary['tokens']} tokens, loss {summary['final_loss']:.4f}, "
            f"{summary['tok_s']:.0f} tok/s -> {o['out']}/stage{stage}"
        )

    command.__doc__ = {
        1: "Stage 1: matrix orientation.",
        2: "Stage 2: hidden-state alignment.",
        3: "Stage 3: end-to-end knowledge distillation.",
    }[stage]
    return click.command(name=f"stage{stage}")(command)


for _k in (1, 2, 3):
    distill.add_command(_make_stage_command(_k))


@distill.command(name="all")
@common_options
@click.option(
    "--eval-tokens",
    type=click.IntRange(min=2),
    default=2048,
    show_default=True,
    help="Held-out tokens for the final teacher vs student comparison.",
)
@_one_line_errors
def all_cmd(**o):
    """Init, stages 1-3 and the held-out evaluation, resumable (the README's main job)."""
    _quiet_hf()
    from llamba.distill.run import DEFAULT_TOTAL_TOKENS, distill_all

    result = distill_all(
        tokens=o["tokens"] or DEFAULT_TOTAL_TOKENS,
        eval_tokens=o["eval_tokens"],
        **_run_kwargs(o),
    )
    if not _is_main_process():
        return
    init = result["init"]
    click.echo(
        f"after init ({o['init']}): student ppl {init['student_ppl']:.2f} vs teacher {init['teacher_ppl']:.2f}"
    )
    for k, s in result["stages"].items():
        click.echo(f"stage {k}: {s['tokens']} tokens, loss {s['final_loss']:.4f}, {s['tok_s']:.0f} tok/s")
    _print_eval(result["eval"])


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
@click.option("--stream", is_flag=True, help="Evaluate on the held-out documents of a `distill --stream` run.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@_one_line_errors
def eval_cmd(model, teacher, data, text_field, seq_len, max_tokens, batch_size, device, stream, as_json):
    """Teacher vs student: perplexity, mean KL, top-1 agreement, per-layer hidden-state error."""
    _quiet_hf()
    from llamba.distill.evaluate import evaluate

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
    )
    if as_json:
        click.echo(json.dumps(ev, indent=1))
    else:
        _print_eval(ev)
