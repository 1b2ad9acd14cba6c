"""The paper's NLG table in shape: SmolLM2-135M-Instruct on bbc-headlines, truncated LoRA vs DyLoRA (Frozen) vs
DyLoRA at b = 1..4 (r_max = 4, lora_alpha = 32 as in the paper), BLEU / ROUGE-L / perplexity on test.

    python benchmarks/generation.py                   # one seed, the CPU schedule below (21 min on 2 cores)
    python benchmarks/generation.py --seeds 2

Every arm is a `dylora train` / `dylora lora` generation run (`dylora.app.run.train`) written to
`<out>/<arm>-s<seed>/`; a finished run (sweep.json) is reused, so an interrupted benchmark resumes. The LoRA
r = 4 run is evaluated at b = 1..3 as well, scaled alpha / b (truncated LoRA). Tables, example headlines and a
plot go to `--docs` (generation-tables.md, generation.png); all numbers to `<out>/summary.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from dylora.app.run import sweep_run, train
from dylora.app.settings import Settings
from dylora.app.tasks.generation import METRICS

RANKS = [1, 2, 3, 4]
ARMS = {
    "truncated LoRA": dict(method="lora"),
    "DyLoRA (Frozen)": dict(method="dylora", frozen=True),
    "DyLoRA": dict(method="dylora"),
}
MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct"}
SLUG = {"truncated LoRA": "lora", "DyLoRA (Frozen)": "dylora-frozen", "DyLoRA": "dylora"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_arm(out: Path, s: Settings) -> dict:
    """Train and sweep one arm (or reuse its finished directory); {rank: test metrics} and timings."""
    if not (out / "sweep.json").is_file():
        log(f"run {out}")
        train(s, out, overwrite=True, quiet=True)
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    test = {row["rank"]: {m: row[f"test_{m}"] for m in METRICS} for row in rows}
    timings = json.loads((out / "run.json").read_text())["timings"]
    if s.method == "lora":  # truncated LoRA: the r = 4 adapter at b < 4, scale alpha / b
        path = out / "truncated.json"
        if not path.is_file():
            t0 = time.perf_counter()
            trunc, _, _ = sweep_run(out, [b for b in RANKS if b < s.r], split="test", progress=False)
            path.write_text(json.dumps({"rows": {r.rank: r.metrics for r in trunc},
                                        "seconds": time.perf_counter() - t0}))
        saved = json.loads(path.read_text())
        test.update({int(b): m for b, m in saved["rows"].items()})
        timings = {**timings, "truncated_sweep_s": round(saved["seconds"], 2)}
    return {"test": dict(sorted(test.items())), "timings": timings}


def mean_std(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.1f}" + (f" ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else "")


def write_docs(summary: dict, docs: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs.mkdir(parents=True, exist_ok=True)
    seeds = summary["seeds"]
    s = summary["settings"]
    name = MODEL_NAMES.get(s["model"], Path(s["model"]).name)
    lines = ["# Generation with SmolLM2: the tables behind results.md", "", f"<!-- written by: {command} -->", "",
             f"{name}, bbc-headlines, r_max = {s['r']}, lora_alpha = {s['lora_alpha']:g}, targets "
             f"{', '.join(summary['targets'])}; {s['epochs']:g} epoch over {s['max_train']} training pairs, batch "
             f"{s['batch_size']}, lr {s['lr']:g}, weight decay {s['weight_decay']:g}, LoRA dropout "
             f"{s['lora_dropout']:g}, label smoothing {s['label_smoothing']:g} (the paper's NLG settings except "
             f"the lr, schedule and length), max length {s['max_length']}; greedy decoding, at most 24 new "
             f"tokens; test = first {s['max_eval']} test pairs; {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), "
             "mean ± std.", ""]
    for metric, name in (("bleu", "BLEU"), ("rougeL", "ROUGE-L"), ("perplexity", "perplexity (lower is better)")):
        lines += [f"**{name}**", "", "| arm | " + " | ".join(f"b={b}" for b in RANKS) + " |",
                  "|---|" + "---|" * len(RANKS)]
        for arm, runs in summary["arms"].items():
            lines.append(f"| {arm} | " + " | ".join(mean_std([r["test"][str(b)][metric] for r in runs])
                                                   for b in RANKS) + " |")
        lines.append("")
    lines += ["Wall time per arm (s, seed 0): training, then the per-rank evaluation of validation and test "
              "(truncated LoRA: its own b = 4 evaluation, then test at b = 1..3):", "",
              "| arm | train | rank sweep | total |", "|---|---|---|---|"]
    for arm, runs in summary["arms"].items():
        t = runs[0]["timings"]
        extra = t.get("truncated_sweep_s", 0.0)
        lines.append(f"| {arm} | {t['train_s']:.0f} | {t['sweep_s'] + extra:.0f} | {t['total_s'] + extra:.0f} |")
    lines += ["", f"Wall time of this benchmark: {summary['wall_s'] / 60:.1f} min.", ""]
    samples = summary.get("samples")
    if samples:
        lines += ["Example headlines (DyLoRA, seed 0, the first five test articles) at each rank, beside the "
                  "reference:", ""]
        first = samples[str(RANKS[0])]
        for i in range(len(first)):
            lines += [f"{i + 1}. *{first[i]['source'][:160]}{'…' if len(first[i]['source']) > 160 else ''}*", "",
                      f"   - reference: {first[i]['reference']}"]
            lines += [f"   - b={b}: {samples[str(b)][i]['prediction']}" for b in RANKS if str(b) in samples]
            lines.append("")
    lines.append("![BLEU vs rank](generation.png)")
    (docs / "generation-tables.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.0), dpi=120)
    for ax, metric, label in ((axes[0], "bleu", "test BLEU"), (axes[1], "rougeL", "test ROUGE-L")):
        for arm, runs in summary["arms"].items():
            ys = [[r["test"][str(b)][metric] for r in runs] for b in RANKS]
            ax.errorbar(RANKS, [statistics.fmean(y) for y in ys],
                        yerr=[statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys], marker="o", capsize=3,
                        label=arm)
        ax.set_xlabel("rank b")
        ax.set_ylabel(label)
        ax.set_xticks(RANKS)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{name} on bbc-headlines, r_max = 4, {len(seeds)} seed(s)")
    fig.tight_layout()
    fig.savefig(docs / "generation.png")
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 or a local causal-LM directory")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--max-train", type=int, default=500, help="training pairs (seeded subsample)")
    parser.add_argument("--max-eval", type=int, default=30, help="validation / test pairs evaluated at each rank")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--out", default="bench-out/generation")
    parser.add_argument("--docs", default="docs")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    import datasets
    import transformers

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    out = Path(args.out)
    base = dict(model=args.model, data="bbc-headlines", r=4, lora_alpha=32, epochs=args.epochs,
                max_steps=args.max_steps, max_train=args.max_train, max_eval=args.max_eval, lr=args.lr, batch_size=8,
                eval_batch_size=20, max_length=160, lora_dropout=0.1, weight_decay=0.01, label_smoothing=0.1,
                recipe="paper")  # the paper's recipe, as measured in docs/results.md
    t0 = time.perf_counter()
    summary: dict = {"settings": base, "seeds": list(range(args.seeds)), "arms": {}}
    for seed in range(args.seeds):
        for arm, kw in ARMS.items():
            res = run_arm(out / f"{SLUG[arm]}-s{seed}", Settings(**base, seed=seed, **kw))
            summary["arms"].setdefault(arm, []).append(res)
    summary["wall_s"] = time.perf_counter() - t0
    record = json.loads((out / "dylora-s0" / "run.json").read_text())
    summary["targets"] = record["settings"]["target_modules"]
    summary["settings"]["max_length"] = record["settings"]["max_length"]
    summary["samples"] = json.loads((out / "dylora-s0" / "samples.json").read_text())["ranks"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary = json.loads((out / "summary.json").read_text())  # ranks as JSON keys, as a reader sees them
    write_docs(summary, Path(args.docs), " ".join(["python", *sys.argv]))
    log(f"done in {summary['wall_s'] / 60:.1f} min; tables in {args.docs}/generation-tables.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
