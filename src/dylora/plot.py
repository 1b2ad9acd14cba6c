"""The accuracy-vs-rank plot of a sweep, with the parameter count on a second axis."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_sweep(path: str | os.PathLike, validation: list[Any], test: list[Any], metric: str,
               title: str = "") -> Path:
    """Metric vs rank for validation and test (rows with .rank, .metrics, .params); written atomically."""
    path = Path(path)
    ranks = [row.rank for row in validation]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(ranks, [row.metrics[metric] for row in validation], "o-", label=f"validation {metric}")
    ax.plot([row.rank for row in test], [row.metrics[metric] for row in test], "s-", label=f"test {metric}")
    ax.set_xlabel("rank b")
    ax.set_ylabel(metric.replace("_", " ") + " (%)")
    ax.set_xticks(ranks)
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.bar(ranks, [row.params / 1e3 for row in validation], alpha=0.15, color="grey", label="params")
    twin.set_ylabel("trainable parameters at rank b (thousands)")
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.legend(loc="lower right")
    ax.set_title(title)
    return save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write a figure to a temporary name, then rename it into place."""
    path = Path(path)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
