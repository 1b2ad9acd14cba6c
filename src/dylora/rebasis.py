"""Re-basis during training: rotate every DyLoRA layer's A and B so that their components come in singular-value
order, the update B A unchanged (`functional.svd_rebasis`), and carry the optimizer state of A and B across.

After a re-basis the prefix basis of rank b is the SVD cut of the layer's update (the best rank-b approximation),
so a recipe that trains per-example ranks (rowwise) goes on from the best nested order of what it has learned.
`rebasis_every` and `lora_first` (`DyLoraConfig`) say when; `RecipeCallback` calls `rebasis` after those optimizer
steps. The optimizer state of A and B (AdamW's moments) no longer fits the new coordinates:

- "reset": dropped, so the optimizer starts A and B afresh (AdamW: step 0, zero moments, bias correction anew);
- "rotate": mapped through the change of coordinates A' = P_A A, B' = B P_B. A gradient maps as g_A' = P_A^{-T} g_A
  and g_B' = g_B P_B^{-T}, so the first moment maps exactly so; the second (an elementwise mean of squares) maps
  through the squared entries of the same matrices, exact for a permutation or a diagonal P and an approximation
  otherwise. P^{-1} is the pseudo-inverse (a component with s_i = 0 has no inverse).

A layer with r > in or r > out is left as it is (its update has fewer than r singular values), and so is a layer
whose A or B is not finite (a diverged run: it has no SVD, and the training guard stops the run on it).
"""

from __future__ import annotations

from typing import Any

import torch

from .functional import svd_rebasis
from .model import select_adapters, unwrap

MOMENTS = ("exp_avg", "exp_avg_sq")


def _layers(model: torch.nn.Module, adapter: str) -> list[Any]:
    from peft.tuners.lora.layer import LoraLayer

    return [m for m in unwrap(model).modules() if isinstance(m, LoraLayer) and adapter in m.lora_variant]


@torch.no_grad()
def rebasis(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, state: str = "reset",
            adapter_name: str | None = None) -> int:
    """Rotate A and B of every DyLoRA layer into singular-value order (B A unchanged), with the optimizer state of
    A and B reset or rotated (`state`); returns the number of layers re-based."""
    if state not in ("reset", "rotate"):
        raise ValueError(f"state must be reset or rotate, got {state!r}")
    count = 0
    for name in select_adapters(model, adapter_name):
        for module in _layers(model, name):
            variant = module.lora_variant[name]
            A, B = variant.factors(module, name)  # (r, in) and (out, r) views of the parameters
            if A.shape[0] > min(A.shape[1], B.shape[0]) or not (A.isfinite().all() and B.isfinite().all()):
                continue
            new_a, new_b, _ = svd_rebasis(A, B)
            pa = pb = None
            if optimizer is not None and state == "rotate":
                pa = new_a @ torch.linalg.pinv(A.double())  # A' = P_A A
                pb = torch.linalg.pinv(B.double()) @ new_b  # B' = B P_B
            A.copy_(new_a.to(A.dtype))
            B.copy_(new_b.to(B.dtype))
            if optimizer is not None:
                a_param, b_param = variant.params(module, name)
                _carry(optimizer, a_param, None if pa is None else torch.linalg.pinv(pa).T, left=True)
                _carry(optimizer, b_param, None if pb is None else torch.linalg.pinv(pb).T, left=False)
            count += 1
    return count


def _carry(optimizer: torch.optim.Optimizer, param: torch.Tensor, inv_t: torch.Tensor | None, left: bool) -> None:
    """Reset (`inv_t` None) or rotate the optimizer state of one factor: m' = P^{-T} m (A, `left`) or m P^{-T} (B)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    st = optimizer.state.get(param)
    if not st:
        return
    if inv_t is None:
        optimizer.state.pop(param)
        return
    for key in MOMENTS:
        if key not in st:
            continue
        value = st[key]
        flat = value.flatten(1).double()
        m = inv_t if key == "exp_avg" else inv_t ** 2
        out = (m @ flat) if left else (flat @ m)
        value.copy_(out.view_as(value).to(value.dtype))


__all__ = ["rebasis"]
