"""Shared by the benchmark scripts: machine description and appending a section to the history log (bench/results/HISTORY.md)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, {platform.system()} {platform.release()}"


def commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
            ).stdout.strip()
            or "uncommitted"
        )
    except OSError:
        return "unknown"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


HISTORY = (
    ROOT / "bench" / "results" / "HISTORY.md"
)  # the dated log; BENCHMARKS.md holds the current figure per area


def append_history(text: str) -> Path:
    """Append a dated section to the history log (never rewrites old entries); the current figure of its area is
    then folded into BENCHMARKS.md's table by hand."""
    HISTORY.parent.mkdir(parents=True, exist_ok=True)
    if not HISTORY.exists():
        HISTORY.write_text(
            "# Benchmark history\n\nAppended by the scripts under `bench/`; each entry names its machine "
            "and date. Current figures: BENCHMARKS.md.\n"
        )
    with HISTORY.open("a") as f:
        f.write(text)
    print(f"appended to {HISTORY}; fold its figures into BENCHMARKS.md")
    return HISTORY


def append_section(title: str, body: str) -> None:
    """Append `## title` with the date, machine and commit to the history log (bench/results/HISTORY.md)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    append_history(f"\n## {title}\n\n_{stamp} · {machine()} · commit {commit()}_\n\n{body.strip()}\n")
