"""Stage plots: loss vs tokens, and for stages 1-2 the per-layer loss with error bars."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from llamba.atomic import atomic_write  # noqa: E402


def plot_stage(metrics: list[dict], path: Path, title: str) -> None:
    """metrics: rows of metrics.jsonl ({tokens, loss, per_layer?}). Per-layer bars: mean and std over the last
    quarter of the steps (at least one)."""
    per_layer = [m["per_layer"] for m in metrics if m.get("per_layer")]
    fig, axes = plt.subplots(1, 2 if per_layer else 1, figsize=(11 if per_layer else 6, 4), squeeze=False)
    ax = axes[0, 0]
    ax.plot([m["tokens"] for m in metrics], [m["loss"] for m in metrics], lw=1.2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if per_layer:
        tail = np.array(per_layer[-max(1, len(per_layer) // 4) :])  # (steps, n_layer)
        ax = axes[0, 1]
        ax.bar(np.arange(tail.shape[1]), tail.mean(0), yerr=tail.std(0), capsize=2, color="tab:orange")
        ax.set_xlabel("layer")
        ax.set_ylabel("loss (last quarter of steps)")
        ax.set_title("per-layer loss")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
