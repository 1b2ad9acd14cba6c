"""A sweep's results: the rank and basis picks, the sweep.json payload (sweep_payload, sweep_rows), and the plots
(metric vs rank, per-layer ranks), each drawn where RunDir says (`rundir.RunDir` writes the files)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import files
from ..sweep import SweepRow
from .settings import BASIS_RULES


def pick_ranks(rows: list[SweepRow], metric: str, within: float, higher_is_better: bool = True) -> tuple[int, int]:
    """(best rank, smallest rank within `within` points of the best), both chosen on these rows over every
    (rank, basis): a rank counts with its better basis."""
    sign = 1 if higher_is_better else -1
    best = max(rows, key=lambda row: (sign * row.metrics[metric], -row.rank, row.basis == "prefix"))
    smallest = min(row.rank for row in rows if sign * (best.metrics[metric] - row.metrics[metric]) <= within)
    return best.rank, smallest


PAIRED_Z = 2.0  # "paired": the SVD cut only where its mean loss is lower by more than this many standard errors
PREFER_SVD_Z = 1.0  # "prefer-svd": the prefix only where it is better by more than this many standard errors
CORRECTNESS_METRICS = ("accuracy", "exact_match")  # a metric that is the mean of per-example correctness


def paired_better(base: list[float], other: list[float], z: float = PAIRED_Z) -> bool:
    """Whether `other`'s per-example losses are lower than `base`'s beyond noise, paired by example: with
    d_i = base_i - other_i over the n examples, mean(d) > z * sd(d) / sqrt(n) (a one-sided paired z-test)."""
    if len(base) != len(other) or len(base) < 2:
        raise ValueError(f"a paired pick needs the same examples (at least 2) in both bases, got {len(base)} and "
                         f"{len(other)}")
    d = [x - y for x, y in zip(base, other, strict=True)]
    n = len(d)
    mean = sum(d) / n
    sd = (sum((x - mean) ** 2 for x in d) / (n - 1)) ** 0.5
    # a lead of exactly z standard errors is not beyond them: one example of n ahead and none behind is mean = SE = 1/n
    # exactly, which rounding would otherwise decide
    return mean > z * sd / n ** 0.5 * (1 + 1e-9)


def example_errors(row: SweepRow, metric: str) -> list[float] | None:
    """A row's per-example scores, lower is better, in the form of `metric`: 1 - correctness for a metric that is
    its mean (accuracy, exact match), else the per-example loss; None where the row has not got them."""
    if metric in CORRECTNESS_METRICS and row.extra.get("example_correct") is not None:
        return [1.0 - c for c in row.extra["example_correct"]]
    return row.extra.get("example_loss")


def pick_bases(rows: list[SweepRow], metric: str, higher_is_better: bool = True, rule: str = "metric",
               r: int | None = None) -> dict[int, str]:
    """{rank: the basis picked on these (validation) rows}. `rule`: "metric", the better metric (a tie goes to the
    prefix); "loss", the lower mean per-example loss; "paired", the prefix unless the SVD cut's per-example losses
    are lower beyond noise (`paired_better`, z = PAIRED_Z); "prefer-svd", the SVD cut unless the prefix's
    per-example scores (`example_errors`: correctness for accuracy, else the loss) are better beyond noise
    (z = PREFER_SVD_Z). The other rules need the rows' per-example scores (`extra`, from a task that gives them);
    a rank without them falls back to "metric". At the full rank `r`, where both bases are one update, every rule
    keeps the prefix: the trained factors as they are."""
    if rule not in BASIS_RULES:
        raise ValueError(f"basis rule must be one of {', '.join(BASIS_RULES)}, got {rule!r}")
    if rule != "metric":
        by = {(row.rank, row.basis): row for row in rows}
        out = pick_bases(rows, metric, higher_is_better, r=r)
        for b in out:
            if (b, "prefix") not in by or (b, "svd") not in by or b == r:
                continue
            if rule == "prefer-svd":
                pre, svd = example_errors(by[b, "prefix"], metric), example_errors(by[b, "svd"], metric)
                if pre is not None and svd is not None:
                    out[b] = "prefix" if paired_better(svd, pre, PREFER_SVD_Z) else "svd"
                continue
            pre, svd = by[b, "prefix"].extra.get("example_loss"), by[b, "svd"].extra.get("example_loss")
            if pre is None or svd is None:
                continue
            if rule == "loss":
                out[b] = "svd" if sum(svd) / len(svd) < sum(pre) / len(pre) else "prefix"
            else:
                out[b] = "svd" if paired_better(pre, svd) else "prefix"
        return out
    sign = 1 if higher_is_better else -1
    picked: dict[int, SweepRow] = {}
    for row in rows:
        old = picked.get(row.rank)
        if old is None or (sign * row.metrics[metric], row.basis == "prefix") > \
                (sign * old.metrics[metric], old.basis == "prefix"):
            picked[row.rank] = row
    has_prefix = {row.rank for row in rows if row.basis == "prefix"}
    return {b: "prefix" if b == r and b in has_prefix else row.basis for b, row in sorted(picked.items())}


def sweep_payload(validation: list[SweepRow], test: list[SweepRow], metrics: list[str], best: int,
                  smallest: int, higher_is_better: bool = True, picked: dict[int, str] | None = None,
                  rule: str = "metric") -> dict[str, Any]:
    """The sweep.json content: one row per rank with its basis picked on validation (`picked`, else
    `pick_bases`) and that basis's validation and test metrics; with two bases swept, each basis's metrics too, as
    `<basis>_validation_<metric>`; "basis_rule" names the rule of the pick."""
    picked = picked if picked is not None else pick_bases(validation, metrics[0], higher_is_better)
    bases = list(dict.fromkeys(row.basis for row in validation))
    val_by = {(row.rank, row.basis): row for row in validation}
    test_by = {(row.rank, row.basis): row for row in test}

    def metrics_of(b: int, basis: str, prefix: str = "") -> dict[str, float]:
        return {**{f"{prefix}validation_{k}": x for k, x in val_by[b, basis].metrics.items()},
                **{f"{prefix}test_{k}": x for k, x in test_by[b, basis].metrics.items()}}

    rows = [{"rank": b, "basis": basis, "params": val_by[b, basis].params, **metrics_of(b, basis),
             **({k: v for other in bases for k, v in metrics_of(b, other, f"{other}_").items()}
                if len(bases) > 1 else {})} for b, basis in picked.items()]
    return {"metric": metrics[0], "metrics": list(metrics), "best_rank": best, "best_basis": picked[best],
            "smallest_rank_within": smallest, "bases": bases, "picked": {str(b): x for b, x in picked.items()},
            "basis_rule": rule,
            "rows": rows}


def sweep_rows(payload: dict[str, Any], split: str = "validation") -> list[SweepRow]:
    """The SweepRows of one split of a sweep.json: a row per rank and basis swept (a sweep.json of an older run
    has no basis: its rows are the prefix's)."""
    metrics = payload["metrics"] if isinstance(payload.get("metrics"), list) else [payload["metric"]]
    out = []
    for row in payload["rows"]:
        bases = [b for b in ("prefix", "svd") if f"{b}_{split}_{metrics[0]}" in row]
        for basis in bases or [str(row.get("basis", "prefix"))]:
            key = f"{basis}_{split}_" if bases else f"{split}_"
            out.append(SweepRow(int(row["rank"]), {m: float(row[key + m]) for m in metrics if key + m in row},
                                int(row["params"]), basis=basis))
    return out


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
    ranks = sorted({row.rank for row in validation})
    bases = list(dict.fromkeys(row.basis for row in validation))
    for ax, (names, ylabel) in zip(axes[0], panels, strict=True):
        for rows, split, marker in ((validation, "validation", "o"), (test, "test", "s")):
            for basis, fill in zip(bases, ("full", "none"), strict=False):
                part = [row for row in rows if row.basis == basis]
                for name, style in zip(names, ("-", "--", ":"), strict=False):
                    ax.plot([row.rank for row in part], [row.metrics[name] for row in part], marker + style,
                            fillstyle=fill, label=f"{split} {name}" + (f" ({basis})" if len(bases) > 1 else ""))
        ax.set_xlabel("rank b")
        ax.set_ylabel(ylabel)
        ax.set_xticks(ranks)
        ax.grid(alpha=0.3)
        if params:
            twin = ax.twinx()
            params_at = {row.rank: row.params for row in validation}
            twin.bar(ranks, [params_at[b] / 1e3 for b in ranks], alpha=0.15, color="grey")
            twin.set_ylabel("trainable parameters at rank b (thousands)")
            ax.set_zorder(twin.get_zorder() + 1)
            ax.patch.set_visible(False)
        ax.legend(loc="lower right" if params else "best")
    fig.suptitle(title) if len(panels) > 1 else axes[0][0].set_title(title)
    return _save(fig, path)
