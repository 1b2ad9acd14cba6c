"""The SVD basis's cost: the SVD cut of every adapted layer of MiniLM, through the library, beside a full SVD.

    python benchmarks/svd_layers.py            # r = 8 on every Linear of MiniLM (query, key, value, dense)

Each layer's cut is `functional.svd_mixers` (a thin QR of A^T and B and an r x r SVD, float64), timed whole for
every layer with a cold cache, and side by side the same layers' `torch.linalg.svd` of the full (out x in)
update, which the library never computes; the ratio is what counts on a shared machine. Writes
benchmarks/results/svd_layers.json. Target: every layer of MiniLM in under 1 s.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "svd_layers.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForSequenceClassification

    import dylora
    from dylora.app import zoo
    from dylora.files import write_json
    from dylora.model import named_layers

    base = AutoModelForSequenceClassification.from_pretrained(zoo.resolve_model("minilm"), num_labels=2)
    config = dylora.DyLoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=["query", "key", "value", "dense"])
    model = dylora.get_dylora_model(base, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    layers = list(named_layers(model, "default").values())
    cut, full = [], []
    for _ in range(args.repeats):
        for layer in layers:  # a cold cache: the version key no longer matches
            layer.lora_variant["default"]._svd_key = None
        t0 = time.perf_counter()
        for layer in layers:
            layer.lora_variant["default"].svd(layer, "default")
        cut.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for layer in layers:
            torch.linalg.svd(layer.lora_variant["default"].update(layer, "default").double(), full_matrices=False)
        full.append(time.perf_counter() - t0)
    payload = {"model": "minilm", "layers": len(layers), "r": args.r, "repeats": args.repeats,
               "torch_threads": torch.get_num_threads(), "load": os.getloadavg()[0],
               "svd_cut_s": {"min": min(cut), "max": max(cut)}, "full_svd_s": {"min": min(full), "max": max(full)},
               "ratio_full_over_cut": min(full) / min(cut), "target_s": 1.0}
    write_json(args.results, payload)
    print(f"SVD cut of {len(layers)} MiniLM layers: {min(cut):.3f} s (max {max(cut):.3f}); full SVDs "
          f"{min(full):.3f} s ({payload['ratio_full_over_cut']:.1f}x); wrote {args.results}")


if __name__ == "__main__":
    main()
