"""The rank sweep: a model's metrics at each rank (and basis), and the trainable parameters a rank-b adapter has.

`rank_sweep(model, evaluate)` works on any DyLoRA model, trained by `dylora.training`, by the CLI or by a
Trainer of your own; `dylora.app` writes its rows to a run's sweep.json.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .functional import component_cost
from .layers import BASES
from .model import at_rank, select_adapters, unwrap


@dataclass
class SweepRow:
    """One rank of a sweep: the rank, its metrics, the trainable parameters a rank-b adapter has, and the basis
    of the rank ("prefix" or "svd")."""

    rank: int
    metrics: dict[str, float]
    params: int
    extra: dict[str, Any] = field(default_factory=dict)
    basis: str = "prefix"


def rank_parameters(model: torch.nn.Module, b: int) -> int:
    """Trainable parameters of the model cut to rank b: b (in + out) per adapted layer, plus the rest."""
    from peft.tuners.lora.layer import LoraLayer

    peft_model = unwrap(model)
    lora = 0
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for name, r in module.r.items():
                variant = module.lora_variant.get(name)
                if hasattr(variant, "cost"):
                    lora += b * variant.cost(module, name)
                elif name in module.lora_A:  # a plain LoRA adapter has its own fixed rank
                    lora += r * component_cost(module.lora_A[name].weight, module.lora_B[name].weight)
                elif name in module.lora_embedding_A:
                    lora += r * component_cost(module.lora_embedding_A[name], module.lora_embedding_B[name])
    others = sum(p.numel() for n, p in peft_model.named_parameters()
                 if p.requires_grad and "lora_" not in n)
    return lora + others


def rank_sweep(model: torch.nn.Module, evaluate: Callable[[torch.nn.Module], dict[str, float]],
               ranks: Iterable[int] | None = None, adapter_name: str | None = None,
               progress: bool = True, basis: str = "prefix") -> list[SweepRow]:
    """Evaluate the model at each rank (default every b in [r_min, r]) and restore the previous rank.

    `basis`: "prefix", "svd", or "both" (a row per rank and basis, prefix first). Per-example scores that
    `evaluate` returns (keys "example_*", lists) go to the row's `extra`, not its metrics (the paired basis pick).
    """
    cfg = next(iter(select_adapters(model, adapter_name).values()))
    ranks = list(range(cfg.r_min, cfg.r + 1)) if ranks is None else list(ranks)
    if basis not in (*BASES, "both"):
        raise ValueError(f"basis must be one of {', '.join(BASES)}, both; got {basis!r}")
    points = [(b, base) for b in ranks for base in (BASES if basis == "both" else (basis,))]
    rows = []
    iterator: Iterable[tuple[int, str]] = points
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(points, desc="rank sweep", unit="rank")
    for b, base in iterator:
        with at_rank(model, b, adapter_name, basis=base):
            scores = dict(evaluate(model))
            extra = {k: scores.pop(k) for k in [k for k in scores if k.startswith("example_")]}
            rows.append(SweepRow(b, scores, rank_parameters(model, b), extra, basis=base))
    return rows


__all__ = ["SweepRow", "rank_parameters", "rank_sweep"]
