"""The DyLoRA math, in one place.

A LoRA block on a frozen weight W0 holds A (r x d) and B (m x r). DyLoRA trains it over every rank b in
[r_min, r] and, at rank b, computes

    h = W0 x + c(b) * B[:, :b] @ A[:b, :] @ x,    c(b) = lora_alpha / b  (the paper; `rank_scaling="alpha/b"`)
                                                  c(b) = lora_alpha / sqrt(b)  (rsLoRA's; "alpha/sqrt(b)")

Instead of slicing the weights (which recompiles ``torch.compile`` per rank and breaks FSDP, where a
weight is unsharded only inside its own module's forward), the rank dimension of the activation is
masked with the *rank scale* vector

    s_b[i] = c(b)   if i < b   else 0          (i = 0 .. r-1)

so ``B @ (s_b * (A @ x))`` is exactly the formula above, with one graph for all ranks. In full mode
rows/columns 1..b of A/B get gradient and the rest get exactly zero (their activations are zero).
In frozen mode ("DyLoRA (Frozen)") only row b of A and column b of B learn: rows/columns 1..b-1 are
used in the forward but their gradient is cut by the *gradient mask* g_b[i] = 1 if i == b-1 else 0.

Per-layer ranks (`dylora.set_layer_ranks`, allocation) may also be b = 0: s_0 = 0, the layer switched off
(h = W0 x, and it is left out of an export).

Per-example ranks: with a rank b_j for each row j of a batch, the scale is a (batch, r) matrix S whose row
j is s_{b_j}; row j of the output is row j at rank b_j alone, still without slicing a weight.

Expected scale (the "nested" recipe, one pass a step): the layer output f_b(x) = W0 x + B diag(s_b) A x is
affine in s_b, so for b ~ P over [r_min, r]

    E_b[f_b(x)] = W0 x + B diag(E_b[s_b]) A x,    E_b[s_b][i] = sum_{b > i} P(b) c(b),

and every component i < r gets gradient every step (E[s_b][i] > 0 wherever some b > i has P(b) > 0).
For one layer this trains the P-average of the rank-b outputs in a single forward; through a deep network
it trains that one "expected" adapter, an approximation of the average of the per-rank losses (the
paper's Table-7 summed loss, which needs one pass per rank).

Two bases for rank b. The *prefix* (above, the paper's) keeps the first b components as trained. The *SVD
cut* keeps the best rank-b approximation (Eckart-Young) of the layer's full update c(r) B A = U S V^T:

    dW_svd(b) = U_b S_b V_b^T = B_s[:, :b] A_s[:b],    A_s = sqrt(S) V^T,  B_s = U sqrt(S).

With A^T = Q_A R_A and B = Q_B R_B (thin QR) and c(r) R_B R_A^T = U' S V'^T (an r x r SVD), A_s = M_in A and
B_s = B M_out for the r x r matrices M_in = sqrt(S) V'^T pinv(R_A^T), M_out = pinv(R_B) U' sqrt(S), so the SVD
cut is still a mask on the r-dimensional activation: W0 x + B M_out (m_b * (M_in A x)), m_b[i] = 1 if i < b
else 0. It costs O((in + out) r^2) per layer, never an SVD of the (out x in) update.
"""

from __future__ import annotations

import math

import torch

from .options import RANK_SCALINGS


def check_rank(rank: int, r_min: int, r: int, *, off: bool = False) -> int:
    """Return ``rank`` if it lies in [r_min, r] (or is 0, a layer switched off, when ``off``), else raise a
    ValueError naming the range."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not (r_min <= rank <= r or (off and rank == 0)):
        zero = " or 0 (the layer switched off)" if off else ""
        raise ValueError(f"rank {rank!r} is outside [r_min, r] = [{r_min}, {r}]: a rank is an integer in that "
                         f"range{zero}")
    return rank


def component_cost(A: torch.Tensor, B: torch.Tensor) -> int:
    """Adapter parameters per rank component, in + out, of A (r, in, *kernel) and B (out, r, *ones): a layer at rank
    b holds b times this (in = in_channels * prod(kernel) for a conv; num_embeddings for an embedding)."""
    return A[0].numel() + B[:, 0].numel()


def rank_coefficient(rank: int, lora_alpha: float, scaling: str = "alpha/b") -> float:
    """c(b): lora_alpha / b, or lora_alpha / sqrt(b) (exactly PEFT's rsLoRA scale at r = b); c(0) = 0."""
    if rank == 0 and scaling in RANK_SCALINGS:
        return 0.0
    if scaling == "alpha/b":
        return lora_alpha / rank
    if scaling == "alpha/sqrt(b)":
        return lora_alpha / math.sqrt(rank)
    raise ValueError(f"rank_scaling must be one of {', '.join(RANK_SCALINGS)}, got {scaling!r}")


def rank_scale(rank: int, r: int, lora_alpha: float, *, scaling: str = "alpha/b",
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The vector s_b: c(b) on the first b components, 0 on the rest (written into ``out``)."""
    s = torch.zeros(r) if out is None else out
    with torch.no_grad():
        s.zero_()
        s[:rank] = rank_coefficient(rank, lora_alpha, scaling)
    return s


def scale_table(r: int, lora_alpha: float, scaling: str = "alpha/b") -> torch.Tensor:
    """The (r, r) matrix whose row b-1 is s_b, for b = 1 .. r."""
    return torch.stack([rank_scale(b, r, lora_alpha, scaling=scaling) for b in range(1, r + 1)])


def example_scale(ranks: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The (batch, r) per-example scale: row j is s_{b_j}, looked up in ``scale_table``."""
    return table[ranks.long().cpu() - 1]


def expected_scale(pmf: torch.Tensor, r_min: int, table: torch.Tensor) -> torch.Tensor:
    """E_b[s_b] = sum_b P(b) s_b, with ``pmf`` over b = r_min .. r (so component i gets sum_{b>i} P(b) c(b))."""
    pmf = torch.as_tensor(pmf, dtype=torch.float64)
    return (pmf @ table[r_min - 1:].double()).to(table.dtype)


def broadcast_scale(scale: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``scale`` shaped to multiply the rank activation h (..., r): a (r,) vector as is, and a per-example
    (batch, r) matrix as (batch, 1, ..., 1, r)."""
    if scale.dim() == 1:
        return scale
    if scale.shape[0] != h.shape[0]:
        raise ValueError(f"per-example ranks were set for {scale.shape[0]} rows, but the batch has {h.shape[0]}")
    return scale.view(scale.shape[0], *([1] * (h.dim() - 2)), scale.shape[1])


def grad_mask(rank: int, r: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The vector g_b of frozen mode: 1 at component b (index b-1), 0 elsewhere (all 0 at b = 0)."""
    g = torch.zeros(r) if out is None else out
    with torch.no_grad():
        g.zero_()
        if rank > 0:
            g[rank - 1] = 1.0
    return g


def keep_grad(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight`` with the same values, but gradient only where ``mask`` (broadcast) is 1.

    The values are exact: w * 1 + w.detach() * 0 = w and w * 0 + w.detach() * 1 = w.
    """
    mask = mask.to(weight.dtype)
    return weight * mask + weight.detach() * (1 - mask)


def rank_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The weight update at rank b, c(b) B_b A_b = B diag(s_b) A, shaped like B @ A."""
    if scale.dim() != 1:
        raise ValueError("per-example ranks are set: choose one rank (dylora.set_rank) before merging")
    return (lora_B * scale.to(lora_B.dtype)) @ lora_A


def svd_mixers(lora_A: torch.Tensor, lora_B: torch.Tensor, coefficient: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M_in, M_out, S) of the SVD cut of coefficient * B A (A is r x in, B is out x r), in float64.

    B M_out diag(m_b) M_in A is the best rank-b approximation of coefficient * B A, for every b; S holds its
    singular values, largest first. A layer with in < r or out < r has k = min(in, out, r) of them: the other
    r - k components are zero (zero rows of M_in, zero columns of M_out, zeros in S), so the shapes stay r.
    """
    A, B = lora_A.detach().double(), lora_B.detach().double()
    r = A.shape[0]
    _, r_a = torch.linalg.qr(A.T)  # A = R_A^T Q_A^T
    _, r_b = torch.linalg.qr(B)  # B = Q_B R_B
    u, s, vh = torch.linalg.svd(coefficient * (r_b @ r_a.T), full_matrices=False)
    root = s.sqrt()
    m_in = root[:, None] * vh @ torch.linalg.pinv(r_a.T)
    m_out = torch.linalg.pinv(r_b) @ u * root[None, :]
    k = s.shape[0]
    return (torch.cat([m_in, m_in.new_zeros(r - k, r)]), torch.cat([m_out, m_out.new_zeros(r, r - k)], 1),
            torch.cat([s, s.new_zeros(r - k)]))


def svd_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, coefficient: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A_s, B_s, S) in float64: B_s[:, :b] A_s[:b] is the best rank-b approximation of coefficient * B A."""
    m_in, m_out, s = svd_mixers(lora_A, lora_B, coefficient)
    return m_in @ lora_A.detach().double(), lora_B.detach().double() @ m_out, s


def prefix_mask(rank: int, r: int) -> torch.Tensor:
    """The SVD basis's mask m_b: 1 on the first b components, 0 on the rest (all 0 at b = 0)."""
    m = torch.zeros(r)
    m[:rank] = 1.0
    return m


def svd_rebasis(lora_A: torch.Tensor, lora_B: torch.Tensor, row_norm: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A', B', S) in float64: the same update, B' A' = B A, with its r components in singular-value order.

    With A^T = Q_A R_A, B = Q_B R_B (thin QR) and R_B R_A^T = U' S V'^T (an r x r SVD), B A = (Q_B U') S (Q_A V')^T,
    so (the `svd_mixers` rotation, in another gauge)

        A' = a V'^T Q_A^T,    B' = Q_B U' S / a,    B' A' = Q_B U' S V'^T Q_A^T = B A,

    and component i of B' A' is u_i s_i v_i^T with s_1 >= s_2 >= ...: the prefix basis of (A', B') is the SVD cut of
    B A (Eckart-Young) at every rank. Every row of A' has norm a (default: the root-mean-square row norm of A), so a
    component with s_i = 0 keeps a live A row (its B column is zero, as LoRA starts) instead of vanishing from both
    factors, which the balanced factors sqrt(S) V^T, U sqrt(S) would do. Needs r <= in and r <= out.
    """
    A, B = lora_A.detach().double(), lora_B.detach().double()
    r = A.shape[0]
    if A.shape[1] < r or B.shape[0] < r:
        raise ValueError(f"a re-basis needs r <= in and r <= out; this layer has r = {r}, in = {A.shape[1]}, "
                         f"out = {B.shape[0]}")
    q_a, r_a = torch.linalg.qr(A.T)
    q_b, r_b = torch.linalg.qr(B)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    a = float(A.norm() / math.sqrt(r)) if row_norm is None else float(row_norm)
    if not a > 0:
        a = 1.0
    return a * vh @ q_a.T, q_b @ u * (s / a)[None, :], s
