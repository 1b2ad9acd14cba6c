"""Per-layer ranks under a parameter budget (issue #12): one DyLoRA run cut to ranks chosen by `dylora.allocate`
("norm", "greedy") against uniform truncation of the same run, the SVD of a plain LoRA r=8 cut by a global
threshold, and PEFT's AdaLoRA trained for the budget. MiniLM on bbc and polarity, average rank 1, 2 and 4.

    python benchmarks/allocate.py --quick                     # bbc, one seed, 12 steps, B = 1, 2: a smoke test (9 min)
    python benchmarks/allocate.py [--tasks bbc] [--seeds 1]   # bbc and polarity, 3 seeds, the reproduction's schedule

A budget B is an average rank: B * sum_l (in_l + out_l) adapter parameters (layer l at rank k_l costs
k_l (in_l + out_l); AdaLoRA's singular values are folded into B, as they would be when it is deployed). Every
method's count is asserted to be within the budget. The greedy method's calibration loss is the mean
cross-entropy on the first 128 rows of the validation split; nothing is chosen on the rest of validation or on
test (validation is reported beside test).

Training runs are `dylora.app.run.train` runs (DyLoRA r=8 with the paper's recipe, and LoRA r=8,
`<out>/<task>/{dylora,lora}-s<seed>/`);
AdaLoRA is trained with the HF Trainer and the same `TrainingArguments` (`<out>/<task>/adalora-b<B>-s<seed>.json`);
each allocation writes `<out>/<task>/alloc-b<B>-s<seed>.json`. A finished file is reused, so an interrupted
benchmark resumes. Two single-threaded jobs run at a time. All numbers go to `--results`
(benchmarks/results/allocate.json), the tables to `<docs>/allocate-tables.md` and a heat map of one allocation
to `<docs>/allocate-heatmap.png` (with --quick: all three under `<out>/quick/`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from reproduce import Pool, final_loss, log, pool_options, pool_start, stuck

BUDGETS = (1, 2, 4)
R, ALPHA = 8, 16
LR = {"bbc": 3e-3, "polarity": 3e-3}  # the lr the reproduction chose for every arm (docs/results.md, Setting)
CALIBRATION = 128  # rows of validation the greedy method's loss is computed on
PLAN = {  # the reproduction's 1-epoch schedule (benchmarks/reproduce.py)
    "bbc": dict(settings=dict(epochs=1.0, max_length=64, batch_size=16, max_train=700), seeds=3),
    "polarity": dict(settings=dict(epochs=1.0, max_length=64, batch_size=16), seeds=3),
}
QUICK = {"bbc": dict(settings=dict(max_steps=12, max_length=64, batch_size=16, max_train=200, max_eval=160), seeds=1)}
QUICK_BUDGETS = (1, 2)
METHODS = {  # key: label in the tables
    "norm": "DyLoRA + allocate(norm)",
    "greedy": "DyLoRA + allocate(greedy)",
    "norm-off": "DyLoRA + allocate(norm, layers may be off)",
    "greedy-off": "DyLoRA + allocate(greedy, layers may be off)",
    "uniform": "DyLoRA, uniform truncation (b = B)",
    "svd": "LoRA r=8 + SVD allocation",
    "adalora": "AdaLoRA (init_r 8, target_r B)",
}


ALLOCATED = ("norm", "greedy", "norm-off", "greedy-off")  # dylora.allocate (lazy greedy), min_rank r_min or 0


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


# ---------------------------------------------------------------- jobs (each runs in a worker process)


def train_job(out: Path, s) -> dict:
    """A DyLoRA or LoRA run (`dylora.app.run.train`), or its finished directory; its sweep, timings and final loss."""
    from dylora.app.run import train

    if not (out / "sweep.json").is_file():
        log(f"run {out}")
        load0 = load_avg()
        train(s, out, overwrite=True, quiet=True)
        (out / "load.json").write_text(json.dumps({"load_start": load0, "load_end": load_avg()}))
        log(f"done {out}")
    sweep = json.loads((out / "sweep.json").read_text())
    record = json.loads((out / "run.json").read_text())
    load = json.loads((out / "load.json").read_text()) if (out / "load.json").is_file() else {}
    return {"rows": sweep["rows"], "metric": sweep["metric"], "timings": record["timings"], "path": str(out),
            "final_loss": final_loss(record["log_history"]), "chance_loss": math.log(len(record["label_names"])),
            "steps": record["steps"], **load}


def calibration_loss(task, n: int):
    """loss_fn(model) -> mean cross-entropy over the first n validation rows (collated once, by length)."""
    import torch
    import torch.nn.functional as F

    split = task.encoded["validation"]
    rows = sorted(split.select(range(min(n, len(split)))).to_list(), key=lambda r: len(r["input_ids"]))
    collate = task.collator()
    batches = [collate(rows[i:i + 64]) for i in range(0, len(rows), 64)]

    @torch.no_grad()
    def loss_fn(model) -> float:
        total = 0.0
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = model(**inputs).logits
            total += F.cross_entropy(logits.float(), batch["labels"], reduction="sum").item()
        return total / len(rows)

    return loss_fn


def lora_layers(model) -> dict:
    from peft.tuners.lora.layer import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A}


def svd_allocate(model, budget_params: int) -> dict[str, int]:
    """Cut a trained LoRA (loaded as DyLoRA, at rank r) to `budget_params` by the SVD of each layer's update.

    dW_l = (alpha / r) B_l A_l = U_l S_l V_l^T. The singular values of all layers are taken largest first, each
    costing in_l + out_l parameters, until the next one does not fit (one global threshold); layer l keeps its
    top k_l. The adapter is rewritten in place: A_l' = sqrt(S_k) V_k^T, B_l' = U_k sqrt(S_k) / (alpha / r), zero
    beyond k_l, so at rank r it computes U_k S_k V_k^T exactly. Returns {layer: k_l} (k_l may be 0).
    """
    import torch

    from dylora import layer_costs

    costs = layer_costs(model)
    factors, values = {}, []
    for name, module in lora_layers(model).items():
        variant = module.lora_variant["default"]
        A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
        c = variant.lora_alpha / variant.r  # the scale at full rank
        U, S, Vh = torch.linalg.svd(c * B.detach().double() @ A.detach().double(), full_matrices=False)
        factors[name] = (U[:, :variant.r], S[:variant.r], Vh[:variant.r], c)
        values += [(float(s), name) for s in S[:variant.r]]
    keep, left = dict.fromkeys(factors, 0), budget_params
    for _, name in sorted(values, key=lambda v: -v[0]):
        if costs[name] > left:
            break
        keep[name] += 1
        left -= costs[name]
    with torch.no_grad():
        for name, module in lora_layers(model).items():
            U, S, Vh, c = factors[name]
            k = keep[name]
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
            A.zero_()
            B.zero_()
            root = S[:k].sqrt()
            A[:k] = (root[:, None] * Vh[:k]).to(A.dtype)
            B[:, :k] = (U[:, :k] * root / c).to(B.dtype)
    return keep


def allocate_job(path: Path, dylora_dir: Path, lora_dir: Path, budget: int, n_cal: int) -> dict:
    """norm, greedy (and the uniform cut's calibration loss) on the DyLoRA run; SVD allocation of the LoRA run."""
    if path.is_file():
        return json.loads(path.read_text())
    import dylora
    from dylora.app.run import load_run, token_budget

    log(f"allocate {path}")
    load0 = load_avg()
    model, _, saved, task = load_run(dylora_dir, with_data=True)
    task.encode(token_budget(saved.settings, task, model.config))
    costs = dylora.layer_costs(model)
    per_rank = sum(costs.values())
    limit = budget * per_rank
    loss_fn = calibration_loss(task, n_cal)
    res = {"budget": budget, "budget_params": limit, "per_rank": per_rank, "calibration_rows": n_cal}

    def score(m, ranks: dict[str, int], seconds: float) -> dict:
        params = sum(k * costs[name] for name, k in ranks.items())
        assert params <= limit, f"{params} parameters > budget {limit}"
        return {"ranks": ranks, "params": params, "alloc_s": round(seconds, 3), "calibration_loss": loss_fn(m),
                "validation": task.evaluate(m, "validation"), "test": task.evaluate(m, "test")}

    for method in ALLOCATED:
        t0 = time.perf_counter()
        kind = method.removesuffix("-off")
        ranks = dylora.allocate(model, budget, kind, loss_fn=loss_fn if kind == "greedy" else None,
                                min_rank=0 if method.endswith("-off") else None)
        seconds = time.perf_counter() - t0
        dylora.set_layer_ranks(model, ranks)
        res[method] = score(model, ranks, seconds)
        dylora.set_rank(model, R)
    dylora.set_rank(model, budget)  # uniform: its test / validation scores are the run's sweep; the loss is new
    res["uniform"] = {"calibration_loss": loss_fn(model)}

    lora, _, saved, task = load_run(lora_dir, with_data=True)  # a plain LoRA, loaded as DyLoRA with r_min = 1
    task.encode(token_budget(saved.settings, task, lora.config))
    t0 = time.perf_counter()
    keep = svd_allocate(lora, limit)
    seconds = time.perf_counter() - t0
    res["svd"] = score(lora, keep, seconds)
    res.update(load_start=load0, load_end=load_avg())
    path.write_text(json.dumps(res, indent=1))
    log(f"done {path}")
    return res


def adalora_schedule(total_step: int) -> dict:
    """tinit 10% and tfinal 20% of the steps (the budget falls on a cubic schedule in between), reallocated every
    step: a short schedule has few steps to spare."""
    return dict(tinit=max(1, round(0.1 * total_step)), tfinal=max(2, round(0.2 * total_step)), deltaT=1)


def adalora_job(path: Path, s, budget: int, n_cal: int) -> dict:
    """PEFT's AdaLoRA (init_r = r, target_r = budget) trained with the run's TrainingArguments and evaluated."""
    if path.is_file():
        return json.loads(path.read_text())
    import shutil

    from peft import AdaLoraConfig, get_peft_model
    from peft.tuners.adalora import AdaLoraLayer
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from dylora.app import zoo
    from dylora.app.run import task_for, token_budget, training_arguments

    class Allocate(TrainerCallback):
        """AdaLoRA's budget step, after the optimizer step and before the gradients are zeroed (it scores them)."""

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            model.base_model.update_and_allocate(state.global_step)

    log(f"adalora {path}")
    load0 = load_avg()
    t0 = time.perf_counter()
    task = task_for(s)
    task.load_data()
    base, _ = task.load_base(zoo.resolve_model(s.model))
    s.max_length = token_budget(s, task, base.config)
    encoded = task.encode(s.max_length)
    steps = s.max_steps if s.max_steps > 0 else math.ceil(len(encoded["train"]) / s.batch_size) * int(s.epochs)
    schedule = adalora_schedule(steps)
    config = AdaLoraConfig(task_type="SEQ_CLS", init_r=s.r, target_r=budget, lora_alpha=s.lora_alpha,
                           lora_dropout=s.lora_dropout, target_modules=zoo.default_target_modules(base.config),
                           total_step=steps, **schedule)
    model = get_peft_model(base, config)
    scratch = path.with_suffix(".partial")
    trainer = Trainer(model=model, args=training_arguments(s, scratch, quiet=True), train_dataset=encoded["train"],
                      data_collator=task.collator(), callbacks=[Allocate()])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    train_s = time.perf_counter() - t0
    assert trainer.state.global_step == steps, (trainer.state.global_step, steps)
    shutil.rmtree(scratch, ignore_errors=True)
    model.eval()
    ranks, params = {}, 0
    for name, module in model.named_modules():
        if isinstance(module, AdaLoraLayer) and "default" in module.lora_E:
            ranks[name] = int((module.lora_E["default"] != 0).sum())
            params += ranks[name] * (module.lora_A["default"].shape[1] + module.lora_B["default"].shape[0])
    per_rank = sum(m.lora_A["default"].shape[1] + m.lora_B["default"].shape[0]
                   for m in model.modules() if isinstance(m, AdaLoraLayer))
    assert params <= budget * per_rank, f"AdaLoRA kept {params} parameters > budget {budget * per_rank}"
    res = {"budget": budget, "ranks": ranks, "params": params, "budget_params": budget * per_rank,
           "schedule": {"total_step": steps, **schedule}, "train_s": round(train_s, 2),
           "calibration_loss": calibration_loss(task, n_cal)(model),
           "validation": task.evaluate(model, "validation"), "test": task.evaluate(model, "test"),
           "final_loss": final_loss(trainer.state.log_history), "chance_loss": math.log(task.data.num_labels),
           "load_start": load0, "load_end": load_avg()}
    path.write_text(json.dumps(res, indent=1))
    log(f"done {path}")
    return res


def _job(kind: str, *args) -> dict:
    return {"train": train_job, "allocate": allocate_job, "adalora": adalora_job}[kind](*args)


# ---------------------------------------------------------------- the benchmark


def run(plan: dict, budgets: tuple, out: Path, pool: Pool) -> dict:
    from dylora.app.settings import Settings

    t_start = time.perf_counter()
    runs = {}
    for task, spec in plan.items():
        base = Settings(model="minilm", data=task, r=R, lora_alpha=ALPHA, lr=LR[task], recipe="paper", guard=False,
                        **spec["settings"])  # a run stuck at chance is a result here (listed), not a stop
        for seed in range(spec["seeds"]):
            runs[task, "dylora", seed] = ("train", out / task / f"dylora-s{seed}",
                                          replace(base, method="dylora", seed=seed, ranks=[*budgets, R]))
            runs[task, "lora", seed] = ("train", out / task / f"lora-s{seed}", replace(base, method="lora", seed=seed))
    trained = pool.map(runs)
    jobs = {}
    for budget in sorted(budgets, reverse=True):  # the longest greedy allocations first
        for (task, arm, seed), job in runs.items():
            if arm == "dylora":
                jobs[task, "alloc", budget, seed] = ("allocate", out / task / f"alloc-b{budget}-s{seed}.json", job[1],
                                                     runs[task, "lora", seed][1], budget, CALIBRATION)
    for (task, arm, seed), job in runs.items():
        if arm == "lora":
            for budget in budgets:
                jobs[task, "adalora", budget, seed] = ("adalora", out / task / f"adalora-b{budget}-s{seed}.json",
                                                       job[2], budget, CALIBRATION)
    done = pool.map(jobs)
    summary: dict = {}
    for task, spec in plan.items():
        seeds = range(spec["seeds"])
        t = summary[task] = {"settings": {**spec["settings"], "lr": LR[task], "r": R, "lora_alpha": ALPHA},
                             "seeds": spec["seeds"], "budgets": list(budgets), "runs": {}, "arms": {}}
        for seed in seeds:
            for arm in ("dylora", "lora"):
                res = trained[task, arm, seed]
                t["runs"][f"{arm}-s{seed}"] = {k: res[k] for k in ("rows", "timings", "final_loss", "chance_loss",
                                                                    "steps", "path", "load_start", "load_end")
                                               if k in res}
        for budget in budgets:
            for seed in seeds:
                a, ada = done[task, "alloc", budget, seed], done[task, "adalora", budget, seed]
                dy = trained[task, "dylora", seed]
                row = next(r for r in dy["rows"] if r["rank"] == budget)
                train_dy = dy["timings"]["train_s"]
                arms = {
                    **{m: {**a[m], "total_s": train_dy + a[m]["alloc_s"]} for m in ALLOCATED},
                    "uniform": {"params": budget * a["per_rank"], "alloc_s": 0.0, "total_s": train_dy,
                                "calibration_loss": a["uniform"]["calibration_loss"],
                                "validation": {k[len("validation_"):]: v for k, v in row.items()
                                               if k.startswith("validation_")},
                                "test": {k[len("test_"):]: v for k, v in row.items() if k.startswith("test_")}},
                    "svd": {**a["svd"], "total_s": trained[task, "lora", seed]["timings"]["train_s"]
                            + a["svd"]["alloc_s"]},
                    "adalora": {**ada, "alloc_s": None, "total_s": ada["train_s"]},
                }
                for method, res in arms.items():
                    assert res["params"] <= budget * a["per_rank"], (task, method, budget, seed)
                    t["arms"].setdefault(method, {}).setdefault(str(budget), {})[str(seed)] = res
                t["per_rank"] = a["per_rank"]
                t.setdefault("load_average", {})[f"alloc-b{budget}-s{seed}"] = [a.get("load_start"), a.get("load_end")]
                t["load_average"][f"adalora-b{budget}-s{seed}"] = [ada.get("load_start"), ada.get("load_end")]
    summary["_wall_s"] = time.perf_counter() - t_start
    return summary


# ---------------------------------------------------------------- tables and heat map


def mean_std(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.1f}" + (f" ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else "")


def seconds(xs: list[float]) -> str:
    """Mean wall time, with the range over seeds (the machine is shared: the spread is part of the result)."""
    digits = 3 if max(xs) < 1 else 1
    mean = f"{statistics.fmean(xs):.{digits}f}"
    return mean if len(xs) == 1 else f"{mean} ({min(xs):.{digits}f}-{max(xs):.{digits}f})"


def write_docs(summary: dict, docs: Path, results: Path, command: str) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(summary, indent=1, default=str))
    lines = ["# Per-layer ranks: the per-seed tables behind results.md", "", f"<!-- written by: {command} -->", ""]
    heat = None
    for task, t in summary.items():
        if task.startswith("_"):
            continue
        seeds, budgets, arms = [str(s) for s in range(t["seeds"])], t["budgets"], t["arms"]
        metric = "accuracy"
        s = t["settings"]
        schedule = {k: v for k, v in s.items() if k not in ("lr", "r", "lora_alpha")}
        lines += [f"### {task}: test {metric} (%) at average rank B, mean ± std over {t['seeds']} seed(s)", "",
                  f"MiniLM, query + value (12 layers, {t['per_rank']} parameters per unit of average rank), r = {R}, "
                  f"lora_alpha {ALPHA}, lr {s['lr']:g}; schedule {schedule}. "
                  f"Budget B = B x {t['per_rank']} adapter parameters.", "",
                  "| method | " + " | ".join(f"B={b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
        for method, label in METHODS.items():
            cells = [mean_std([arms[method][str(b)][sd]["test"][metric] for sd in seeds]) for b in budgets]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        ref = {arm: [next(r for r in t["runs"][f"{arm}-s{sd}"]["rows"] if r["rank"] == R)[f"test_{metric}"]
                     for sd in seeds] for arm in ("dylora", "lora")}
        lines += ["", f"References at full rank r = {R} (B = 8): DyLoRA {mean_std(ref['dylora'])}, "
                  f"LoRA {mean_std(ref['lora'])}.", ""]
        bad = [name for name, r in t["runs"].items() if stuck(r)]
        if bad:
            lines += [f"Runs that never left chance (training loss over the last fifth >= 0.97 ln(classes)): "
                      f"{', '.join(f'`{b}`' for b in bad)}.", ""]
        lines += ["Per seed (test / validation accuracy; calibration loss = mean cross-entropy on the first "
                  f"{CALIBRATION} validation rows, the only data the greedy method sees; parameters kept / "
                  "budget; wall time of the allocation alone and of training + allocation, one thread):", "",
                  "| B | method | test per seed | test mean | validation mean | calibration loss | params / budget "
                  "| allocation (s) | training + allocation (s) |", "|---|---|---|---|---|---|---|---|---|"]
        for b in budgets:
            for method, label in METHODS.items():
                rs = [arms[method][str(b)][sd] for sd in seeds]
                per_seed = " / ".join(f"{r['test'][metric]:.1f}" for r in rs)
                alloc = "" if rs[0]["alloc_s"] is None else seconds([r["alloc_s"] for r in rs])
                lines.append(
                    f"| {b} | {label} | {per_seed} | {mean_std([r['test'][metric] for r in rs])} "
                    f"| {mean_std([r['validation'][metric] for r in rs])} "
                    f"| {statistics.fmean([r['calibration_loss'] for r in rs]):.3f} "
                    f"| {max(r['params'] for r in rs)} / {b * t['per_rank']} | {alloc} "
                    f"| {seconds([r['total_s'] for r in rs])} |")
        loads = [x for r in t["runs"].values() for x in (r.get("load_start"), r.get("load_end")) if x is not None]
        loads += [x for pair in t.get("load_average", {}).values() for x in pair if x is not None]
        if loads:
            lines += ["", f"1-minute load average of the machine at the start and end of each job: {min(loads):.1f} to "
                      f"{max(loads):.1f} on {summary.get('_cpus')} cores (the machine was shared; 2.0 would be this "
                      "benchmark alone). Times above are wall times and grow with the load."]
        lines += ["", *targets(task, t, metric), ""]
        if heat is None or task == "bbc":  # bbc, where rank matters, if it was run
            heat = (task, "2" if 2 in budgets else str(budgets[0]), t)
    walls = summary.get("_invocations_s", [summary["_wall_s"]])
    lines.append(f"Wall time of this benchmark: {sum(walls) / 60:.1f} min over {len(walls)} invocation(s) "
                 f"({', '.join(f'{w / 60:.1f}' for w in walls)} min; an invocation reuses every finished job), "
                 f"{summary['_jobs']} job(s) at a time with {summary['_threads']} thread(s) each.")
    if heat:
        plot_heatmap(docs / "allocate-heatmap.png", *heat)
        lines += ["", f"![allocation heat map](allocate-heatmap.png) ({heat[0]}, seed 0, B = {heat[1]})"]
    (docs / "allocate-tables.md").write_text("\n".join(lines) + "\n")


def targets(task: str, t: dict, metric: str) -> list[str]:
    """Issue #12's targets, measured: allocated vs uniform (bbc, B = 1, 2), allocated vs AdaLoRA, allocation time."""
    seeds, arms = [str(s) for s in range(t["seeds"])], t["arms"]

    def mean(method: str, b: int, key: str = "test") -> float:
        return statistics.fmean(arms[method][str(b)][sd][key][metric] for sd in seeds)

    lines = ["| target | measured | met |", "|---|---|---|"]
    for method in ALLOCATED:
        for b in t["budgets"]:
            gap = mean(method, b) - mean("uniform", b)
            if task == "bbc" and b in (1, 2):
                lines.append(f"| {method} >= uniform + 1 at B={b} | {gap:+.1f} | {'yes' if gap >= 1 else 'no'} |")
            gap = mean(method, b) - mean("adalora", b)
            lines.append(f"| {method} >= AdaLoRA at B={b} | {gap:+.1f} | {'yes' if gap >= 0 else 'no'} |")
    for method, limit in (("norm", 60), ("greedy", 300), ("norm-off", 60), ("greedy-off", 300)):
        worst = max(arms[method][str(b)][sd]["alloc_s"] for b in t["budgets"] for sd in seeds)
        lines.append(f"| {method} allocation < {limit} s (slowest budget and seed, one thread) | {worst:.1f} s "
                     f"| {'yes' if worst < limit else 'no'} |")
    return lines


def plot_heatmap(path: Path, task: str, budget: str, t: dict) -> None:
    """Layers x (query, value) -> rank of one seed-0 allocation per method (AdaLoRA: its kept singular values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shown = ["norm", "greedy", "greedy-off", "svd", "adalora"]
    fig, axes = plt.subplots(1, len(shown), figsize=(2.3 * len(shown) + 1, 3.6), dpi=120, sharey=True)
    for ax, method in zip(axes, shown, strict=True):
        ranks = t["arms"][method][budget]["0"]["ranks"]
        cells = {}
        for name, k in ranks.items():
            m = re.search(r"layer\.(\d+)\..*\.(\w+)$", name)
            cells[int(m.group(1)), m.group(2)] = k
        layers, modules = sorted({i for i, _ in cells}), sorted({m for _, m in cells})
        grid = np.array([[cells[i, m] for m in modules] for i in layers])
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=R, aspect="auto")
        for (i, j), k in np.ndenumerate(grid):
            ax.text(j, i, str(k), ha="center", va="center", color="white" if k < R / 2 else "black", fontsize=9)
        ax.set_xticks(range(len(modules)), modules)
        ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
        ax.set_title(METHODS[method].replace("DyLoRA + ", "").replace(" (init_r 8, target_r B)", "")
                     .replace(", layers may be off", ",\nlayers may be off"), fontsize=8)
    fig.colorbar(im, ax=axes, label="rank k_l", shrink=0.8)
    fig.suptitle(f"{task}, seed 0, average rank B = {budget}: rank per layer", fontsize=10)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    pool_options(parser, PLAN, "bench-out/allocate", "bbc, one seed, 12 steps, budgets 1 and 2",
                 "seeds per task (default 3)")
    parser.add_argument("--results", default="benchmarks/results/allocate.json")
    args, plan, out, threads = pool_start(parser, PLAN, QUICK)
    log(f"{args.jobs} job(s) at a time, {threads} thread(s) each; load average {load_avg()}")
    ledger = out / "wall.json"  # the wall time of every invocation over this output directory
    invocations = json.loads(ledger.read_text()) if ledger.is_file() else []
    summary = run(plan, QUICK_BUDGETS if args.quick else BUDGETS, out, Pool(args.jobs, threads, job=_job))
    invocations.append(summary["_wall_s"])
    ledger.write_text(json.dumps(invocations))
    summary.update(_jobs=args.jobs, _threads=threads, _invocations_s=invocations, _cpus=os.cpu_count())
    docs, results = (out, out / "allocate.json") if args.quick else (Path(args.docs), Path(args.results))
    if results.is_file():  # tasks not run by this invocation keep their earlier numbers
        earlier = json.loads(results.read_text())
        summary = {**{k: v for k, v in earlier.items() if not k.startswith("_") and k not in plan}, **summary}
    write_docs(summary, docs, results, " ".join(["python", *sys.argv]))
    log(f"done in {summary['_wall_s'] / 60:.1f} min; tables in {docs / 'allocate-tables.md'}, numbers in {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
