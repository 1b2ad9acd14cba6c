"""Reproduce the DyLoRA paper in shape: LoRA at each rank, truncated LoRA, DyLoRA (full, frozen, geometric),
full fine-tuning, and the cost of a rank search, on real pretrained MiniLM and real data.

    python benchmarks/reproduce.py --quick          # polarity, one seed, short schedule (< 10 min on 2 cores)
    python benchmarks/reproduce.py                  # every task, arm and seed (see PLAN)

Every run is a `dylora train` / `dylora lora` pipeline run (`dylora.app.run.train`), written to
`<out>/<task>/<arm>-s<seed>/`; a run whose sweep.json exists is not run again, so an interrupted
reproduction resumes where it stopped. At the end the tables and plots are written to `--docs`
(`results.md` section files and PNGs) and all numbers to `<out>/summary.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from pool_workers import exit_with_parent

from dylora.app.run import sweep_run, train
from dylora.app.settings import Settings

RANKS = list(range(1, 9))
LORA_RANKS = [1, 2, 4, 8]
SEARCH_EXTRA = [3, 5, 6, 7]  # with LORA_RANKS: the exhaustive search over 1..8 (seed 0 of SEARCH_TASKS)
SEARCH_TASKS = ("polarity",)

# Per-task schedule, cut to fit the whole reproduction in 90 minutes on 2 cores (two single-threaded runs at a
# time): one epoch; tweets and bbc subsampled (seeded) and evaluated on at most `max_eval` rows per split.
# Same optimiser, schedule, epochs and lr for every arm of a task.
PLAN = {
    "polarity": dict(settings=dict(epochs=1.0, max_length=64, batch_size=16), seeds=3),
    "tweets": dict(settings=dict(epochs=1.0, max_length=48, batch_size=16, max_train=1500, max_eval=400), seeds=2),
    "bbc": dict(settings=dict(epochs=1.0, max_length=64, batch_size=16, max_train=700), seeds=2),
}
QUICK = {"polarity": dict(settings=dict(max_steps=60, max_length=64, batch_size=16, max_train=1000), seeds=1)}
LR_GRID = [1e-3, 3e-3]

ARMS = {
    "dylora": dict(method="dylora"),
    "dylora-frozen": dict(method="dylora", frozen=True),
    # the ablation table reports b = 1, 2, 4, 8: the geometric arms sweep only those
    "dylora-geometric": dict(method="dylora", rank_distribution="geometric", geometric_p=0.15, ranks=LORA_RANKS),
    "dylora-geometric-frozen": dict(method="dylora", rank_distribution="geometric", geometric_p=0.15, frozen=True,
                                    ranks=LORA_RANKS),
    **{f"lora-r{b}": dict(method="lora", r=b) for b in LORA_RANKS},
    "full": dict(method="full", lr=1e-4),  # untuned: the usual lr for fine-tuning a small encoder in full
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_once(out: Path, s: Settings) -> dict:
    """Run one arm (or reuse its finished directory) and return its sweep and timings."""
    if not (out / "sweep.json").is_file():
        log(f"run {out}")
        train(s, out, overwrite=True, quiet=True)
        log(f"done {out}")
    sweep = json.loads((out / "sweep.json").read_text())
    record = json.loads((out / "run.json").read_text())
    return {"rows": sweep["rows"], "metric": sweep["metric"], "timings": record["timings"],
            "best_rank": sweep["best_rank"], "path": str(out), "final_loss": final_loss(record["log_history"]),
            # a generation run has no classes, so no chance level: never "stuck"
            "chance_loss": math.log(len(record["label_names"])) if len(record.get("label_names") or []) > 1
            else math.inf}


def final_loss(history: list[dict]) -> float:
    """Mean training loss over the last fifth of the logged steps."""
    losses = [h["loss"] for h in history if "loss" in h] or [h["train_loss"] for h in history if "train_loss" in h]
    return statistics.fmean(losses[-max(1, len(losses) // 5):])


def stuck(res: dict) -> bool:
    """A run that never left chance: its training loss over the last fifth of training is still ~ln(classes)."""
    return res["final_loss"] >= 0.97 * res["chance_loss"]


def truncated(out: Path, lora8: Path) -> dict:
    """The r = 8 LoRA evaluated on test at b = 1..8 with scale alpha / b (the paper's Table 2 'LoRA' row);
    b = 8 is the run's own score."""
    path = out / "truncated.json"
    if not path.is_file():
        rows, _, _ = sweep_run(lora8, RANKS[:-1], split="test", progress=False)
        own = json.loads((lora8 / "sweep.json").read_text())["rows"][0]
        test = {str(row.rank): row.metrics for row in rows}
        test["8"] = {k[len("test_"):]: v for k, v in own.items() if k.startswith("test_")}
        path.write_text(json.dumps({"test": test}))
    return json.loads(path.read_text())


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _job(kind: str, out: Path, s: Settings | Path) -> dict:
    return run_once(out, s) if kind == "run" else truncated(out, s)


def _init_worker(threads: int, parent: int) -> None:
    import warnings

    exit_with_parent(parent)  # a killed benchmark takes its workers with it

    import datasets
    import torch
    import transformers

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


class Pool:
    """`jobs` worker processes of `threads` threads each; one job per worker at a time. `job(kind, *args)` runs
    one job in a worker (default: this module's runs and truncated sweeps)."""

    def __init__(self, jobs: int, threads: int, job=None):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        os.environ["OMP_NUM_THREADS"] = str(threads)  # spawned workers start with it
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.ex = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_init_worker, initargs=(threads, os.getpid()))
        self.job = job or _job

    def map(self, jobs: dict) -> dict:
        """Run {key: (kind, *args)} and return {key: result}, failing on the first error."""
        futures = {key: self.ex.submit(self.job, *job) for key, job in jobs.items()}
        return {key: f.result() for key, f in futures.items()}


def lr_run(out: Path, task: str, lr: float) -> Path:
    return out / task / f"lr-{lr:g}"


def reproduce(plan: dict, out: Path, quick: bool, pool: Pool) -> dict:
    summary: dict = {}
    t_start = time.perf_counter()
    bases = {task: Settings(model="minilm", data=task, r=8, lora_alpha=16, recipe="paper", **spec["settings"])
             for task, spec in plan.items()}
    # 1. the lr of each task: best validation score of plain LoRA r=8, seed 0, over LR_GRID
    lrs = {task: base.lr for task, base in bases.items()}
    if not quick:
        grid = pool.map({(task, lr): ("run", lr_run(out, task, lr), replace(base, method="lora", r=8, lr=lr, seed=0))
                         for task, base in bases.items() for lr in LR_GRID})
        for task in bases:
            scores = {lr: grid[task, lr]["rows"][0][f"validation_{grid[task, lr]['metric']}"] for lr in LR_GRID}
            lrs[task] = max(scores, key=scores.get)
            (out / task / "lr_choice.json").write_text(json.dumps({"grid": scores, "chosen": lrs[task]}))
    # 2. every arm and seed (the LoRA r=8 of seed 0 is the lr search's run), and the search's extra ranks
    jobs, lora8 = {}, {}
    for task, spec in plan.items():
        base = replace(bases[task], lr=lrs[task])
        for seed in range(spec["seeds"]):
            for arm, kw in ARMS.items():
                path = out / task / f"{arm}-s{seed}"
                if arm == "lora-r8" and seed == 0 and not quick:
                    path = lr_run(out, task, lrs[task])
                jobs[task, arm, seed] = ("run", path, replace(base, seed=seed, **kw))
            lora8[task, seed] = jobs[task, "lora-r8", seed][1]
        if not quick and task in SEARCH_TASKS:
            for b in SEARCH_EXTRA:
                jobs[task, f"lora-r{b}", 0] = ("run", out / task / f"lora-r{b}-s0",
                                               replace(base, method="lora", r=b, seed=0))
    results = pool.map(jobs)
    # 3. the truncated LoRA rows
    trunc = pool.map({key: ("truncated", path, path) for key, path in lora8.items()})
    for task, spec in plan.items():
        arms: dict = {}
        for (t, arm, _seed), res in results.items():
            if t == task:
                arms.setdefault(arm, []).append(res)
        arms["truncated"] = [{"rows": [{"rank": int(b), **{f"test_{k}": v for k, v in m.items()}}
                                       for b, m in sorted(trunc[task, seed]["test"].items(), key=lambda x: int(x[0]))],
                              **{k: results[task, "lora-r8", seed][k] for k in ("path", "final_loss", "chance_loss")}}
                             for seed in range(spec["seeds"])]
        summary[task] = {"lr": lrs[task], "settings": spec["settings"], "arms": arms}
    summary["_wall_s"] = time.perf_counter() - t_start
    return summary


# ---------------------------------------------------------------- tables and plots


def score(rows: list[dict], metric: str, split: str = "test") -> dict[int, float]:
    return {row["rank"]: row[f"{split}_{metric}"] for row in rows}


def arm_by_rank(runs: list[dict], metric: str, split: str = "test") -> dict[int, tuple[float, float]]:
    per_rank: dict[int, list[float]] = {}
    for res in runs:
        for b, v in score(res["rows"], metric, split).items():
            per_rank.setdefault(b, []).append(v)
    return {b: mean_std(v) for b, v in sorted(per_rank.items())}


def search_time(res: dict) -> float:
    """Wall time of a run up to its choice of rank: everything but the test-split evaluation (reporting)."""
    t = res["timings"]
    return t["total_s"] - t.get("sweep_test_s", 0.0)


def search_cost(results: dict, metric: str) -> list[dict]:
    """LoRA search (one run per rank) vs one DyLoRA run + validation sweep: wall time, picks, test scores."""
    rows = []
    arms = results["arms"]
    dy = arms["dylora"][0]
    dy_t = dy["timings"]
    per_rank = dy_t["sweep_validation_s"] / len(dy["rows"])  # one validation evaluation, measured in the sweep
    for label, ranks in (("{1,2,4,8}", LORA_RANKS), ("{1..8}", RANKS)):
        runs = {b: arms[f"lora-r{b}"][0] for b in ranks if f"lora-r{b}" in arms}
        if len(runs) != len(ranks):
            continue
        # DyLoRA searches the same ranks: one training run, then one validation evaluation per rank
        dy_time = dy_t["total_s"] - dy_t["sweep_s"] + per_rank * len(ranks)
        val = score(dy["rows"], metric, "validation")
        dy_pick = max(ranks, key=lambda b: (val[b], -b))
        t = sum(search_time(r) for r in runs.values())
        pick = max(runs, key=lambda b: (runs[b]["rows"][0][f"validation_{metric}"], -b))
        rows.append({"search": label, "lora_runs": len(ranks), "lora_wall_s": t, "lora_pick": pick,
                     "lora_pick_test": runs[pick]["rows"][0][f"test_{metric}"], "dylora_wall_s": dy_time,
                     "dylora_pick": dy_pick, "dylora_pick_test": score(dy["rows"], metric)[dy_pick],
                     "speedup": t / dy_time})
    return rows


def main_table(arms: dict, metric: str) -> dict[str, dict[int, tuple[float, float]]]:
    """The rows of the paper's Table 2: LoRA trained at each rank, truncated LoRA, DyLoRA (Frozen), DyLoRA."""
    return {
        "LoRA trained at r = b": {b: mean_std([r["rows"][0][f"test_{metric}"] for r in arms[f"lora-r{b}"]])
                                  for b in RANKS if arms.get(f"lora-r{b}")},
        "LoRA r=8, truncated to b": arm_by_rank(arms["truncated"], metric),
        "DyLoRA (Frozen)": arm_by_rank(arms["dylora-frozen"], metric),
        "DyLoRA": arm_by_rank(arms["dylora"], metric),
    }


def table_lines(lines: list[str], table: dict, one_seed: list[int]) -> None:
    for name, row in table.items():
        cells = [fmt(row.get(b)) + (" ¹" if name.startswith("LoRA trained") and b in one_seed else "") for b in RANKS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")


def search_cost_table(cost: list[dict]) -> list[str]:
    """The search-cost rows of `search_cost` as a markdown table."""
    lines = ["| LoRA search over | LoRA runs | LoRA wall (s) | LoRA pick (test) | DyLoRA run + val sweep (s) "
             "| DyLoRA pick (test) | speed-up |", "|---|---|---|---|---|---|---|"]
    for c in cost:
        lines.append(f"| {c['search']} | {c['lora_runs']} | {c['lora_wall_s']:.0f} | r={c['lora_pick']} "
                     f"({c['lora_pick_test']:.1f}) | {c['dylora_wall_s']:.0f} | b={c['dylora_pick']} "
                     f"({c['dylora_pick_test']:.1f}) | {c['speedup']:.2f}x |")
    return lines


def fmt(ms: tuple[float, float] | None) -> str:
    return "" if ms is None else f"{ms[0]:.1f} ± {ms[1]:.1f}"


def write_docs(summary: dict, docs: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs.mkdir(parents=True, exist_ok=True)
    lines = ["# The paper in shape: the per-seed tables behind results.md", "", f"<!-- written by: {command} -->", ""]
    for task, results in summary.items():
        if task.startswith("_"):
            continue
        arms = results["arms"]
        metric = arms["dylora"][0]["metric"]
        seeds = len(arms["dylora"])
        lines += [f"### {task}: test {metric} (%), mean ± std over {seeds} seed(s)", "",
                  f"Schedule: {results['settings']}, lr {results['lr']:g} (chosen on validation with LoRA r=8).", "",
                  "| row | " + " | ".join(f"b={b}" for b in RANKS) + " |",
                  "|---|" + "---|" * len(RANKS)]
        one_seed = [b for b in RANKS if f"lora-r{b}" in arms and len(arms[f"lora-r{b}"]) == 1 and seeds > 1]
        table = main_table(arms, metric)
        table_lines(lines, table, one_seed)
        if one_seed:
            lines += ["", f"¹ seed 0 only: LoRA at r = {', '.join(map(str, one_seed))} is trained for the "
                      "search-cost table (the exhaustive search over 1..8), not for every seed."]
        failed = sorted({r["path"] for runs in arms.values() for r in runs if "path" in r and stuck(r)})
        if failed:
            lines += ["", f"Runs that never left chance (training loss over the last fifth of training >= 0.97 "
                      f"ln(classes)): {', '.join(f'`{Path(p).name}`' for p in failed)}. The same table without "
                      f"them (the truncated row drops with its LoRA r=8 run):", "",
                      "| row | " + " | ".join(f"b={b}" for b in RANKS) + " |", "|---|" + "---|" * len(RANKS)]
            table = main_table({k: [r for r in v if "path" not in r or not stuck(r)] for k, v in arms.items()}, metric)
            table_lines(lines, table, one_seed)
        full = mean_std([r["rows"][0][f"test_{metric}"] for r in arms["full"]])
        lines += ["", f"Full fine-tuning (ceiling): {fmt(full)}", "",
                  f"Ablation (test {metric} at b = 1, 2, 4, 8):", "",
                  "| sampling | mode | " + " | ".join(f"b={b}" for b in LORA_RANKS) + " |",
                  "|---|---|" + "---|" * len(LORA_RANKS)]
        for name, arm, mode in (("uniform", "dylora", "full"), ("uniform", "dylora-frozen", "frozen"),
                                ("geometric p=0.15", "dylora-geometric", "full"),
                                ("geometric p=0.15", "dylora-geometric-frozen", "frozen")):
            row = arm_by_rank(arms[arm], metric)
            lines.append(f"| {name} | {mode} | " + " | ".join(fmt(row[b]) for b in LORA_RANKS) + " |")
        cost = search_cost(results, metric)
        if cost:
            lines += ["", "Search cost (seed 0; wall time of loading, training and validation evaluation, i.e. "
                      "everything up to the choice of rank; the test evaluation is reporting and not counted. "
                      "DyLoRA: its one run without the sweep, plus one measured validation evaluation per rank "
                      "searched):", "", *search_cost_table(cost)]
        lines.append("")
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
        for name, row in table.items():
            bs = sorted(row)
            ax.errorbar(bs, [row[b][0] for b in bs], yerr=[row[b][1] for b in bs], marker="o", capsize=3,
                        label=name)
        ax.axhline(full[0], color="grey", ls="--", lw=1, label="full fine-tuning")
        ax.set_xlabel("rank b")
        ax.set_ylabel(f"test {metric} (%)")
        ax.set_title(f"{task}: MiniLM, r_max = 8, {seeds} seed(s)"
                     + (f"\nwithout {', '.join(Path(p).name for p in failed)} (never left chance)" if failed else ""))
        ax.set_xticks(RANKS)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(docs / f"reproduce-{task}.png")
        plt.close(fig)
        lines += [f"![{task}](reproduce-{task}.png)" + (" (the plot leaves out the runs that never left chance)"
                                                       if failed else ""), ""]
    walls = summary.get("_invocations_s", [summary["_wall_s"]])
    lines.append(f"Wall time of this reproduction: {sum(walls) / 60:.1f} min over {len(walls)} invocation(s) "
                 f"({', '.join(f'{w / 60:.1f}' for w in walls)} min; an invocation reuses every finished run), "
                 f"{summary['_jobs']} run(s) at a time with {summary['_threads']} thread(s) each. Each run's own "
                 "time (search cost) is the wall time of that run on its thread(s).")
    (docs / "reproduce-tables.md").write_text("\n".join(lines) + "\n")


def choose_plan(parser: argparse.ArgumentParser, args: argparse.Namespace, plan: dict, quick: dict) -> dict:
    """The tasks and seeds to run: `quick` or `plan`, cut to --tasks (a quick task missing falls back to the
    full plan's) and --seeds."""
    chosen = quick if args.quick else plan
    if args.tasks:
        unknown = set(args.tasks.split(",")) - set(plan)
        if unknown:
            parser.error(f"unknown task(s) {sorted(unknown)}; choose from {', '.join(plan)}")
        chosen = {t: (quick.get(t) if args.quick else None) or plan[t] for t in args.tasks.split(",")}
    if args.seeds is not None:
        chosen = {t: {**spec, "seeds": args.seeds} for t, spec in chosen.items()}
    return chosen


def pool_options(parser: argparse.ArgumentParser, plan: dict, out: str, quick_help: str, seeds_help: str) -> None:
    """The options of a benchmark that runs `plan` in a `Pool`: --quick, --tasks, --seeds, --out, --docs,
    --jobs, --threads (read back by `pool_start`)."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--tasks", default=None, help="comma-separated subset of " + ",".join(plan))
    parser.add_argument("--seeds", type=int, default=None, help=seeds_help)
    parser.add_argument("--out", default=out, help="run directories and per-job files")
    parser.add_argument("--docs", default="docs")
    parser.add_argument("--jobs", type=int, default=2, help="jobs at a time (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="threads per job (default: cores / jobs)")


def pool_start(parser: argparse.ArgumentParser, plan: dict, quick: dict) -> tuple[argparse.Namespace, dict, Path, int]:
    """Parse `pool_options`: the arguments, the plan to run, its output directory (<out>/quick or <out>/full,
    created) and the threads per job; models are never fetched from a hub."""
    args = parser.parse_args()
    chosen = choose_plan(parser, args, plan, quick)
    out = Path(args.out) / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return args, chosen, out, args.threads or max(1, (os.cpu_count() or 1) // args.jobs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    pool_options(parser, PLAN, "bench-out/reproduce", "polarity, one seed, 60 steps",
                 "seeds per task (default: the plan's, 3 or 2)")
    args, plan, out, threads = pool_start(parser, PLAN, QUICK)
    log(f"{args.jobs} run(s) at a time, {threads} thread(s) each")
    ledger = out / "wall.json"  # the wall time of every invocation over this output directory
    if ledger.is_file():
        invocations = json.loads(ledger.read_text())
    elif (out / "summary.json").is_file():  # written before the ledger existed
        invocations = [json.loads((out / "summary.json").read_text())["_wall_s"]]
    else:
        invocations = []
    summary = reproduce(plan, out, args.quick, Pool(args.jobs, threads))
    invocations.append(summary["_wall_s"])
    ledger.write_text(json.dumps(invocations))
    summary["_jobs"], summary["_threads"], summary["_invocations_s"] = args.jobs, threads, invocations
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    write_docs(summary, Path(args.docs) if not args.quick else out, " ".join(["python", *sys.argv]))
    log(f"done in {summary['_wall_s'] / 60:.1f} min; tables in {args.docs if not args.quick else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
