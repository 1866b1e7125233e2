"""The one `llamba` command. Sub-commands live beside the code they drive and are imported lazily,
so `llamba --help` stays fast and a missing optional package only breaks the command that needs it.

This module is the only place that sees every package (llamba, distill, export, icrl)."""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute" of a click command or group.
SUBCOMMANDS: dict[str, str] = {
    "distill": "llamba.distill.cli:distill",
    "eval": "llamba.distill.cli:eval_cmd",
    "export": "llamba.export.cli:export",
    "chat": "llamba.export.cli:chat",
    "generate": "llamba.export.cli:generate",
    "icrl": "llamba.icrl.cli:icrl",
    "demo": "llamba.cli:demo",
}

HELP = {
    "distill": "MOHAWK staged distillation of a Llama teacher into Llamba.",
    "eval": "Teacher vs student perplexity, KL, agreement, per-layer errors.",
    "export": "Convert a Llamba checkpoint to an on-device format (MLX).",
    "chat": "Multi-turn streaming chat with an exported or PyTorch Llamba.",
    "generate": "One-shot generation from a prompt (scripts).",
    "icrl": "In-context RL lab: Dark Room, Key-to-Door, Algorithm Distillation.",
    "demo": "The README's main job: distill the embedded teacher, evaluate, export, chat once.",
}


class LazyGroup(click.Group):
    """A group whose sub-commands are imported on first use (click docs, 'complex applications')."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:  # a missing optional dependency: say which and how to get it
            raise click.ClickException(f"`llamba {name}` needs a package that is missing ({e}). "
                                       "Install the project with `make setup` or `pip install -e '.[teacher,mlx]'`.") from e
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(n, HELP.get(n, "")) for n in self.list_commands(ctx)])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llamba")
def main() -> None:
    """llamba: turn a pretrained Llama into a recurrent Llamba model, run it on-device, and study in-context RL.

    \b
    Typical flow:
      llamba distill all --out runs/smol          # embedded SmolLM2-135M teacher, offline
      llamba eval --model runs/smol/stage3 --teacher default
      llamba export mlx --model runs/smol/stage3 --out runs/smol/mlx --q-bits 8
      llamba chat --model runs/smol/mlx
    """


@click.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Run directory; re-running resumes and skips what is done.")
@click.option("--tokens", type=click.IntRange(min=1), default=None,
              help="Total distillation budget in tokens (default: `llamba distill all`'s, sized for ~15 min on 2 CPU cores).")
@click.option("--q-bits", type=click.Choice(["4", "8", "none"]), default="8", show_default=True,
              help="Quantization of the MLX export.")
@click.option("--prompt", default="What is the capital of France?", show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=48, show_default=True)
def demo(out: str, tokens: int | None, q_bits: str, prompt: str, max_tokens: int) -> None:
    """Distill the embedded SmolLM2-135M teacher, compare perplexities, export to MLX and answer one chat prompt.

    Runs offline. Each step is resumable: an interrupted demo continues where it stopped."""
    import platform
    import time
    from pathlib import Path

    from llamba.distill.cli import _one_line_errors, _quiet_hf

    _quiet_hf()

    @_one_line_errors
    def run() -> None:
        from llamba.distill.run import DEFAULT_TOTAL_TOKENS, distill_all
        from llamba.export.chat import ChatSession, TextStream, open_engine, require_mlx
        from llamba.export.convert import ExportError
        from llamba.generate import SamplingParams

        run_dir = Path(out)
        click.secho("1/3 distill: init -> stage 1 -> stage 2 -> stage 3 (llamba distill all)", bold=True)
        result = distill_all(out=run_dir, tokens=tokens or DEFAULT_TOTAL_TOKENS)  # exactly `llamba distill all`
        ev, init = result["eval"], result["init"]
        click.echo(f"held-out perplexity on {ev['tokens']:,} tokens: teacher {ev['teacher_ppl']:.2f} | "
                   f"student after init {init['student_ppl']:.2f} | student after distillation {ev['student_ppl']:.2f} "
                   f"(ratio {ev['ppl_ratio']:.2f}, top-1 agreement {ev['top1_agreement']:.1%})")

        # MLX on Linux runs on the CPU with reference BLAS, where fp16 is emulated (about 30x slower): keep fp32.
        dtype = "float16" if platform.system() == "Darwin" else "float32"
        backend, target = "mlx", run_dir / (f"mlx-q{q_bits}-{dtype}" if q_bits != "none" else f"mlx-{dtype}")
        click.secho(f"2/3 export: {run_dir / 'stage3'} -> {target} (llamba export mlx)", bold=True)
        try:
            require_mlx()
            if not (target / "config.json").is_file():
                from llamba.export.convert import convert

                convert(run_dir / "stage3", target, q_bits=None if q_bits == "none" else int(q_bits), dtype=dtype)
        except ExportError as e:  # no MLX here: chat with the PyTorch checkpoint instead
            click.echo(f"   skipped ({e}); chatting with the PyTorch model")
            backend, target = "torch", run_dir / "stage3"

        click.secho(f"3/3 chat ({backend}): {prompt}", bold=True)
        engine = open_engine(target, backend=backend)
        session = ChatSession(engine, SamplingParams(max_new_tokens=max_tokens, repetition_penalty=1.2))
        stream = TextStream(engine.tokenizer, session.params.stop_token_ids)
        start, n = time.perf_counter(), 0
        for tok in session.send(prompt):
            click.echo(stream.push(tok), nl=False)
            n += 1
        click.echo(f"\n({n} tokens in {time.perf_counter() - start:.1f} s, greedy with repetition penalty 1.2)")

    run()
