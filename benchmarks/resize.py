"""`dylora resize` on a synthetic ~100 MB LoRA adapter: the time to cut it to rank 16 and by --sv-fro 0.9.

    python benchmarks/resize.py                      # 48 layers 4096 x 4096, r = 64, float32 (100.7 MB)
    python benchmarks/resize.py --layers 8 --dim 1024   # a smoke test

The adapter (random A, B with a decaying spectrum, as trained adapters have; written to a temporary directory)
is a plain PEFT LoRA with Llama-style module names. Each `dylora.resize` call is timed whole: reading the
safetensors file, the SVD cut of every layer (`functional.svd_factors`), writing the adapter and its card.
The numbers, the machine's load average and the torch thread count go to benchmarks/results/resize.json.
Target: under 30 s for each cut on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "resize.json"


def make_adapter(path: Path, layers: int, dim: int, r: int, seed: int = 0) -> int:
    """Write a PEFT LoRA with `layers` Linear(dim, dim) targets at rank r; returns its file size in bytes."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{i // 4}.self_attn.{'qkvo'[i % 4]}_proj" for i in range(layers)]
    state = {}
    for n, name in enumerate(names):
        decay = torch.exp(-torch.arange(r) / (4 + n % 16))  # spectra that fall off, faster in some layers
        state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, dim, generator=g) / dim**0.5
        state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(dim, r, generator=g) * decay
    path.mkdir(parents=True)
    LoraConfig(r=r, lora_alpha=r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]).save_pretrained(path)
    save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return (path / "adapter_model.safetensors").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    t0 = time.perf_counter()
    import torch
    from safetensors import safe_open

    import dylora
    from dylora.files import write_json

    import_s = time.perf_counter() - t0
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "adapter"
        size = make_adapter(source, args.layers, args.dim, args.r)
        for label, kw in (("rank16", dict(rank=16)), ("sv_fro0.9", dict(sv_fro=0.9))):
            load0 = os.getloadavg()[0]
            t = time.perf_counter()
            out = dylora.resize(source, Path(tmp) / label, **kw)
            seconds = time.perf_counter() - t
            cfg = json.loads((out / "adapter_config.json").read_text())
            with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
                ranks = [f.get_slice(k).get_shape()[0] for k in f.keys() if "lora_A" in k]
            runs[label] = {"seconds": round(seconds, 2), "load_start": round(load0, 2),
                           "load_end": round(os.getloadavg()[0], 2), "r_out": cfg["r"],
                           "rank_min": min(ranks), "rank_mean": round(sum(ranks) / len(ranks), 2),
                           "output_bytes": (out / "adapter_model.safetensors").stat().st_size}
            print(f"{label}: {seconds:.2f} s  ({runs[label]})")
    record = {"adapter": {"layers": args.layers, "dim": args.dim, "r": args.r, "dtype": "float32", "bytes": size},
              "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "import_s": round(import_s, 2), "runs": runs, "target_s": 30}
    write_json(args.results, record)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
