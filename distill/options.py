"""Command-line options as dataclasses: `DistillConfig` (distill/config.py) for what every distill command reads, one per stage for
what only that stage reads (registered in stages.STAGES). `click_options` turns their fields into click options,
so each command's --help lists only what it uses, and every default lives in one place (the field).

    @dataclass
    class Stage3Options:
        temperature: float = option(1.0, "Stage 3 KD temperature.", low=0, low_open=True)
"""

from __future__ import annotations

import dataclasses
from typing import Any


def option(
    default: Any,
    help: str,
    low: float | None = None,
    low_open: bool = False,
    choices: tuple[str, ...] | None = None,
    show_default: bool = True,
    param: str | None = None,
):
    """A dataclass field that is also a command-line option: `--name-with-dashes` (or `param`); type from the
    default (bool -> flag); `low` / `low_open` a range; `choices` a fixed set."""
    meta = {
        "help": help,
        "low": low,
        "low_open": low_open,
        "choices": choices,
        "show_default": show_default,
        "param": param,
    }
    return dataclasses.field(default=default, metadata={"cli": meta})


def _kind(f: dataclasses.Field) -> type:
    """bool / float / int / str from the field's annotation ("float | None" -> float)."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return next((kind for kind in (bool, float, int) if text.startswith(kind.__name__)), str)


def click_option(f: dataclasses.Field):
    """The click option of one field."""
    import click

    meta = f.metadata["cli"]
    kind = _kind(f)
    decls = [meta["param"] or "--" + f.name.replace("_", "-"), f.name]
    if kind is bool:
        if f.default:  # on by default: the flag's --no- form turns it off
            return click.option(
                f"{decls[0]}/--no-{decls[0][2:]}", f.name, default=True, show_default=True, help=meta["help"]
            )
        return click.option(*decls, is_flag=True, default=False, help=meta["help"])
    if meta["choices"]:
        ptype = click.Choice(list(meta["choices"]))
    elif kind is float:
        ptype = (
            click.FloatRange(min=meta["low"], min_open=meta["low_open"]) if meta["low"] is not None else float
        )
    elif kind is int:
        ptype = click.IntRange(min=meta["low"]) if meta["low"] is not None else int
    else:
        ptype = str
    shown = meta["show_default"] and f.default is not None
    return click.option(*decls, type=ptype, default=f.default, show_default=shown, help=meta["help"])


def cli_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "cli" in f.metadata]


def click_options(*classes):
    """Decorator: the options of every field of each dataclass, in declaration order."""

    def decorate(fn):
        for cls in reversed(classes):
            for f in reversed(cli_fields(cls)):
                fn = click_option(f)(fn)
        return fn

    return decorate


def pick(cls, values: dict):
    """An instance of cls from a command's keyword arguments (its own fields only)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})
