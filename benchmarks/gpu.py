"""The GPU benchmark: DyLoRA vs PEFT LoRA on one CUDA device, step time (CUDA events, after warm-up), tokens/s
and peak memory (torch.cuda.max_memory_allocated), bf16 and 4-bit (nf4 + double quantization, bf16 compute),
r = 8 and 64, sequence 512 and 2048, on a ~1B-parameter Llama built from a config (TinyLlama's shape, random
weights: memory and speed need no trained weights). Each arm runs in its own process (benchmarks/qlora.py's
worker), in the order LoRA, DyLoRA one-pass (rowwise), DyLoRA default (rowwise + distill) for every setting.

    python benchmarks/gpu.py                 # on a CUDA machine: table printed, benchmarks/results/gpu.json
    python benchmarks/gpu.py --tiny          # the same code on a tiny config on the CPU (what the test runs)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import qlora  # noqa: E402

GPU_DEFAULTS = {"models": "llama-1b", "precisions": "bf16,4bit", "arms": "lora,dylora-rowwise,dylora-default",
                "r": "8,64", "seq": "512,2048", "batch": 1, "steps": 10, "warmup": 3, "repeats": 1}
TINY_DEFAULTS = {**GPU_DEFAULTS, "models": "tiny", "seq": "32,64", "r": "4,8", "steps": 1, "warmup": 1,
                 "precisions": "fp32,4bit"}


def main(argv: list[str] | None = None) -> int:
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    tiny = "--tiny" in argv
    argv = [a for a in argv if a != "--tiny"]
    if not tiny and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here; run it on a GPU machine, or --tiny for the CPU check",
              file=sys.stderr)
        return 2
    qlora.main(argv, device="cpu" if tiny else "cuda",
               default_out="benchmarks/results/gpu-tiny.json" if tiny else "benchmarks/results/gpu.json",
               defaults=TINY_DEFAULTS if tiny else GPU_DEFAULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
