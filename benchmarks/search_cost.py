"""The cost of finding a rank (the paper's Table 5 in shape) at a chosen training length, each run alone.

    python benchmarks/search_cost.py --epochs 3.5 --jobs 2   # polarity, LoRA at r = 1..8 vs one DyLoRA run

The speed-up of DyLoRA's search is n (T + E) / (T + n E) for n ranks searched, with T a run's load and training
time and E one validation evaluation: it approaches n as training grows longer than evaluation. This script
measures it at one schedule, by default every run alone on the machine (`--jobs 1`, all cores); with `--jobs 2`
two single-threaded runs share the two cores without slowing each other. It reuses the runs and the
search-cost table of `reproduce.py`. Writes `<out>/summary.json` and `--docs`/search-cost.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from reproduce import RANKS, Pool, log, search_cost, search_cost_table

from dylora.app.settings import Settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="polarity")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="default 1e-3: at 3e-3 (reproduce.py's choice with LoRA) one DyLoRA seed never trained")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1: each run alone)")
    parser.add_argument("--threads", type=int, default=None, help="threads per run (default: cores / jobs)")
    parser.add_argument("--out", default="bench-out/search-cost")
    parser.add_argument("--docs", default="docs")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    out = Path(args.out) / f"{args.task}-{args.epochs:g}ep"
    base = Settings(model="minilm", data=args.task, r=8, lora_alpha=16, epochs=args.epochs, lr=args.lr,
                    max_length=64, batch_size=16, seed=0, recipe="paper")
    jobs = {"dylora": ("run", out / "dylora", base)}
    jobs.update({f"lora-r{b}": ("run", out / f"lora-r{b}", replace(base, method="lora", r=b)) for b in RANKS})
    t0 = time.perf_counter()
    log(f"{len(jobs)} runs, {args.jobs} at a time with {threads} thread(s) each")
    results = Pool(args.jobs, threads).map(jobs)
    arms = {name: [res] for name, res in results.items()}
    metric = results["dylora"]["metric"]
    cost = search_cost({"arms": arms}, metric)
    dy = results["dylora"]["timings"]
    summary = {"task": args.task, "epochs": args.epochs, "lr": args.lr, "jobs": args.jobs, "threads": threads,
               "wall_s": time.perf_counter() - t0, "search": cost,
               "dylora_timings": dy, "lora_timings": {b: results[f"lora-r{b}"]["timings"] for b in RANKS}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    e = dy["sweep_validation_s"] / len(results["dylora"]["rows"])
    lines = ["# Search cost: one DyLoRA run against a LoRA run per rank, the timings behind results.md", "",
             f"<!-- written by: python {' '.join(sys.argv)} -->", "",
             f"{args.task}, MiniLM, r_max = 8, {args.epochs:g} epoch(s), lr {args.lr:g}, seed 0; {args.jobs} run(s) at "
             f"a time with {threads} thread(s) each. One validation evaluation E = {e:.1f} s; the DyLoRA run "
             f"without its sweep T = {dy['total_s'] - dy['sweep_s']:.0f} s.", "", *search_cost_table(cost)]
    lines += ["", f"Wall time of this benchmark: {summary['wall_s'] / 60:.1f} min."]
    Path(args.docs).mkdir(parents=True, exist_ok=True)
    (Path(args.docs) / "search-cost.md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines[2:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
