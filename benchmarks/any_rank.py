"""Any rank after training: LoRA trained at b, LoRA r=8 cut by SVD, and DyLoRA recipes read in the prefix basis,
the SVD basis or the one picked on validation by `dylora train`'s rule ("picked"), at every b = 1..8 (issue #19).

    python benchmarks/any_rank.py                       # train what is missing, evaluate, render (make any-rank)
    python benchmarks/any_rank.py --phase train         # only train (resumable: a cached arm is skipped)
    python benchmarks/any_rank.py --phase eval,docs     # evaluate every cached arm, write the json and the docs
    python benchmarks/any_rank.py --tasks bbc --seeds 1 # a cut
    python benchmarks/any_rank.py --tasks bbc-topic-1ep,bbc-topic-4bit --name any-rank-topic \
        --results benchmarks/results/any_rank_topic.json  # SmolLM2 on bbc-topic, fp32 and 4-bit (make any-rank-topic)
    python benchmarks/any_rank.py --tasks bbc-1ep --arms lora-r8,rowwise-distill,lora-first,lora-r1,lora-r2,lora-r4 \
        --ranks 1,2,4,8 --results /tmp/x.json --docs /tmp/docs   # some arms only, swept at four ranks

Each arm's sweep keeps the per-example validation losses and correctness, so every rule of
`dylora.app.report.pick_bases` is applied to it: "picked" (the default, prefer-svd: the SVD cut unless the prefix is
ahead beyond noise), "picked-metric" (the better accuracy), "picked-loss" (the lower mean loss), "picked-paired" (the
prefix unless the SVD cut's losses are lower beyond noise); "oracle" is the better basis on test, for scale. The
summary counts, per recipe and rule, the cells (seed x b) where the rule chose the worse basis and the points it lost
there, and gives the standard error over seeds of each paired gap.

Three phases. train: every arm (task, schedule, seed, method) is one `dylora.app.run.train` run whose adapter (at r)
and run.json (its train time) land in `<cache>/<task>-<schedule>/<arm>-s<seed>/` (default
$DYLORA_CACHE/any_rank, outside the repository), skipped when already there; one run at a time. eval: each cached
DyLoRA run and LoRA r=8 run is loaded and swept at b = 1..8 in both bases on validation and test
(`dylora.rank_sweep(..., basis="both")`), plus the spectrum of its update (the energy the first b singular values
hold), into `<arm>-s<seed>/any_rank.json`; everything goes to benchmarks/results/any_rank.json. docs: the tables
(docs/any-rank-tables.md) and the plot (docs/any-rank.png).

Cost: a DyLoRA arm's training time over its seed's LoRA r=8 run's, the two run one after the other (LoRA r=8
first, then the DyLoRA arms), with the machine's load average at each start and end recorded.
AURAC: the area under the rank-accuracy curve over b = 1..8 (trapezoids, unit spacing), over the area of the
rectangle of height 100 on the same range, so a flat 100% curve scores 100 (MatryoshkaLoRA, arXiv 2605.07850).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from reproduce import PLAN as REPRO_PLAN
from reproduce import Pool, log, run_once, stuck

R, ALPHA = 8, 16
RANKS = list(range(1, R + 1))
SHOWN = [1, 2, 4, 8]  # the ranks of the tables (LoRA is trained at these)
TASKS = ("bbc", "polarity", "tweets")
# SmolLM2 on bbc-headlines: benchmarks/generation.py's settings (the paper's NLG ones, scaled to 2 CPU cores); greedy
# decoding takes ~10 s a rank and split, so one seed, ranks 1, 2, 4, 8, and ROUGE-L picks (BLEU on 30 headlines
# moves by points between neighbouring ranks)
# SmolLM2 on bbc-topic: 16 words of an article -> its topic word; 400 training articles, 1 epoch (50 steps)
TOPIC = dict(model="smollm2", max_train=400, batch_size=8, eval_batch_size=32, max_length=64, epochs=1.0)
GENERATION = dict(model="smollm2", max_train=500, max_eval=30, batch_size=8, eval_batch_size=20, max_length=160,
                  lora_dropout=0.1, weight_decay=0.01, label_smoothing=0.1, epochs=1.0)
# (task, schedule) -> settings and lr: the reproduction's 1-epoch schedule (lr 3e-3), each at 3 epochs (lr 1e-3) and at
# 4 epochs (lr 2e-3; not in ORDER: run with --tasks bbc-4ep,...);
# optional: "seeds" (at most), "ranks" (swept), "metric" (compared and picked on)
SCHEDULES = {
    **{(t, "1ep"): dict(settings=REPRO_PLAN[t]["settings"], lr=3e-3) for t in ("bbc", "polarity", "tweets")},
    **{(t, "3ep"): dict(settings={**REPRO_PLAN[t]["settings"], "epochs": 3.0}, lr=1e-3)
       for t in ("bbc", "polarity", "tweets")},
    # 4 epochs at lr 2e-3: the schedule of issue 27's check on its own (unseen) task, here on ours
    **{(t, "4ep"): dict(settings={**REPRO_PLAN[t]["settings"], "epochs": 4.0}, lr=2e-3)
       for t in ("bbc", "polarity", "tweets")},
    ("bbc-headlines", "1ep"): dict(settings=GENERATION, lr=5e-4, seeds=1, ranks=SHOWN, metric="rougeL"),
    # SmolLM2 on bbc-topic (issue #28, item 5): one forward per example scores a rank (NLL of the reference topic
    # word, exact match = greedy decoding's), so 300 test articles cost seconds, not minutes; picked and compared on
    # perplexity (lower is better), exact match beside it ("also"), picked on perplexity too
    ("bbc-topic", "1ep"): dict(settings=TOPIC, lr=1e-3, seeds=3, ranks=SHOWN, metric="perplexity",
                               also=["exact_match"], lean=True,
                               arms=["lora-r8", "rowwise-distill", "lora-first-distill", "rowwise-top75", "lora-r1",
                                     "lora-r2", "lora-r4"]),
    # the same on a 4-bit base (QLoRA / QDyLoRA: nf4, double quant, fp32 compute), one seed, fewer arms
    ("bbc-topic", "4bit"): dict(settings={**TOPIC, "quantize": "4bit"}, lr=1e-3, seeds=1, ranks=SHOWN,
                                metric="perplexity", also=["exact_match"], lean=True,
                                arms=["lora-r8", "rowwise-distill", "lora-r1"]),
}
ORDER = [("bbc", "1ep"), ("polarity", "1ep"), ("tweets", "1ep"), ("bbc", "3ep"), ("tweets", "3ep"), ("polarity", "3ep"),
         ("bbc-headlines", "1ep"), ("bbc-topic", "1ep"), ("bbc-topic", "4bit")]  # by value per CPU minute
SEEDS = 3
RECIPES = {  # arm: the DyLoRA settings of that recipe
    "paper": dict(recipe="paper", distill=False),
    "rowwise": dict(recipe="rowwise", distill=False),
    "rowwise-distill": dict(recipe="rowwise", distill=True, distill_every=1),  # the teacher pass every step
    # the default with the rowwise pass's ranks drawn geometrically (p = 0.15: 21% of the rows at b = 1, 7% at r)
    "rowwise-distill-geo": dict(recipe="rowwise", distill=True, rank_distribution="geometric", geometric_p=0.15),
    # the default with distill_weight 0.25 (the rowwise pass's loss 0.75 task + 0.25 KL instead of 0.5 + 0.5)
    "rowwise-distill-w25": dict(recipe="rowwise", distill=True, distill_weight=0.25),
    # the r_max teacher pass on one step in 5: about 1 + 0.84 / 5 = 1.2x a LoRA step (the paired timing: the
    # teacher pass costs 0.84 of a LoRA step), the cost target
    "rowwise-distill-k5": dict(recipe="rowwise", distill=True, distill_every=5),
    # the r_max teacher on a random 1/8 or 1/4 of each batch's rows, every step: about 1.1x / 1.2x a LoRA step
    "rowwise-distill-f125": dict(recipe="rowwise", distill=True, distill_fraction=0.125),
    "rowwise-distill-f25": dict(recipe="rowwise", distill=True, distill_fraction=0.25),
    # one rowwise pass with half of every batch's rows at r_max, the other half spread over the ranks below it
    # (uniformly, or geometrically: favouring rank 1): 1 pass a step, no teacher
    "rowwise-top50": dict(recipe="rowwise", distill=False, top_share=0.5),
    "rowwise-top50-geo": dict(recipe="rowwise", distill=False, top_share=0.5, rank_distribution="geometric",
                              geometric_p=0.3),
    "rowwise-top75": dict(recipe="rowwise", distill=False, top_share=0.75),
    # the same, the ranks below r drawn geometrically (p = 0.3: about 8% of the rows at b = 1, 6% at b = 2)
    "rowwise-top75-geo": dict(recipe="rowwise", distill=False, top_share=0.75, rank_distribution="geometric",
                              geometric_p=0.3),
    "rowwise-top50-sqrt": dict(recipe="rowwise", distill=False, top_share=0.5, rank_scaling="alpha/sqrt(b)"),
    # 3/4 of the rows at r_max, and the r_max teacher on one step in 5: about 1 + 1.06 / 5 = 1.2x
    "rowwise-top75-k5": dict(recipe="rowwise", distill=True, distill_every=5, top_share=0.75),
    # re-basis into singular-value order after every 10th step, optimizer state of A and B reset: 1 pass a step
    "rowwise-rebasis10": dict(recipe="rowwise", distill=False, rebasis_every=10),
    # the same, with the Adam moments of A and B rotated with them (rebasis_state="rotate") instead of reset
    "rowwise-rebasis10-rot": dict(recipe="rowwise", distill=False, rebasis_every=10, rebasis_state="rotate"),
    # LoRA at r for half the steps, one re-basis, then rowwise: 1 pass a step
    "lora-first": dict(recipe="rowwise", distill=False, lora_first=0.5),
    # LoRA at r for 80% of the steps, one re-basis, then rowwise with the r teacher: 0.8 + 0.2 x 1.84 = 1.17x
    "lora-first-distill": dict(recipe="rowwise", distill=True, lora_first=0.8),
}
DEFAULT_RECIPE = "rowwise-distill"
LOWER_IS_BETTER = ("perplexity", "nll")
TOLERANCE = {"perplexity": 1.0}  # the target: within 1% perplexity, else 0.5 points


def tolerance(metric: str) -> float:
    return TOLERANCE.get(metric, 0.5)

SWEPT = ("lora-r8", *RECIPES)  # the arms the eval phase sweeps at every b
# train order within a seed: LoRA r=8 first, then the DyLoRA arms it is paired with, then the other LoRA ranks
ARMS = {"lora-r8": dict(method="lora", r=8), **{k: dict(method="dylora", **v) for k, v in RECIPES.items()},
        **{f"lora-r{b}": dict(method="lora", r=b) for b in (1, 2, 4)}}
NOT_RUN: list[str] = []


def select_arms(names: list[str]) -> None:
    """Keep only the arms `names` (in their order here; --arms): ARMS, RECIPES and SWEPT are cut in place."""
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(unknown)}: choose from {', '.join(ARMS)}")
    for table in (ARMS, RECIPES):
        for arm in [a for a in table if a not in names]:
            del table[arm]
    global SWEPT
    SWEPT = tuple(a for a in SWEPT if a in names)


def schedule_arms(task: str, schedule: str) -> list[str]:
    """The arms (of ARMS, in its order) this task-schedule trains (some train fewer: "arms" in SCHEDULES)."""
    only = SCHEDULES[task, schedule].get("arms")
    return [arm for arm in ARMS if only is None or arm in only]


def schedule_seeds(task: str, schedule: str, seeds: range) -> range:
    """The seeds of `seeds` this task-schedule runs (some run fewer: "seeds" in SCHEDULES)."""
    return range(seeds.start, min(seeds.stop, SCHEDULES[task, schedule].get("seeds", seeds.stop)))


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def cache_root() -> Path:
    from dylora.app.registry import cache_dir

    return cache_dir() / "any_rank"


def arm_dir(root: Path, task: str, schedule: str, arm: str, seed: int) -> Path:
    return root / f"{task}-{schedule}" / f"{arm}-s{seed}"


# ---------------------------------------------------------------- phase 1: training


def train_job(out: Path, s) -> dict:
    """One arm (or its cached directory), with the load average at its start and end."""
    done = (out / "sweep.json").is_file()
    load0 = load_avg()
    res = run_once(out, s)
    if not done:
        (out / "load.json").write_text(json.dumps({"load_start": load0, "load_end": load_avg()}))
    return res


def _job(kind: str, *args) -> dict:
    return {"train": train_job, "eval": eval_job}[kind](*args)


def train_jobs(plan: list[tuple[str, str]], seeds: range, root: Path) -> dict:
    """{(task, schedule, seed, arm): job}, in the order they should run."""
    from dylora.app.settings import Settings

    jobs = {}
    for task, schedule in plan:
        spec = SCHEDULES[task, schedule]
        # guard off: a run stuck at chance is a result here (listed), not a stop
        base = Settings(**{"model": "minilm", **spec["settings"]}, data=task, r=R, lora_alpha=ALPHA, lr=spec["lr"],
                        guard=False)
        for seed in schedule_seeds(task, schedule, seeds):
            for arm in schedule_arms(task, schedule):
                kw = ARMS[arm]
                # the eval phase sweeps every b in both bases: the run's own sweep is cut to b = r, prefix
                extra = dict(ranks=[R], basis="prefix") if kw["method"] == "dylora" else {}
                jobs[task, schedule, seed, arm] = ("train", arm_dir(root, task, schedule, arm, seed),
                                                   replace(base, seed=seed, **kw, **extra))
    return jobs


def train_all(jobs: dict, pool: Pool, progress: Path | None) -> None:
    """One run at a time, in order; the progress file gets a line per finished arm."""
    t0 = time.perf_counter()
    for i, (key, job) in enumerate(jobs.items()):
        cached = (job[1] / "sweep.json").is_file()
        res = pool.map({key: job})[key]
        if progress is not None and not cached:
            with progress.open("a") as f:
                f.write(f"- {time.strftime('%H:%M:%S')} trained {'/'.join(map(str, key))}: train "
                        f"{res['timings']['train_s']:.0f} s, total {res['timings']['total_s']:.0f} s "
                        f"({i + 1}/{len(jobs)}, {(time.perf_counter() - t0) / 60:.1f} min this invocation)\n")


def timing_order() -> list[str]:
    """LoRA r=8, each recipe, LoRA r=8, ..., LoRA r=8: the sequence the timing phase trains."""
    return [arm for recipe in RECIPES for arm in ("lora-r8", recipe)] + ["lora-r8"]


def timing(root: Path, pool: Pool) -> dict:
    """Each recipe's training time between two LoRA r=8 runs (bbc, 1 epoch, seed 0; one run at a time, in the
    order LoRA, recipe, LoRA, recipe, ..., LoRA): its time over the mean of its two neighbours', so a load that
    drifts slowly hits both sides alike. Runs go to <cache>/bbc-1ep/timing/ and are reused."""
    jobs = train_jobs([("bbc", "1ep")], range(1), root)
    order = timing_order()
    times = []
    for i, arm in enumerate(order):
        _, _, s = jobs["bbc", "1ep", 0, arm]
        out = root / "bbc-1ep" / "timing" / f"{i}-{arm}"
        res = pool.map({0: ("train", out, s)})[0]
        times.append(res["timings"]["train_s"])
    return {"order": order, "train_s": times,
            "ratio": {arm: times[i] / ((times[i - 1] + times[i + 1]) / 2) for i, arm in enumerate(order)
                      if arm != "lora-r8"}}


# ---------------------------------------------------------------- phase 2: evaluation


def lora_layers(model) -> dict:
    """The adapted layers of the model's default adapter, by name."""
    from peft.tuners.lora.layer import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A}


def spectrum(model) -> dict:
    """Energy of the learned update dW = c(r) B A held by its first b singular values, sum_{i<=b} s_i^2 / sum s_i^2,
    per b = 1..r: the mean and the minimum over layers."""
    from dylora.functional import rank_coefficient, svd_factors

    fractions = []
    for module in lora_layers(model).values():
        v = module.lora_variant["default"]
        _, _, s = svd_factors(module.lora_A["default"].weight, module.lora_B["default"].weight,
                              rank_coefficient(v.r, v.lora_alpha, v.rank_scaling))
        e = (s ** 2).cumsum(0) / (s ** 2).sum()
        fractions.append([float(x) for x in e])
    return {"mean": [statistics.fmean(f[b] for f in fractions) for b in range(len(fractions[0]))],
            "min": [min(f[b] for f in fractions) for b in range(len(fractions[0]))], "layers": len(fractions)}


def eval_job(path: Path, run: Path, ranks: list[int] = RANKS, lean: bool = False) -> dict:
    """Sweep one cached DyLoRA or LoRA r=8 run at `ranks` (b = 1..r) in both bases
    (`dylora.rank_sweep(basis="both")`) on validation and test, with the spectrum of its update (or read it back).

    `lean` (for a slow model): nothing is evaluated twice. At b = r both bases are the same update (the SVD basis
    at full rank is a rotation of the prefix), which the run's own sweep already scored: that row stands for both.
    A plain LoRA's SVD cut is scored on test only (no pick reads its validation)."""
    if path.is_file():
        return json.loads(path.read_text())
    import dylora
    from dylora import files
    from dylora.app.run import default_basis, load_run, token_budget

    log(f"eval {run}")
    t0 = time.perf_counter()
    model, _, saved, task = load_run(run, with_data=True)
    task.encode(token_budget(saved.settings, task, model.config))

    def evaluate(m) -> dict:  # with per-example losses on validation where the task gives them (the paired pick)
        return {f"{split}_{k}": v for split in ("validation", "test") for k, v in
                (task.evaluate(m, split, examples=True) if split == "validation" and
                 getattr(task, "example_scores", False) else task.evaluate(m, split)).items()}

    # a plain LoRA: the SVD cut only (its prefix cut is the paper's truncated LoRA, not an arm here)
    basis = default_basis(saved)
    own: list[dict] = []
    if lean:
        r = saved.config.r
        row = next((x for x in json.loads((run / "sweep.json").read_text())["rows"]
                    if x["rank"] == r and x["basis"] == "prefix"), None)
        assert row is not None, f"{run}: its own sweep has no prefix row at r = {r}"
        splits = ("test",) if basis == "svd" else ("validation", "test")
        scores = {k: v for k, v in row.items() if k.split("_", 1)[0] in splits}
        own = [{"rank": r, "basis": b, **scores} for b in (("svd",) if basis == "svd" else ("prefix", "svd"))
               if r in ranks]
        ranks = [b for b in ranks if b < r]
        if basis == "svd":
            def evaluate(m) -> dict:  # noqa: F811  (test only)
                return {f"test_{k}": v for k, v in task.evaluate(m, "test").items()}
    rows = [{"rank": r.rank, "basis": r.basis, **r.metrics}
            for r in dylora.rank_sweep(model, evaluate, ranks=ranks, basis=basis, progress=False)] + own
    res = {"rows": rows, "spectrum": spectrum(model), "eval_s": round(time.perf_counter() - t0, 1),
           "sizes": {split: len(task.encoded[split]) for split in ("validation", "test")}}
    files.write_text(path, json.dumps(res, indent=1))
    log(f"evaluated {run} ({res['eval_s']:.0f} s)")
    return res


def eval_all(plan: list[tuple[str, str]], seeds: range, root: Path, pool: Pool, cached_only: bool = False) -> dict:
    """Evaluate every trained arm of the plan; {task-schedule: {"seeds": {seed: {arm: result}}}}, only the seeds with
    every arm trained (and, with `cached_only`, already evaluated); the others under "incomplete"."""
    out: dict = {}
    for task, schedule in plan:
        key = f"{task}-{schedule}"
        spec = SCHEDULES[task, schedule]
        entry = out[key] = {"task": task, "schedule": schedule, "settings": spec["settings"], "lr": spec["lr"],
                            "seeds": {}, "metric": spec.get("metric"), "also": spec.get("also", [])}
        for seed in schedule_seeds(task, schedule, seeds):
            arms = schedule_arms(task, schedule)
            missing = [arm for arm in arms if not (arm_dir(root, task, schedule, arm, seed) / "sweep.json").is_file()
                       or (cached_only and arm in SWEPT and not (arm_dir(root, task, schedule, arm, seed)
                                                                 / "any_rank.json").is_file())]
            if missing:  # only seeds with every arm trained are compared (paired by seed)
                if len(missing) < len(arms):
                    entry.setdefault("incomplete", {})[str(seed)] = missing
                continue
            runs: dict = {}
            for arm in arms:
                d = arm_dir(root, task, schedule, arm, seed)
                trained = run_once(d, None)
                load = json.loads((d / "load.json").read_text()) if (d / "load.json").is_file() else {}
                runs[arm] = {"train_s": trained["timings"]["train_s"], "total_s": trained["timings"]["total_s"],
                             "metric": trained["metric"],
                             "own": trained["rows"][0], "stuck": stuck(trained), **load}
                if arm in SWEPT:
                    res = pool.map({0: ("eval", d / "any_rank.json", d, spec.get("ranks", RANKS),
                                        spec.get("lean", False))})[0]
                    runs[arm].update(sweep=res["rows"], spectrum=res["spectrum"], eval_s=res["eval_s"])
            entry["seeds"][str(seed)] = runs
    return out


# ---------------------------------------------------------------- summaries (pure: tested in tests/)


# the rows of a DyLoRA arm: each basis; the pick on validation by each rule of dylora.app.report.pick_bases: "picked"
# by `dylora train`'s default rule (what export uses: the SVD cut unless the prefix is better beyond noise), and by
# the better accuracy ("picked-metric", the default until 2026-12-08: "picked" in older results), the mean loss and
# the paired loss test; and the better basis on test (an oracle)
BASIS_ROWS = ("prefix", "svd", "picked", "picked-metric", "picked-loss", "picked-paired", "oracle")
PICK_RULES = ("picked", "picked-metric", "picked-loss", "picked-paired", "prefix", "svd")
PICK_LABELS = {"picked": "prefer the SVD cut (the default)", "picked-metric": "accuracy",
               "picked-loss": "mean loss", "picked-paired": "paired loss test", "prefix": "always prefix",
               "svd": "always SVD"}
RULE_OF = {"picked-metric": "metric", "picked-loss": "loss", "picked-paired": "paired"}  # and "picked": the default


def aurac(acc: dict[int, float], ranks: list[int] = RANKS) -> float:
    """Area under the rank-accuracy curve over `ranks` (trapezoids on b), over 100 x the width of the range: in
    [0, 100], 100 for a curve at 100% everywhere (MatryoshkaLoRA's AURAC)."""
    bs = sorted(ranks)
    area = sum((acc[a] + acc[b]) / 2 * (b - a) for a, b in zip(bs, bs[1:], strict=False))
    return area / (bs[-1] - bs[0])


def better(metric: str, a: float, b: float) -> bool:
    """Whether score a is strictly better than b (perplexity, NLL: lower)."""
    return a < b if metric in LOWER_IS_BETTER else a > b


def curves(sweep: list[dict], metric: str, pick_on: str | None = None) -> dict[str, dict[str, dict[int, float]]]:
    """{basis: {split: {b: score}}} of one sweep, plus a row per pick rule (PICK_RULES, `dylora.app.report.pick_bases`
    on the validation rows, scored on validation `pick_on`, default `metric`, and on test in `metric`) and "oracle"
    (the better basis on test, prefix on a tie); each such row's "choice" holds the basis chosen at each b."""
    from dylora.app.report import pick_bases
    from dylora.app.settings import Settings
    from dylora.sweep import SweepRow

    pick_on = pick_on or metric
    out: dict = {}
    val_rows = []
    for row in sweep:  # (a lean sweep of a plain LoRA has no validation scores)
        for split in ("validation", "test"):
            if f"{split}_{metric}" in row:
                out.setdefault(row["basis"], {}).setdefault(split, {})[int(row["rank"])] = row[f"{split}_{metric}"]
        if f"validation_{pick_on}" in row:
            extra = {k.removeprefix("validation_"): row[k] for k in ("validation_example_loss",
                                                                    "validation_example_correct") if k in row}
            val_rows.append(SweepRow(int(row["rank"]), {pick_on: row[f"validation_{pick_on}"]}, 0, extra,
                                     row["basis"]))
    if "prefix" not in out:  # a plain LoRA: its SVD cut only
        return out
    pre, svd = out["prefix"], out["svd"]
    higher = pick_on not in LOWER_IS_BETTER
    rules = {name: pick_bases(val_rows, pick_on, higher, RULE_OF.get(name, Settings.basis_rule), R)
             for name in ("picked", *RULE_OF)}
    rules["oracle"] = {b: "svd" if better(metric, svd["test"][b], pre["test"][b]) else "prefix" for b in pre["test"]}
    for name, rule in rules.items():
        out[name] = {split: {b: out[rule[b]][split][b] for b in rule} for split in ("validation", "test")}
        out[name]["choice"] = rule
    return out


def summarise(evaluated: dict) -> dict:
    """Per task-schedule: each arm's mean ± std test curve over seeds at b = 1..8 (LoRA trained at b: only its b),
    AURAC, cost (train time over its seed's LoRA r=8 run's), the spectra, and the targets; a task-schedule with
    metrics "also" compared gets one more summary per such metric (key "<key>/<metric>"), its bases picked on the
    first metric."""
    summary: dict = {}
    for key, entry in evaluated.items():
        seeds = entry["seeds"]
        if not seeds:
            summary[key] = {**{k: entry[k] for k in ("task", "schedule", "settings", "lr")}, "seeds_run": 0,
                            "incomplete": entry.get("incomplete", {})}
            continue
        metric = entry.get("metric") or next(iter(next(iter(seeds.values())).values()))["metric"]
        for m in [metric, *entry.get("also", [])]:
            summary[key if m == metric else f"{key}/{m}"] = summarise_one(entry, m, metric)
    return summary


def summarise_one(entry: dict, metric: str, pick_on: str) -> dict:
    """One task-schedule's summary in `metric`, the bases picked on validation `pick_on`."""
    seeds = entry["seeds"]
    per_arm: dict[str, list[dict[int, float]]] = {}
    costs: dict[str, list[float]] = {}
    spectra: dict[str, list[list[float]]] = {}
    choices: dict[str, list[dict[int, str]]] = {}
    picks: dict[str, dict[str, list[float]]] = {}
    stuck_runs = []
    times: dict[str, dict[str, list[float]]] = {}
    for seed, runs in seeds.items():
        stuck_runs += [f"{arm}-s{seed}" for arm, r in runs.items() if r["stuck"]]
        # LoRA trained at each b of SHOWN that this schedule trains (4-bit: b = 1 and 8 only)
        lora = {b: runs[f"lora-r{b}"]["own"][f"test_{metric}"] for b in SHOWN if f"lora-r{b}" in runs}
        if lora:
            per_arm.setdefault("lora-at-b", []).append(lora)
        for arm, r in runs.items():
            times.setdefault(arm, {}).setdefault("train_s", []).append(r["train_s"])
            if r.get("total_s") is not None:  # the run's own evaluation (at r) and loading: total - train
                times[arm].setdefault("own_s", []).append(r["total_s"] - r["train_s"])
            if r.get("eval_s") is not None:
                times[arm].setdefault("eval_s", []).append(r["eval_s"])
        if "lora-r8" in runs:
            c = curves(runs["lora-r8"]["sweep"], metric, pick_on)
            per_arm.setdefault("lora-r8-svd", []).append(c["svd"]["test"])
            spectra.setdefault("lora-r8", []).append(runs["lora-r8"]["spectrum"]["mean"])
        for arm in RECIPES:
            if arm not in runs:
                continue
            c = curves(runs[arm]["sweep"], metric, pick_on)
            for basis in BASIS_ROWS:
                if basis in c:
                    per_arm.setdefault(f"{arm}-{basis}", []).append(c[basis]["test"])
            for rule in PICK_RULES:
                if rule in c:  # cells (b in SHOWN) where the rule chose the worse basis on test, and the loss
                    lost = [(c["oracle"]["test"][b] - c[rule]["test"][b]) * sign(metric) for b in SHOWN]
                    picks.setdefault(arm, {}).setdefault(rule, []).extend(lost)
            choices.setdefault(arm, []).append(c["picked"]["choice"])
            spectra.setdefault(arm, []).append(runs[arm]["spectrum"]["mean"])
            if "lora-r8" in runs:
                costs.setdefault(arm, []).append(runs[arm]["train_s"] / runs["lora-r8"]["train_s"])
    arms = {}
    for arm, cs in per_arm.items():
        bs = sorted(cs[0])
        # AURAC of one run's curve over b = 1..8 (trapezoids over the ranks swept: 1, 2, 4, 8 for generation);
        # none for LoRA trained at b, four runs
        arms[arm] = {"seeds": len(cs), "test": {b: mean_std([c[b] for c in cs]) for b in bs},
                     "aurac": mean_std([aurac(c, bs) for c in cs]) if arm != "lora-at-b" and bs[-1] == R
                     and metric not in LOWER_IS_BETTER else None}
    return {**{k: entry[k] for k in ("task", "schedule", "settings", "lr")}, "metric": metric,
        "picked_on": pick_on, "times": {arm: {k: statistics.fmean(v) for k, v in t.items()}
                                        for arm, t in times.items()},
        "seeds_run": len(seeds), "arms": arms,
        "cost": {arm: {"mean": statistics.fmean(v), "per_seed": v} for arm, v in costs.items()},
        "spectrum": {arm: [statistics.fmean(s[b] for s in v) for b in range(R)]
                     for arm, v in spectra.items()},
        "choices": {arm: {b: sum(c[b] == "svd" for c in v) for b in sorted(v[0])}
                    for arm, v in choices.items()},
        "stuck": stuck_runs, "targets": targets(arms, paired_gaps(per_arm, metric), metric),
        "picks": {arm: {rule: {"wrong": sum(x > 0 for x in v), "cells": len(v),
                               "lost": statistics.fmean(v)} for rule, v in rules.items()}
                  for arm, rules in picks.items()},
        "incomplete": entry.get("incomplete", {})}


def int_keys(d: dict) -> dict:
    """json.loads hook: rank keys ("1".."8") back to ints."""
    return {int(k) if k.isdigit() else k: v for k, v in d.items()}


def mean_std(xs: list[float]) -> list[float]:
    return [statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]


def sign(metric: str) -> int:
    return -1 if metric in LOWER_IS_BETTER else 1


def gap(metric: str, picked: float, ref: float) -> float:
    """How far picked is ahead of ref (negative: behind): points, or for a lower-is-better metric (perplexity) the
    percentage of ref, 100 (ref - picked) / ref."""
    return 100 * (ref - picked) / ref if metric in LOWER_IS_BETTER else picked - ref


def best_lora(per_arm: dict[str, list[dict[int, float]]], metric: str, b: int) -> str | None:
    """The LoRA arm (trained at b, or LoRA r=8 + SVD cut) better at b on the mean over seeds' curves (None: neither
    has b)."""
    have = [a for a in ("lora-at-b", "lora-r8-svd") if a in per_arm and all(b in c for c in per_arm[a])]
    return max(have, key=lambda a: sign(metric) * statistics.fmean(c[b] for c in per_arm[a])) if have else None


def paired_gaps(per_arm: dict[str, list[dict[int, float]]], metric: str = "accuracy") -> dict[str, dict[int, float]]:
    """Per DyLoRA recipe and b: the standard error over seeds of gap(picked, the LoRA arm better on the mean at b),
    the two paired by seed (same seed, same split)."""
    out: dict = {}
    if "lora-at-b" not in per_arm or "lora-r8-svd" not in per_arm:
        return out
    for arm in RECIPES:
        picked = per_arm.get(f"{arm}-picked")
        if not picked or len(picked) != len(per_arm["lora-at-b"]) or len(picked) < 2:
            continue
        out[arm] = {}
        for b in SHOWN:
            best = best_lora(per_arm, metric, b)
            if best is None:
                continue
            d = [gap(metric, p[b], q[b]) for p, q in zip(picked, per_arm[best], strict=True)]
            out[arm][b] = statistics.stdev(d) / len(d) ** 0.5
    return out


def targets(arms: dict, se: dict | None = None, metric: str = "accuracy") -> dict:
    """Per DyLoRA recipe: gap(picked at b, the better of LoRA trained at b and LoRA r=8 + SVD cut) at b = 1, 2, 4, 8
    (means over seeds; a b without LoRA trained at it: the SVD cut), with the paired difference's standard error over
    seeds where given; the target is gap >= -TOLERANCE at every b (0.5 points; perplexity: 1%)."""
    out: dict = {}
    if "lora-r8-svd" not in arms:
        return out
    test = {a: [{b: v[0] for b, v in arms[a]["test"].items()}] for a in ("lora-at-b", "lora-r8-svd") if a in arms}
    for arm in RECIPES:
        if f"{arm}-picked" not in arms:
            continue
        gaps = {}
        for b in SHOWN:
            ref = best_lora(test, metric, b)
            gaps[b] = gap(metric, arms[f"{arm}-picked"]["test"][b][0], test[ref][0][b])
        out[arm] = {"gap": gaps, "met": all(g >= -tolerance(metric) for g in gaps.values())}
        if se and arm in se:
            out[arm]["se"] = se[arm]
    return out


# ---------------------------------------------------------------- phase 3: tables and plot

LABELS = {
    "lora-at-b": "LoRA trained at r = b",
    "lora-r8-svd": "LoRA r=8 + SVD cut",
    **{f"{arm}-{basis}": f"DyLoRA {arm}, {basis}" for arm in RECIPES for basis in BASIS_ROWS},
}


def cell(ms: list[float] | None, digits: int = 1) -> str:
    return "" if ms is None else f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def digits(metric: str) -> int:
    """Decimals of a table cell: perplexity near 1 needs three."""
    return 3 if metric in LOWER_IS_BETTER else 1


def table_lines(key: str, t: dict, paired: dict | None = None) -> list[str]:
    """The markdown of one task-schedule: test accuracy per arm at b = 1, 2, 4, 8, AURAC, cost (`paired`: the
    timing phase's ratios, else the per-seed ones), targets, spectra."""
    title = f"### {t['task']}, {t['schedule']}" + (f", {t['metric']}" if "picked_on" in t else "") \
        + f" (lr {t['lr']:g}, {t['settings']})"
    partial = "".join(f" Seed {sd} not finished (not trained: {', '.join(m)}), left out." for sd, m in
                      t.get("incomplete", {}).items())
    if not t.get("seeds_run"):
        return [title, "", "Not run (no CPU time left in this session)." + partial, ""]
    arms = t["arms"]
    metric, nd = t["metric"], digits(t["metric"])
    scale = "lower is better" if metric in LOWER_IS_BETTER else "0-100"
    picked_on = f"; bases picked on validation {t['picked_on']}" if t.get("picked_on", metric) != metric else ""
    lines = [title, "", f"Test {metric} ({scale}), mean ± std over {t['seeds_run']} seed(s){picked_on}; AURAC over "
             "b = 1..8 (0-100); cost = training time / LoRA r=8's"
             + (" (the paired timing below)." if paired else " (the same seed's, mean over seeds).") + partial, "",
             "| arm | " + " | ".join(f"b={b}" for b in SHOWN) + " | AURAC | cost |",
             "|---|" + "---|" * (len(SHOWN) + 2)]
    for arm, label in LABELS.items():
        if arm not in arms:
            continue
        row = arms[arm]
        recipe = arm.rsplit("-", 1)[0]
        cost = None
        if arm.startswith(tuple(RECIPES)) and arm.endswith("picked"):
            cost = paired.get(recipe) if paired else t["cost"].get(recipe, {}).get("mean")
        cost_cell = f"{cost:.2f}x" if cost else ("1.00x" if arm == "lora-r8-svd" else "")
        lines.append(f"| {label} | " + " | ".join(cell(row["test"].get(b), nd) for b in SHOWN)
                     + f" | {cell(row['aurac'])} | {cost_cell} |")
    if t["targets"]:
        if metric in LOWER_IS_BETTER:
            rule = (f"100 (best - picked) / best, best = the lower of LoRA trained at b and LoRA r=8 + SVD cut, "
                    f">= -{tolerance(metric):g}% at every b (means; a b without LoRA trained at it: the SVD cut)")
        else:
            rule = (f"picked DyLoRA - max(LoRA trained at b, LoRA r=8 + SVD cut) >= -{tolerance(metric):g} at every b "
                    "(means)")
        lines += ["", f"Target: {rule}:", "", "| recipe | " + " | ".join(f"b={b}" for b in SHOWN) + " | met |",
                  "|---|" + "---|" * (len(SHOWN) + 1)]
        for arm, g in t["targets"].items():
            se = g.get("se") or {}
            lines.append(f"| {arm} | " + " | ".join(f"{g['gap'][b]:+.{nd - 1 if nd > 1 else 1}f}"
                                                     + (f" ({se[b]:.{nd - 1 if nd > 1 else 1}f})" if b in se else "")
                                                     for b in SHOWN)
                         + f" | {'yes' if g['met'] else 'no'} |")
        if any(g.get("se") for g in t["targets"].values()):
            lines += ["", "In brackets: the standard error over seeds of the paired difference (same seed and split) "
                      "between the picked DyLoRA and the LoRA arm better on the mean at that b."]
    if t.get("picks"):
        lines += ["", "Basis picks on validation, against the better basis on test: cells (seed x b in "
                  f"{', '.join(map(str, SHOWN))}) where the pick was the worse basis / all cells, and the mean test "
                  + ("perplexity" if metric in LOWER_IS_BETTER else "points") + " lost per cell:", "",
                  "| recipe | " + " | ".join(f"validation {t['picked_on']}" if r == "picked" and "picked_on" in t
                                             else PICK_LABELS[r] for r in PICK_RULES) + " |",
                  "|---|" + "---|" * len(PICK_RULES)]
        for arm, rules in t["picks"].items():
            lines.append(f"| {arm} | " + " | ".join(
                f"{rules[r]['wrong']}/{rules[r]['cells']}, {rules[r]['lost']:.{nd + 1}f}" if r in rules else ""
                for r in PICK_RULES) + " |")
    if t.get("times"):
        lines += ["", "Time per arm (s, mean over seeds; one torch thread, one run at a time): training + the run's "
                  "own evaluation at r with loading + the eval phase's sweep (the other b; both bases for DyLoRA, the "
                  "SVD cut for LoRA r=8): " + "; ".join(
                      f"{arm} {tm['train_s']:.0f}" + "".join(f" + {tm[k]:.0f}" for k in ("own_s", "eval_s") if k in tm)
                      for arm, tm in t["times"].items()) + "."]
    if t["cost"]:
        lines += ["", "Cost per seed (training time over the same seed's LoRA r=8 run, trained minutes before it; "
                  "dominated by the shared machine's load, not a cost figure): "
                  + "; ".join(f"{arm} {' / '.join(f'{x:.2f}' for x in c['per_seed'])}" for arm, c in t["cost"].items())
                  + "."]
    if t["choices"]:
        lines += ["", "Seeds whose validation picked the SVD basis, at each b swept: "
                  + "; ".join(f"{arm} {' '.join(str(v[b]) for b in sorted(v))}" for arm, v in t["choices"].items())
                  + "."]
    if t["spectrum"]:
        lines += ["", "Energy of the learned update held by its first b singular values (mean over layers and seeds):",
                  "", "| run | " + " | ".join(f"b={b}" for b in SHOWN[:-1]) + " |", "|---|" + "---|" * (len(SHOWN) - 1)]
        for arm, e in t["spectrum"].items():
            lines.append(f"| {arm} | " + " | ".join(f"{100 * e[b - 1]:.0f}%" for b in SHOWN[:-1]) + " |")
    if t["stuck"]:
        lines += ["", "Runs that never left chance: " + ", ".join(f"`{r}`" for r in t["stuck"]) + "."]
    return [*lines, ""]


def write_docs(summary: dict, docs: Path, command: str, name: str = "any-rank") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs.mkdir(parents=True, exist_ok=True)
    lines = ["# Any rank after training: the per-seed tables behind results.md and the README", "",
             f"<!-- written by: {command} -->", ""]
    for key, t in summary.items():
        if not key.startswith("_"):
            lines += table_lines(key, t, summary.get("_timing", {}).get("ratio"))
    if "_timing" in summary:
        tm = summary["_timing"]
        lora = ", ".join(f"{x:.0f}" for x, a in zip(tm["train_s"], tm["order"], strict=True) if a == "lora-r8")
        lines += ["Cost, paired (bbc, 1 epoch, seed 0; each recipe trained between two LoRA r=8 runs, one run at a "
                  "time; its training time over the mean of its neighbours'): "
                  + ", ".join(f"{arm} {r:.2f}x" for arm, r in tm["ratio"].items())
                  + f" (the LoRA r=8 runs: {lora} s).", ""]
    lines += [f"Not run: {x}." for x in NOT_RUN]
    run = [k for k, t in summary.items() if not k.startswith("_") and t.get("seeds_run")]
    if run:
        fig, axes = plt.subplots(2, len(run), figsize=(4.6 * len(run), 7.4), dpi=110, squeeze=False)
        for j, key in enumerate(run):
            t, ax, sx = summary[key], axes[0][j], axes[1][j]
            for arm, style in (("lora-r8-svd", "-"), *((f"{a}-picked", "-") for a in RECIPES),
                               (f"{DEFAULT_RECIPE}-prefix", "--")):
                if arm in t["arms"]:
                    test = t["arms"][arm]["test"]
                    ax.plot(sorted(test), [test[b][0] for b in sorted(test)], style, marker=".", label=LABELS[arm])
            if "lora-at-b" in t["arms"]:
                test = t["arms"]["lora-at-b"]["test"]
                ax.plot(sorted(test), [test[b][0] for b in sorted(test)], "ks", label=LABELS["lora-at-b"])
            ax.set_title(f"{t['task']}, {t['schedule']} ({t['seeds_run']} seed(s))")
            for arm, e in t["spectrum"].items():
                sx.plot(RANKS, [100 * x for x in e], marker=".", label=arm)
            unit = "" if t["metric"] in LOWER_IS_BETTER else " (%)"
            for axis, ylabel in ((ax, f"test {t['metric']}{unit}"), (sx, "energy in the first b singular values (%)")):
                axis.set(xlabel="rank b", ylabel=ylabel, xticks=RANKS)
                axis.grid(alpha=0.3)
                axis.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(docs / f"{name}.png")
        plt.close(fig)
        lines += ["", f"![any rank]({name}.png)"]
    (docs / f"{name}-tables.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phase", default="train,timing,eval,docs", help="comma-separated phases: train, timing, eval, "
                    "docs")
    ap.add_argument("--tasks", default=None, help="comma-separated task-schedule pairs, e.g. bbc-1ep,bbc-3ep "
                    f"(default: {','.join(f'{t}-{s}' for t, s in ORDER)})")
    ap.add_argument("--seeds", type=int, default=SEEDS)
    ap.add_argument("--cache", type=Path, default=None, help="where arms are trained to (default "
                    "$DYLORA_CACHE/any_rank)")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. seeds-1 (to split the work)")
    ap.add_argument("--cached-only", action="store_true", help="eval: use only arms already evaluated (no new "
                    "sweeps; a seed with one missing is left out)")
    ap.add_argument("--progress", type=Path, default=None, help="append a line per trained arm to this file")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the one worker (default 1: the "
                    "machine is shared, and one thread degrades least under load)")
    ap.add_argument("--ranks", default=None, help="eval: comma-separated ranks to sweep (default: 1..8; e.g. 1,2,4,8 "
                    "to halve the sweeps; AURAC is then the trapezoids over those ranks)")
    ap.add_argument("--arms", default=None, help=f"comma-separated arms to train and compare (default: all of "
                    f"{', '.join(ARMS)})")
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/any_rank.json"))
    ap.add_argument("--docs", type=Path, default=Path("docs"))
    ap.add_argument("--name", default="any-rank", help="docs: the tables go to <docs>/<name>-tables.md, the plot to "
                    "<docs>/<name>.png")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.arms:
        try:
            select_arms(args.arms.split(","))
        except ValueError as err:
            ap.error(str(err))
    if args.ranks:
        for spec in SCHEDULES.values():
            spec["ranks"] = [int(b) for b in args.ranks.split(",")]
    phases = set(args.phase.split(","))
    if phases - {"train", "timing", "eval", "docs"}:
        ap.error(f"unknown phase(s) {sorted(phases - {'train', 'timing', 'eval', 'docs'})}; choose from train, "
                 "timing, eval, docs")
    plan = ORDER
    if args.tasks:
        plan = [tuple(t.rsplit("-", 1)) for t in args.tasks.split(",")]
        bad = [p for p in plan if p not in SCHEDULES]
        if bad:
            ap.error(f"unknown task-schedule(s) {bad}; choose from {', '.join(f'{t}-{s}' for t, s in ORDER)}")
    root = args.cache or cache_root()
    seeds = range(args.first_seed, args.seeds)
    pool = Pool(1, args.threads, job=_job)
    if "train" in phases:
        train_all(train_jobs(plan, seeds, root), pool, args.progress)
    timed = root / "timing.json"
    # timed again when the recipes changed (a recipe added: its runs are trained, the others' are reused)
    if "timing" in phases and (not timed.is_file() or json.loads(timed.read_text())["order"] != timing_order()):
        timed.write_text(json.dumps(timing(root, pool)))
    if "eval" in phases:
        evaluated = eval_all(plan, seeds, root, pool, args.cached_only)
        summary = {**summarise(evaluated), "_not_run": NOT_RUN}
        if timed.is_file():
            summary["_timing"] = json.loads(timed.read_text())
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(summary, indent=1))
        log(f"numbers in {args.results}")
    if "docs" in phases:
        write_docs(json.loads(args.results.read_text(), object_hook=int_keys), args.docs,
                   " ".join(["python", *sys.argv]), args.name)
        log(f"tables in {args.docs / f'{args.name}-tables.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
