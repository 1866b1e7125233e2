"""The one `llamba` command. Sub-commands live beside the code they drive and are imported lazily,
so `llamba --help` stays fast and a missing optional package only breaks the command that needs it.

This module is the only place that sees every package (llamba, distill, export, icrl)."""

from __future__ import annotations

import importlib

import click

from llamba.errors import error_boundary

# name -> "module:attribute" of a click command or group.
SUBCOMMANDS: dict[str, str] = {
    "distill": "llamba.distill.cli:distill",
    "eval": "llamba.distill.cli:eval_cmd",
    "export": "llamba.export.cli:export",
    "chat": "llamba.export.cli:chat",
    "generate": "llamba.export.cli:generate",
    "icrl": "llamba.icrl.cli:icrl",
    "demo": "llamba.demo:demo",
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
            raise click.ClickException(
                f"`llamba {name}` needs a package that is missing ({e}). "
                "Install the project with `make setup` or `pip install -e '.[teacher,mlx]'`."
            ) from e
        return getattr(module, attr)

    def invoke(self, ctx: click.Context):
        from llamba.allocator import keep_freed_memory

        keep_freed_memory()  # before any large allocation: no page-fault churn per training step (allocator.py)
        with error_boundary():  # every sub-command: one line per error, never a traceback
            return super().invoke(ctx)

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
