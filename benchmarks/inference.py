"""Inference speed: a merged rank-b model vs the base model, and unmerged DyLoRA at b vs PEFT LoRA of rank b.

All four models are built in one process from MiniLM and timed in alternating order on the same batch of
real polarity sentences (batch 32, length 64, no grad); the figures are medians of per-round ratios.

    python benchmarks/inference.py [--rank 4] [--rounds 40] [--out benchmarks/results/inference.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/inference.json")
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    import dylora
    from dylora.app import data, zoo

    model_dir = zoo.resolve_model("minilm")
    tok = zoo.load_tokenizer(model_dir)
    texts = data.load_task("polarity").splits["test"]["text"][: args.batch_size]
    batch = tok(texts, padding="max_length", truncation=True, max_length=args.length, return_tensors="pt")

    def base():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()

    common = dict(lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    dy = dylora.get_dylora_model(base(), dylora.DyLoraConfig(r=8, **common)).eval()
    with torch.no_grad():
        for n, p in dy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    dylora.set_rank(dy, args.rank)
    lora = get_peft_model(base(), LoraConfig(r=args.rank, **common)).eval()
    models = {"base": base(), "merged": dylora.merge(dy, rank=args.rank), "dylora": dy, "lora": lora}

    @torch.no_grad()
    def timed(name: str) -> float:
        t = time.perf_counter()
        models[name](**batch)
        return time.perf_counter() - t

    for name in models:
        for _ in range(3):
            timed(name)
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for i in range(args.rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(timed(name))

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    result = {
        "what": f"forward, MiniLM, batch {args.batch_size} x {args.length}, rank {args.rank}, r_max 8",
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "merged_over_base": ratio("merged", "base"),
        "dylora_over_lora": ratio("dylora", "lora"),
        "rounds": args.rounds, "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
