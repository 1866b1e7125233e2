"""The run directory of ``llamba icrl run``: what makes a grid resumable and keeps configs from mixing.

- ``spec.json``: the resolved config of the run. A re-run into the same directory with another config is
  refused with a one-line message naming the first field that differs.
- ``runs.jsonl``: one JSON line per finished run, appended with a single write and fsynced. A torn last line
  (the process was killed mid-write) is dropped and cut off on the next open, so a resumed grid redoes at
  most the run that was being written.
- Tables and plots are written through ``llamba.atomic.atomic_write`` (temp file + fsync + rename).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llamba.atomic import atomic_write


def first_difference(a, b, prefix: str = "") -> str | None:
    """Dotted path of the first leaf where two JSON values differ, or None when equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{prefix}{k}"
            d = first_difference(a[k], b[k], f"{prefix}{k}.")
            if d is not None:
                return d
        return None
    return None if a == b else prefix.rstrip(".") or "(top level)"


class RunStore:
    def __init__(self, out: str | Path, spec: dict):
        """Open (or create) run directory ``out`` for config ``spec`` (a JSON-able dict); raises ValueError
        with a one-line message when ``out`` holds a run of another config."""
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is a file; pass a directory")
        self.out.mkdir(parents=True, exist_ok=True)
        spec = json.loads(json.dumps(spec, default=str))  # normalise tuples / numbers as JSON sees them
        path = self.out / "spec.json"
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                old = None
            if old is None:  # torn write of spec.json itself: nothing was recorded under it yet
                if (self.out / "runs.jsonl").exists() and (self.out / "runs.jsonl").stat().st_size:
                    raise ValueError(f"{path} is unreadable; delete {self.out} to start over")
            elif old != spec:
                field = first_difference(old, spec)
                raise ValueError(
                    f"{self.out} holds a run of another config ({field} differs: {_short(old, field)} there, "
                    f"{_short(spec, field)} now); use a new --out or delete {self.out}"
                )
        if not path.exists() or old is None:
            atomic_write(path, json.dumps(spec, indent=1))
        self.runs_path = self.out / "runs.jsonl"

    def load(self, repair: bool = True) -> dict[tuple, dict]:
        """Finished runs: key tuple -> record. Drops a torn last line and, with ``repair`` (the process that
        owns the run), cuts it off the file; readers of a grid that is still running pass repair=False."""
        if not self.runs_path.exists():
            return {}
        raw = self.runs_path.read_bytes()
        done, good = {}, 0
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            done[tuple(rec["key"])] = rec
            good += len(line)
        if repair and good < len(raw):
            with open(self.runs_path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        return done

    def append(self, record: dict) -> None:
        """One finished run, as one line in one write, fsynced before returning."""
        line = (json.dumps(record, default=float) + "\n").encode()
        fd = os.open(self.runs_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def _short(spec: dict, field: str):
    v = spec
    for part in field.split("."):
        if not isinstance(v, dict) or part not in v:
            return "absent"
        v = v[part]
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."
