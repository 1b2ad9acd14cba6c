"""The DyLoRA math, in one place.

A LoRA block on a frozen weight W0 holds A (r x d) and B (m x r). DyLoRA trains it over every rank b in
[r_min, r] and, at rank b, computes

    h = W0 x + (lora_alpha / b) * B[:, :b] @ A[:b, :] @ x

Instead of slicing the weights (which recompiles ``torch.compile`` per rank and breaks FSDP, where a
weight is unsharded only inside its own module's forward), the rank dimension of the activation is
masked with the *rank scale* vector

    s_b[i] = lora_alpha / b   if i < b   else 0          (i = 0 .. r-1)

so ``B @ (s_b * (A @ x))`` is exactly the formula above, with one graph for all ranks. In full mode
rows/columns 1..b of A/B get gradient and the rest get exactly zero (their activations are zero).
In frozen mode ("DyLoRA (Frozen)") only row b of A and column b of B learn: rows/columns 1..b-1 are
used in the forward but their gradient is cut by the *gradient mask* g_b[i] = 1 if i == b-1 else 0.
"""

from __future__ import annotations

import torch


def check_rank(rank: int, r_min: int, r: int) -> int:
    """Return ``rank`` if it lies in [r_min, r], else raise a ValueError naming the range."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not r_min <= rank <= r:
        raise ValueError(f"rank {rank!r} is outside [r_min, r] = [{r_min}, {r}]: a rank is an integer in that range")
    return rank


def rank_scale(rank: int, r: int, lora_alpha: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The vector s_b: lora_alpha / b on the first b components, 0 on the rest (written into ``out``)."""
    s = torch.zeros(r) if out is None else out
    with torch.no_grad():
        s.zero_()
        s[:rank] = lora_alpha / rank
    return s


def grad_mask(rank: int, r: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The vector g_b of frozen mode: 1 at component b (index b-1), 0 elsewhere."""
    g = torch.zeros(r) if out is None else out
    with torch.no_grad():
        g.zero_()
        g[rank - 1] = 1.0
    return g


def keep_grad(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight`` with the same values, but gradient only where ``mask`` (broadcast) is 1.

    The values are exact: w * 1 + w.detach() * 0 = w and w * 0 + w.detach() * 1 = w.
    """
    mask = mask.to(weight.dtype)
    return weight * mask + weight.detach() * (1 - mask)


def rank_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The weight update at rank b, (lora_alpha / b) B_b A_b = B diag(s_b) A, shaped like B @ A."""
    return (lora_B * scale.to(lora_B.dtype)) @ lora_A
