"""The one way this project writes files that must survive a kill: `atomic_write` for a file, `atomic_dir` for a
directory. Both write into a temporary sibling, fsync what they wrote, rename it into place (a rename on one file
system is atomic) and fsync the parent directory, so a reader sees the old version or the new one, never a mix.

    atomic_write(path, text_or_bytes)
    with atomic_dir(dest) as tmp:          # fill tmp; on success it becomes dest (the old dest is replaced)
        ...
    with atomic_dir(dest, mode="merge", last="config.json") as tmp:   # move each file into an existing dest,
        ...                                                          # `last` last (its presence = complete)

A kill leaves at most a temporary sibling (`.NAME.*.tmp`, `.save-*`, `NAME.old`); `clean_stale` removes them and
`recover_dir` puts back a directory whose replacement was interrupted between its two renames.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

MODES = ("replace", "keep", "merge")
STALE_PATTERNS = (".*.tmp", ".save-*", ".*.tmp-*")


def fsync_path(path: str | Path) -> None:
    """fsync one file or directory (directories: the entries; ignored where the OS cannot open them)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under root (before renaming it into place)."""
    root = Path(root)
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(dirpath)


def atomic_write(path: str | Path, data: str | bytes, mode: int = 0o644) -> Path:
    """Write text (UTF-8) or bytes to path: temp file in the same directory, fsync, rename, fsync the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # mkstemp makes 0600 files
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)
    return path


def replace_dir(tmp: str | Path, dest: str | Path) -> None:
    """Move a finished directory tmp onto dest: fsync tmp, then dest -> dest.old, tmp -> dest, drop dest.old.
    A kill between the two renames leaves only dest.old, which `recover_dir` puts back."""
    tmp, dest = Path(tmp), Path(dest)
    fsync_tree(tmp)
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    fsync_path(dest.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(dest: str | Path) -> bool:
    """Undo a `replace_dir` killed between its renames (only dest.old exists). Returns True when it did."""
    dest = Path(dest)
    old = dest.with_name(dest.name + ".old")
    if not dest.exists() and old.is_dir():
        os.replace(old, dest)
        return True
    return False


@contextlib.contextmanager
def atomic_dir(dest: str | Path, mode: str = "replace", last: str | None = "config.json") -> Iterator[Path]:
    """Yield a temporary directory beside (mode replace/keep) or inside (merge) dest; when the block ends without
    an exception its content becomes dest, else it is deleted and dest is untouched.

    replace: dest is replaced as a whole. keep: if dest appeared meanwhile (another process), keep that one.
    merge: dest is kept and each written file is moved into it, `last` (e.g. config.json) after the others, so a
    reader that checks for `last` never sees a half-written set."""
    if mode not in MODES:
        raise ValueError(f"atomic_dir mode must be one of {MODES}, got {mode!r}")
    dest = Path(dest)
    parent = dest if mode == "merge" else dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=".save-" if mode == "merge" else f".{dest.name}.tmp-"))
    try:
        yield tmp
        if mode == "merge":
            fsync_tree(tmp)
            for f in sorted(tmp.iterdir(), key=lambda p: p.name == last):
                if (dest / f.name).is_dir() and not f.is_dir():
                    shutil.rmtree(dest / f.name)
                os.replace(f, dest / f.name)
            fsync_path(dest)
        elif mode == "keep":
            fsync_tree(tmp)
            try:
                os.replace(tmp, dest)  # fails when another process put a (non-empty) dest there first
                fsync_path(dest.parent)
            except OSError:
                pass
        else:
            replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clean_stale(directory: str | Path) -> list[Path]:
    """Remove the temporaries a killed writer left in directory (not recursive). Returns what it removed.
    Call it only when no writer of this directory is running (at the start of a run, on rank 0)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for pattern in STALE_PATTERNS:
        for p in directory.glob(pattern):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            removed.append(p)
    return removed
