"""The one error boundary of the `llamba` command, and the base type of every expected error.

An expected error (`LlambaError`: bad input, a wrong directory, a corrupt file, a missing optional package) is
printed as one line that names the problem and the fix. Anything else is a bug: the user sees one line with the
exception and the path of a file holding the full traceback, never the traceback itself.

Kept free of torch (and of every package but click) so `llamba --help` stays fast."""

from __future__ import annotations

import datetime
import functools
import os
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from llamba.atomic import atomic_write

UNEXPECTED = "unexpected"  # first word of the message of an error that is a bug, not bad input


class LlambaError(Exception):
    """Expected failure: the message is one line naming the problem and the fix."""


class UsageError(LlambaError, ValueError):
    """A bad option or config value: the message names the option and what it accepts."""


class DataError(LlambaError, ValueError):
    """Bad `--data`: the one-line message names the file and the field."""


class ResourceError(LlambaError, MemoryError):
    """Settings this machine cannot hold: the message says what to lower."""


def one_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none)."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__


def traceback_dir() -> Path:
    """Where full tracebacks of unexpected errors go: $LLAMBA_TRACEBACKS, else $LLAMBA_CACHE/tracebacks
    (default ~/.cache/llamba/tracebacks)."""
    if os.environ.get("LLAMBA_TRACEBACKS"):
        return Path(os.environ["LLAMBA_TRACEBACKS"])
    return Path(os.environ.get("LLAMBA_CACHE", Path.home() / ".cache" / "llamba")) / "tracebacks"


def save_traceback(e: BaseException) -> Path:
    """Write the full traceback of `e` to a new file (atomically) and return its path; falls back to the system
    temporary directory when the cache is not writable."""
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%f")
    for folder in (traceback_dir(), Path(tempfile.gettempdir()) / "llamba-tracebacks"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return atomic_write(folder / f"{stamp}-{os.getpid()}.txt", text)
        except OSError:
            continue
    raise OSError("no writable directory for the traceback")


def _os_message(e: OSError) -> str:
    """`[Errno 2] No such file or directory: 'x'` -> `x: no such file or directory`."""
    name = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
    reason = (e.strerror or one_line(e)).rstrip(".")
    return f"{name}: {reason[:1].lower()}{reason[1:]}; check the path"


@contextmanager
def error_boundary() -> Iterator[None]:
    """Turn every exception of a command into a one-line click error (exit 1). click's own errors, --help
    exits and Ctrl-C pass through unchanged."""
    try:
        yield
    except (
        click.exceptions.ClickException,
        click.exceptions.Exit,
        click.exceptions.Abort,
        KeyboardInterrupt,
    ):
        raise
    except LlambaError as e:
        raise click.ClickException(one_line(e)) from None
    except OSError as e:  # a path the user gave that cannot be read or written
        if e.filename is None:
            raise click.ClickException(_unexpected(e)) from None
        raise click.ClickException(_os_message(e)) from None
    except Exception as e:  # a bug: one line here, the traceback in a file
        raise click.ClickException(_unexpected(e)) from None


def guarded(fn):
    """`fn` (a click command's callback) run inside `error_boundary`, for command groups that are also invoked on
    their own (tests, `torchrun -m llamba distill`); nested boundaries are harmless."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with error_boundary():
            return fn(*args, **kwargs)

    return wrapper


def _unexpected(e: BaseException) -> str:
    try:
        where = f"full traceback in {save_traceback(e)}"
    except OSError:
        where = "the traceback could not be saved"
    return f"{UNEXPECTED} {type(e).__name__}: {one_line(e)} ({where}; please report it)"
