"""One training step of DyLoRA (r=8) vs PEFT LoRA (r=8): time and peak memory, side by side in one process.

Same model (MiniLM from its registry package), same batch (real polarity sentences, batch 16, length 64),
same optimiser. Steps alternate (ABBA order) so drift in machine load hits both arms alike; the figure
reported is the median of the per-pair ratios DyLoRA / LoRA. DyLoRA samples a new rank every step, as
in training. Peak memory is the peak of live tensor bytes allocated during a step (tracked per storage
with a dispatch mode), the same accounting for both arms.

    python benchmarks/step_time.py [--steps 60] [--out benchmarks/results/step_time.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class PeakTensorMemory(TorchDispatchMode):
    """Tracks the peak of live tensor storage bytes created inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage ptr -> [nbytes, tensors alive]
        self.current = self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.live:
                    self.live[ptr] = [t.untyped_storage().nbytes(), 0]
                    self.current += self.live[ptr][0]
                    self.peak = max(self.peak, self.current)
                self.live[ptr][1] += 1
                weakref.finalize(t, self._release, ptr)
        return out


def build(kind: str, model_dir: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    import dylora

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    common = dict(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    if kind == "dylora":
        model = dylora.get_dylora_model(base, dylora.DyLoraConfig(**common))
    else:
        model = get_peft_model(base, LoraConfig(**common))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="measured steps per arm")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/step_time.json")
    args = parser.parse_args()

    import dylora
    from dylora.app import data, zoo

    model_dir = zoo.resolve_model("minilm")
    tok = zoo.load_tokenizer(model_dir)
    texts = data.load_task("polarity").splits["train"]["text"][: args.batch_size]
    batch = tok(texts, padding="max_length", truncation=True, max_length=args.length, return_tensors="pt")
    batch["labels"] = torch.arange(args.batch_size) % 2
    arms = {kind: build(kind, model_dir) for kind in ("dylora", "lora")}
    sampler = dylora.RankSampler(1, 8, seed=0)
    step_no = {"n": 0}

    def step(kind: str) -> float:
        model, opt = arms[kind]
        t = time.perf_counter()
        if kind == "dylora":
            dylora.set_rank(model, sampler.sample(step_no["n"]))
            step_no["n"] += 1
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for kind in arms:  # warm-up
        for _ in range(3):
            step(kind)
    times: dict[str, list[float]] = {"dylora": [], "lora": []}
    for i in range(args.steps):
        order = ("dylora", "lora") if i % 2 == 0 else ("lora", "dylora")
        for kind in order:
            times[kind].append(step(kind))
    ratios = [d / lo for d, lo in zip(times["dylora"], times["lora"], strict=True)]

    peaks = {}
    for kind in arms:
        tracker = PeakTensorMemory()
        with tracker:
            step(kind)
        peaks[kind] = tracker.peak
    result = {
        "what": "one AdamW training step, MiniLM (all-MiniLM-L6-v2), query+value, r=8, lora_alpha=16",
        "batch_size": args.batch_size, "length": args.length, "steps_per_arm": args.steps,
        "median_step_s": {k: statistics.median(v) for k, v in times.items()},
        "time_ratio_median": statistics.median(ratios),
        "time_ratio_of_medians": statistics.median(times["dylora"]) / statistics.median(times["lora"]),
        "peak_step_tensor_bytes": peaks,
        "peak_memory_ratio": peaks["dylora"] / peaks["lora"],
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(json.dumps({k: result[k] for k in ("median_step_s", "time_ratio_median", "peak_memory_ratio")}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
