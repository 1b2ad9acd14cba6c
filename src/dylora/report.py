"""A sweep's results as files: sweep.json, sweep.csv and the metric-vs-rank plot; and the rank pick."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from . import files
from .training import SweepRow


def pick_ranks(rows: list[SweepRow], metric: str, within: float, higher_is_better: bool = True) -> tuple[int, int]:
    """(best rank, smallest rank within `within` points of the best), both chosen on these rows."""
    sign = 1 if higher_is_better else -1
    best = max(rows, key=lambda row: (sign * row.metrics[metric], -row.rank))
    smallest = min(row.rank for row in rows if sign * (best.metrics[metric] - row.metrics[metric]) <= within)
    return best.rank, smallest


def sweep_payload(validation: list[SweepRow], test: list[SweepRow], metrics: list[str], best: int,
                  smallest: int) -> dict[str, Any]:
    """The sweep.json content: one row per rank with every validation and test metric."""
    test_by_rank = {row.rank: row for row in test}
    rows = [{"rank": v.rank, "params": v.params, **{f"validation_{k}": x for k, x in v.metrics.items()},
             **{f"test_{k}": x for k, x in test_by_rank[v.rank].metrics.items()}} for v in validation]
    return {"metric": metrics[0], "metrics": list(metrics), "best_rank": best, "smallest_rank_within": smallest,
            "rows": rows}


def write_sweep(directory: Path, payload: dict[str, Any]) -> None:
    """sweep.json and sweep.csv (the same rows) in `directory`."""
    files.write_json(directory / "sweep.json", payload)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(payload["rows"][0]))
    writer.writeheader()
    writer.writerows(payload["rows"])
    files.write_text(directory / "sweep.csv", text.getvalue())


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    _pyplot().close(fig)
    return Path(path)


def plot_allocation(path: str | os.PathLike, ranks: dict[str, int], r: int, title: str = "") -> Path:
    """A heat map of per-layer ranks: one row per layer (the first index in a module's name), one column per
    module name (its last part)."""
    plt = _pyplot()

    def where(name: str) -> tuple[str, str]:
        parts = name.split(".")
        layer = next((p for p in parts if p.isdigit()), "-")
        return layer, parts[-1]

    cells = {where(name): b for name, b in ranks.items()}
    layers = sorted({k[0] for k in cells}, key=lambda x: (not x.isdigit(), int(x) if x.isdigit() else 0))
    modules = sorted({k[1] for k in cells})
    grid = [[cells.get((layer, m), float("nan")) for m in modules] for layer in layers]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(modules), 1.0 + 0.35 * len(layers)), dpi=120)
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=r, aspect="auto")
    for i, row in enumerate(grid):
        for j, b in enumerate(row):
            if b == b:
                ax.text(j, i, str(b), ha="center", va="center", color="white" if b < r / 2 else "black")
    ax.set_xticks(range(len(modules)), modules)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="rank b")
    return _save(fig, path)


def plot_sweep(path: str | os.PathLike, validation: list[SweepRow], test: list[SweepRow],
               panels: list[tuple[list[str], str]], title: str = "", params: bool = True) -> Path:
    """Metrics vs rank, validation and test, one subplot per (metric names, y label) panel; with `params`
    the trainable parameters at each rank as bars on a second axis."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 if len(panels) == 1 else 9.6, 4.0), dpi=120,
                             squeeze=False)
    ranks = [row.rank for row in validation]
    for ax, (names, ylabel) in zip(axes[0], panels, strict=True):
        for rows, split, marker in ((validation, "validation", "o"), (test, "test", "s")):
            for name, style in zip(names, ("-", "--", ":"), strict=False):
                ax.plot([row.rank for row in rows], [row.metrics[name] for row in rows], marker + style,
                        label=f"{split} {name}")
        ax.set_xlabel("rank b")
        ax.set_ylabel(ylabel)
        ax.set_xticks(ranks)
        ax.grid(alpha=0.3)
        if params:
            twin = ax.twinx()
            twin.bar(ranks, [row.params / 1e3 for row in validation], alpha=0.15, color="grey")
            twin.set_ylabel("trainable parameters at rank b (thousands)")
            ax.set_zorder(twin.get_zorder() + 1)
            ax.patch.set_visible(False)
        ax.legend(loc="lower right" if params else "best")
    fig.suptitle(title) if len(panels) > 1 else axes[0][0].set_title(title)
    return _save(fig, path)
