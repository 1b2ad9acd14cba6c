"""Which training recipe makes every rank of one DyLoRA run as good as a LoRA trained at that rank?

    python benchmarks/recipes.py                         # bbc and polarity, 3 seeds, every recipe (make recipes)
    python benchmarks/recipes.py --tasks bbc --seeds 1   # a cut
    python benchmarks/recipes.py --quick                 # bbc, one seed, 20 steps: checks the plumbing

The reproduction's 1-epoch schedule (benchmarks/reproduce.py PLAN, lr 3e-3), MiniLM, r_max 8, alpha 16.
Arms: LoRA trained at r = 1, 2, 4, 8, and one DyLoRA run per recipe (paper uniform, paper geometric,
sandwich, sandwich + distillation, rowwise, nested, rowwise with a distilled r_max), each swept at
b = 1, 2, 4, 8; then the two recipes with
the smallest worst-b gap again with rank_scaling alpha/sqrt(b); then, on bbc (one seed), the lr window of
the paper recipe, the best recipe and LoRA r=8 over lrs 3e-4, 1e-3, 3e-3, 1e-2. Every run is a
`dylora.app.run.train` run in `<out>/<task>/<arm>-s<seed>/`, reused when its sweep.json exists (resumable); two
single-threaded runs at a time. Numbers go to benchmarks/results/recipes.json, tables to
docs/recipes-tables.md, the gap-vs-rank plot to docs/recipes.png. `--timing` measures each recipe's cost
again on bbc, each run paired with a LoRA r=8 run started at the same time (the per-seed costs otherwise
compare runs that may have met different loads), and uses it for both tasks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from reproduce import PLAN, Pool, log, mean_std, score, stuck

from dylora.app.settings import Settings

RANKS = [1, 2, 4, 8]
LR = 3e-3
LR_WINDOW = [3e-4, 1e-3, 3e-3, 1e-2]
RECIPES = {
    "paper": dict(recipe="paper"),
    "paper-geometric": dict(recipe="paper", rank_distribution="geometric", geometric_p=0.15),
    "sandwich": dict(recipe="sandwich", distill=False),
    "sandwich-distill": dict(recipe="sandwich", distill=True),
    "rowwise": dict(recipe="rowwise", distill=False),
    "nested": dict(recipe="nested"),
    "rowwise-distill": dict(recipe="rowwise", distill=True),
    "rowwise-distill-half": dict(recipe="rowwise", distill=True, epochs=0.5),  # two passes a step, half the steps
}
QUICK = {"bbc": dict(settings=dict(max_steps=20, max_length=64, batch_size=16, max_train=320, max_eval=60), seeds=1)}


def arms_of(recipes: dict) -> dict[str, dict]:
    return {**{f"lora-r{b}": dict(method="lora", r=b) for b in RANKS},
            **{name: dict(method="dylora", ranks=RANKS, **kw) for name, kw in recipes.items()}}


def gaps(results: dict, arm: str, metric: str) -> dict[int, float]:
    """Mean over seeds of (recipe at b) - (LoRA trained at b), paired by seed."""
    out: dict[int, list[float]] = {}
    for runs in results.values():
        if arm not in runs:
            continue
        own = score(runs[arm]["rows"], metric)
        for b in RANKS:
            out.setdefault(b, []).append(own[b] - runs[f"lora-r{b}"]["rows"][0][f"test_{metric}"])
    return {b: statistics.fmean(v) for b, v in out.items()}


def cost(results: dict, arm: str) -> float:
    """Training wall time over one LoRA r=8 run's, per seed (run in one pool, not always at the same time:
    `measure_cost` pairs them), averaged."""
    ratios = [runs[arm]["timings"]["train_s"] / runs["lora-r8"]["timings"]["train_s"]
              for runs in results.values() if arm in runs]
    return statistics.fmean(ratios)


def measure_cost(base: Settings, out: Path, pool: Pool) -> dict[str, float]:
    """Training wall time of each recipe over LoRA r=8's, the two run at the same time (seed 0), one pair at
    a time: the ratio holds whatever else loads the machine."""
    ratios = {}
    for name, kw in RECIPES.items():
        pair = pool.map({"lora": ("run", out / f"lora-r8-beside-{name}", replace(base, seed=0, method="lora", r=8)),
                         name: ("run", out / name, replace(base, seed=0, method="dylora", ranks=RANKS, **kw))})
        ratios[name] = pair[name]["timings"]["train_s"] / pair["lora"]["timings"]["train_s"]
        log(f"cost of {name}: {ratios[name]:.2f}x LoRA r=8")
    return ratios


def run_task(task: str, spec: dict, out: Path, seeds: int, pool: Pool, lr_window: bool, timing: bool) -> dict:
    # guard off: a run stuck at chance is a result here (listed under the table), not a stop
    base = Settings(model="minilm", data=task, r=8, lora_alpha=16, lr=LR, guard=False, **spec["settings"])
    arms = arms_of(RECIPES)
    jobs = {(seed, arm): ("run", out / task / f"{arm}-s{seed}", replace(base, seed=seed, **kw))
            for seed in range(seeds) for arm, kw in arms.items()}
    done = pool.map(jobs)
    results: dict[int, dict] = {}
    for (seed, arm), res in done.items():
        results.setdefault(seed, {})[arm] = res
    metric = next(iter(done.values()))["metric"]
    worst = {name: min(gaps(results, name, metric).values()) for name in RECIPES}
    best_two = sorted(RECIPES, key=lambda n: -worst[n])[:2]
    sqrt = {f"{n}-sqrt": dict(RECIPES[n], rank_scaling="alpha/sqrt(b)") for n in best_two}
    jobs = {(seed, arm): ("run", out / task / f"{arm}-s{seed}", replace(base, seed=seed, method="dylora",
                                                                        ranks=RANKS, **kw))
            for seed in range(seeds) for arm, kw in sqrt.items()}
    for (seed, arm), res in pool.map(jobs).items():
        results[seed][arm] = res
    names = [*RECIPES, *sqrt]
    table = {name: {"gap": gaps(results, name, metric), "cost": cost(results, name),
                    "test": {b: mean_std([score(r[name]["rows"], metric)[b] for r in results.values()])
                             for b in RANKS}} for name in names}
    for name in names:
        table[name]["worst"] = min(table[name]["gap"].values())
    lora = {b: mean_std([r[f"lora-r{b}"]["rows"][0][f"test_{metric}"] for r in results.values()]) for b in RANKS}
    summary = {"metric": metric, "lr": LR, "settings": spec["settings"], "seeds": seeds, "recipes": table,
               "lora": lora, "best_two": best_two,
               "stuck": sorted(f"{arm}-s{seed}" for seed, runs in results.items() for arm, res in runs.items()
                               if stuck(res))}
    if timing:
        summary["timing"] = measure_cost(base, out / task / "timing", pool)
        for name in names:
            table[name]["cost"] = summary["timing"][name.removesuffix("-sqrt")]
    if lr_window:
        best = max(names, key=lambda n: table[n]["worst"])
        window_arms = {"paper": dict(method="dylora", ranks=RANKS, **RECIPES["paper"]),
                       best: dict(method="dylora", ranks=RANKS, **(RECIPES.get(best) or sqrt[best])),
                       "lora-r8": dict(method="lora", r=8)}
        jobs = {(arm, lr): ("run", out / task / f"lr-{arm}-{lr:g}", replace(base, seed=0, lr=lr, guard=False, **kw))
                for arm, kw in window_arms.items() for lr in LR_WINDOW}
        grid = pool.map(jobs)
        window = {}
        for arm in window_arms:
            # the score of a run: its worst b on validation (LoRA r=8: its one rank)
            val = {lr: min(score(grid[arm, lr]["rows"], metric, "validation").values()) for lr in LR_WINDOW}
            top = max(val.values())
            window[arm] = {"validation": val, "within_1": [lr for lr, v in val.items() if v >= top - 1.0]}
        summary["lr_window"] = window
    return summary


def write_docs(summary: dict, docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Training recipes: the gap to LoRA trained at each rank", "",
             "Generated by `python benchmarks/recipes.py`. Gap = recipe at b minus LoRA trained at r = b, test "
             "accuracy, mean over seeds (paired by seed); cost = training wall time / one LoRA r=8 run's (with "
             "`--timing`: measured on bbc, each recipe's run started together with a LoRA r=8 run).", ""]
    tasks = [t for t in summary if not t.startswith("_")]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.0), dpi=120, squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        res = summary[task]
        lines += [f"## {task} ({res['seeds']} seed(s), lr {res['lr']:g}, {res['settings']})", "",
                  "| recipe | " + " | ".join(f"b={b}" for b in RANKS) + " | worst gap | cost |",
                  "|---|" + "---|" * (len(RANKS) + 2)]
        lines.append("| LoRA trained at r = b | " + " | ".join(f"{res['lora'][str(b)][0]:.1f}" for b in RANKS)
                     + " | | 1.00x |")
        for name, row in res["recipes"].items():
            gap = {int(k): v for k, v in row["gap"].items()}
            test = {int(k): v for k, v in row["test"].items()}
            cells = [f"{test[b][0]:.1f} ({gap[b]:+.1f})" for b in RANKS]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['worst']:+.1f} | {row['cost']:.2f}x |")
            ax.plot(RANKS, [gap[b] for b in RANKS], "o-", label=name)
        if res.get("stuck"):
            lines += ["", "Runs that never left chance (training loss over the last fifth >= 0.97 ln(classes)): "
                      + ", ".join(f"`{name}`" for name in res["stuck"]) + "."]
        if "lr_window" in res:
            lines += ["", "lr window (one seed; score = worst b on validation; lrs within 1 point of the best):", ""]
            for arm, w in res["lr_window"].items():
                vals = ", ".join(f"{float(lr):g}: {v:.1f}" for lr, v in w["validation"].items())
                lines.append(f"- {arm}: {vals}; within 1 point: {', '.join(f'{float(x):g}' for x in w['within_1'])}")
        lines.append("")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(RANKS, [str(b) for b in RANKS])
        ax.set_xlabel("rank b")
        ax.set_ylabel("test accuracy minus LoRA trained at b (points)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "recipes.png")
    (docs / "recipes-tables.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="bbc,polarity")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-lr-window", action="store_true")
    ap.add_argument("--timing", action="store_true", help="bbc: measure each recipe's cost beside LoRA r=8, paired")
    ap.add_argument("--out", type=Path, default=Path("bench-out/recipes"))
    ap.add_argument("--docs", type=Path, default=Path("docs"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    plan = QUICK if args.quick else {t: PLAN[t] for t in args.tasks.split(",")}
    out = args.out / "quick" if args.quick else args.out  # never mixed with the real schedule's runs
    seeds = 1 if args.quick else args.seeds
    pool = Pool(args.jobs, args.threads)
    results = Path("benchmarks/results")
    path = results / ("recipes-quick.json" if args.quick else "recipes.json")
    summary: dict = json.loads(path.read_text()) if path.is_file() else {}  # other tasks' numbers are kept
    window = {t: summary[t]["lr_window"] for t in summary if "lr_window" in summary[t]}
    t0 = time.perf_counter()
    for task, spec in plan.items():
        summary[task] = run_task(task, spec, out, seeds, pool, lr_window=task == "bbc" and not args.no_lr_window
                                 and not args.quick, timing=args.timing and task == "bbc")
        summary[task]["wall_s"] = time.perf_counter() - t0
        if "lr_window" not in summary[task] and task in window:  # --no-lr-window keeps the measured window
            summary[task]["lr_window"] = window[task]
        if args.timing and "timing" in summary.get("bbc", {}):  # one cost per recipe, measured on bbc
            for name, row in summary[task]["recipes"].items():
                row["cost"] = summary["bbc"]["timing"][name.removesuffix("-sqrt")]
        summary = json.loads(json.dumps(summary))  # the same (string-keyed) form as the file
        results.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2))
        write_docs(summary, args.docs if not args.quick else out)
        log(f"{task} done ({summary[task]['wall_s'] / 60:.1f} min so far)")


if __name__ == "__main__":
    main()
