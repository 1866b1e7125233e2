"""`llamba demo`: the README's main job in one command (distill the embedded teacher, evaluate, export to MLX,
answer one chat prompt), each step resumable. The top-level CLI dispatches here (llamba/cli.py)."""

from __future__ import annotations

import click


@click.command()
@click.option(
    "--out",
    default="runs/demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Run directory; re-running resumes and skips what is done.",
)
@click.option(
    "--tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Total distillation budget in tokens (default: `llamba distill all`'s, sized for <= 20 min on 2 idle CPU cores).",
)
@click.option(
    "--q-bits",
    type=click.Choice(["4", "8", "none"]),
    default="8",
    show_default=True,
    help="Quantization of the MLX export.",
)
@click.option(
    "--prompt",
    default="What is the capital of France?",
    show_default=True,
    help="The chat prompt answered at the end.",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Most tokens in that answer.",
)
def demo(out: str, tokens: int | None, q_bits: str, prompt: str, max_tokens: int) -> None:
    """Distill the embedded SmolLM2-135M teacher on its own chat answers, report how the student answers beside
    the teacher (prompts never seen in training), export to MLX and answer one chat prompt.

    Runs offline. Each step is resumable: an interrupted demo continues where it stopped."""
    import platform
    import time
    from pathlib import Path

    from llamba.distill.cli import print_chat_report, quiet_hf
    from llamba.errors import guarded

    quiet_hf()

    @guarded
    def run() -> None:
        from llamba.chat import ChatSession, TextStream
        from llamba.distill.config import DEFAULT_TOTAL_TOKENS, DistillConfig
        from llamba.distill.run import distill_all
        from llamba.export.chat import open_engine, require_mlx
        from llamba.export.convert import ExportError, export_complete
        from llamba.generate import SamplingParams

        run_dir = Path(out)
        click.secho("1/3 distill: init -> stage 1 -> stage 2 -> stage 3 (llamba distill all)", bold=True)
        # exactly `llamba distill all --out RUN_DIR --tokens TOKENS`
        result = distill_all(DistillConfig(out=str(run_dir), tokens=tokens or DEFAULT_TOTAL_TOKENS))
        ev, init = result["eval"], result["init"]
        chat = ev.get("chat") or {}
        if "fact_retained" in chat:
            print_chat_report(chat, examples=False)
        click.echo(
            f"held-out rows of the training conversations ({ev['tokens']:,} tokens): perplexity teacher "
            f"{ev['teacher_ppl']:.2f} | student after init {init['student_ppl']:.2f} | after distillation "
            f"{ev['student_ppl']:.2f} (ratio {ev['ppl_ratio']:.2f}, top-1 agreement {ev['top1_agreement']:.1%})"
        )

        # MLX on Linux runs on the CPU with reference BLAS, where fp16 is emulated (about 30x slower): keep fp32.
        dtype = "float16" if platform.system() == "Darwin" else "float32"
        backend, target = "mlx", run_dir / (f"mlx-q{q_bits}-{dtype}" if q_bits != "none" else f"mlx-{dtype}")
        click.secho(f"2/3 export: {run_dir / 'stage3'} -> {target} (llamba export mlx)", bold=True)
        try:
            require_mlx()
            if not export_complete(target):  # exports are atomic: a killed one left no `target`
                from llamba.export.convert import convert

                convert(
                    run_dir / "stage3", target, q_bits=None if q_bits == "none" else int(q_bits), dtype=dtype
                )
        except ExportError as e:  # no MLX here: chat with the PyTorch checkpoint instead
            click.echo(f"   skipped ({e}); chatting with the PyTorch model")
            backend, target = "torch", run_dir / "stage3"

        click.secho(f"3/3 chat ({backend}): {prompt}", bold=True)
        engine = open_engine(target, backend=backend)
        session = ChatSession(engine, SamplingParams(max_new_tokens=max_tokens))
        stream = TextStream(engine.tokenizer, session.params.stop_token_ids)
        start, n = time.perf_counter(), 0
        for tok in session.send(prompt):
            click.echo(stream.push(tok), nl=False)
            n += 1
        click.echo(f"\n({n} tokens in {time.perf_counter() - start:.1f} s, greedy)")
        if chat.get("show"):
            click.secho(
                "teacher and student, side by side (prompts never seen in training, greedy):", bold=True
            )
            print_chat_report(chat, tables=False)

    run()
