"""Per-layer ranks under a parameter budget, chosen after training.

A DyLoRA adapter is ordered: in every layer its first b components were trained to stand alone, so one trained
adapter can be cut to a different rank b_l in each layer l. At rank b a layer holds b (in_l + out_l) adapter
parameters (b (num_embeddings + dim) for an embedding). `allocate` starts at r_min in every layer and adds
components, always the next one of a layer (prefixes only), while they fit the budget; with `min_rank=0` it
starts at 0 (the layer switched off) and a layer comes back at r_min:

- "norm" (data-free, milliseconds): keep each layer's update close to its full update. Layer l at rank b
  is off by err_l(b) = ||dW_l(b) - dW_l(r)||_F^2, with dW(b) = (alpha / b) B[:, :b] A[:b]; components go
  where err drops most per parameter.
- "greedy" (data-driven): add the components whose addition lowers a calibration loss most per parameter.

Apply the result with `dylora.set_layer_ranks`, or write it with `dylora.export_lora(..., ranks=...)` or
`dylora.merge(..., ranks=...)`. (This module is not named `allocate.py`: a submodule named like the function
`dylora.allocate` would replace it on the package once anything imported the submodule.)
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

import torch
from peft.tuners.lora.layer import LoraLayer

from .functional import rank_scale
from .layers import check_basis, set_layer_rank
from .model import named_layers, one_adapter, rank_states, refuse_if_merged, restore_rank_states

ALLOCATION_METHODS = ("norm", "greedy")
BUDGET_KINDS = ("rank", "params")


def layer_costs(model: torch.nn.Module, adapter_name: str | None = None) -> dict[str, int]:
    """Adapter parameters per rank component of each layer, in + out: a layer at rank b holds b times this."""
    name, _ = one_adapter(model, adapter_name)
    return {key: module.lora_variant[name].cost(module, name) for key, module in named_layers(model, name).items()}


def lowest_rank(min_rank: int | None, r_min: int) -> int:
    """The smallest rank a layer may get: r_min (`min_rank` None) or 0 (layers may be switched off)."""
    low = r_min if min_rank is None else min_rank
    if low not in (0, r_min) or isinstance(low, bool):
        raise ValueError(f"min_rank must be 0 (layers may be switched off) or r_min = {r_min}, got {min_rank!r}")
    return low


def check_average_rank(budget: float, low: int, r: int) -> None:
    """Refuse an average-rank budget outside [low, r] (a check that needs no model)."""
    if not low <= budget <= r:
        raise ValueError(f"budget {budget:g} (an average rank) is outside the feasible range "
                         f"[{'min_rank' if low == 0 else 'r_min'}, r] = [{low}, {r}]")


def _budget_params(budget: float, kind: str, per_rank: int, low: int, r: int) -> int:
    """The budget in parameters, checked to lie between rank `low` and r in every layer."""
    if kind not in BUDGET_KINDS:
        raise ValueError(f"budget_kind must be one of {', '.join(BUDGET_KINDS)}, got {kind!r}")
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not math.isfinite(budget):
        raise ValueError(f"budget must be a finite number, got {budget!r}")
    if kind == "rank":
        check_average_rank(budget, low, r)
        return math.floor(budget * per_rank + 1e-6)
    if not low * per_rank <= budget <= r * per_rank:
        raise ValueError(f"budget {budget!r} parameters is outside the feasible range [{low * per_rank}, "
                         f"{r * per_rank}] (rank {low} to r = {r} in every layer)")
    return math.floor(budget)


def _grown(b: int, k: int, r_min: int) -> int:
    """The rank k components above b, where a layer switched off (b = 0) comes back at r_min at least."""
    return max(b + k, r_min)


def truncation_errors(module: LoraLayer, adapter: str, basis: str = "prefix") -> list[float]:
    """err(b) = ||dW(b) - dW(r)||_F^2 for b = 0..r (b = 0: the layer off; entries 1..r_min-1 are 0 and unused).

    Prefix basis: with d = s_b - s_r (the rank-scale vectors), dW(b) - dW(r) = B diag(d) A, whose squared norm
    is d^T G d with the r x r Gram matrix G = (B^T B) * (A A^T) (elementwise): no d_out x d_in matrix is built.
    SVD basis: sum_{i >= b} S_i^2 (Eckart-Young), S the singular values of the full update.
    """
    variant = module.lora_variant[adapter]
    if check_basis(basis) == "svd":
        energy = (variant.svd(module, adapter)[2] ** 2).tolist()
        return [float(sum(energy[b:])) if b == 0 or b >= variant.r_min else 0.0 for b in range(variant.r + 1)]
    A, B = (t.detach().float() for t in variant.factors(module, adapter))
    gram = ((B.T @ B) * (A @ A.T)).double().cpu()
    full = rank_scale(variant.r, variant.r, variant.lora_alpha, scaling=variant.rank_scaling).double()
    errors = [0.0] * (variant.r + 1)
    for b in [0, *range(variant.r_min, variant.r + 1)]:
        d = rank_scale(b, variant.r, variant.lora_alpha, scaling=variant.rank_scaling).double() - full
        errors[b] = float(d @ gram @ d)
    return errors


def _best_extension(errors: list[float], b: int, r_min: int, r: int, cost: int,
                    left: int) -> tuple[float, int] | None:
    """(error drop per parameter, new rank) of the best b -> b2 that fits in `left`, or None."""
    best = None
    for b2 in range(_grown(b, 1, r_min), min(r, b + left // cost) + 1):
        gain = (errors[b] - errors[b2]) / ((b2 - b) * cost)
        if best is None or gain > best[0]:
            best = (gain, b2)
    return best


def _norm(errors: dict[str, list[float]], costs: dict[str, int], low: int, r_min: int, r: int,
          left: int) -> dict[str, int]:
    """Grow the layer whose error drops most per parameter until nothing fits.

    A layer may grow by several components at once (b -> b2, the best average drop), so a layer whose next
    component alone helps little but whose next two help a lot is not starved. A heap holds each layer's best
    step; only the grown layer's step changes, and a step that no longer fits is recomputed when popped.
    """
    ranks = dict.fromkeys(errors, low)
    order = {key: i for i, key in enumerate(errors)}
    heap: list[tuple[float, int, int, str]] = []

    def push(key: str) -> None:
        best = _best_extension(errors[key], ranks[key], r_min, r, costs[key], left)
        if best is not None:
            heapq.heappush(heap, (-best[0], order[key], best[1], key))

    for key in errors:
        push(key)
    while heap:
        _, _, b2, key = heapq.heappop(heap)
        extra = (b2 - ranks[key]) * costs[key]
        if extra <= left:
            ranks[key] = b2
            left -= extra
        push(key)
    return ranks


def _loss(loss_fn: Callable[[torch.nn.Module], float], model: torch.nn.Module) -> float:
    value = float(loss_fn(model))
    if not math.isfinite(value):
        raise ValueError(f"loss_fn returned {value}; it must return a finite float")
    return value


def _greedy(model: torch.nn.Module, adapter: str, layers: dict[str, LoraLayer], costs: dict[str, int],
            low: int, r_min: int, r: int, left: int, loss_fn: Callable[[torch.nn.Module], float], step: int,
            lazy: bool, progress: bool, basis: str = "prefix") -> dict[str, int]:
    """Each round, grow the layer whose next `step` components lower the loss most per parameter.

    Exact (`lazy=False`): every layer is tried in every round. Lazy: a heap keeps each layer's gain from the
    round it was last tried; a popped gain from an older round is tried again at the current ranks and pushed
    back, so a layer is taken once its current gain beats every other layer's stale gain (exact where gains
    only shrink as others grow). Ties go to the earlier layer.
    """
    from tqdm.auto import tqdm

    ranks = dict.fromkeys(layers, low)
    for module in layers.values():
        set_layer_rank(module, adapter, low, basis)
    loss = _loss(loss_fn, model)
    order = {key: i for i, key in enumerate(layers)}
    heap: list[tuple[float, int, str, int, float, int]] = []  # (-gain, order, layer, new rank, its loss, round)
    rounds = 0  # layers grown so far: a heap entry from an earlier round is stale

    def push(key: str) -> None:
        """Try `step` more components in layer `key` (as many as fit) and push the gain per parameter."""
        b = ranks[key]
        b2 = min(_grown(b, step, r_min), r, b + left // costs[key])
        if b2 <= b or b2 < r_min:
            return  # nothing fits any more, and `left` only shrinks
        set_layer_rank(layers[key], adapter, b2, basis)
        value = _loss(loss_fn, model)
        set_layer_rank(layers[key], adapter, b, basis)
        heapq.heappush(heap, (-(loss - value) / ((b2 - b) * costs[key]), order[key], key, b2, value, rounds))

    for key in layers:
        push(key)
    with tqdm(total=left, desc="greedy allocation", unit="param", disable=not progress) as bar:
        while heap:
            _, _, key, b2, value, tried = heapq.heappop(heap)
            if tried != rounds:
                push(key)
                continue
            left -= (b2 - ranks[key]) * costs[key]
            bar.update((b2 - ranks[key]) * costs[key])
            ranks[key], loss = b2, value
            set_layer_rank(layers[key], adapter, b2, basis)
            rounds += 1
            if not lazy:
                heap.clear()
            for other in (key,) if lazy else layers:
                push(other)
    return ranks


def allocate(model: torch.nn.Module, budget: float, method: str = "norm", *,
             loss_fn: Callable[[torch.nn.Module], float] | None = None, budget_kind: str = "rank",
             adapter_name: str | None = None, progress: bool = False, step: int = 1, min_rank: int | None = None,
             lazy: bool = True, basis: str = "prefix") -> dict[str, int]:
    """Per-layer ranks {module name: b_l} of a trained DyLoRA adapter within a parameter budget.

    Args:
        model: a DyLoRA model; its ranks are the same before and after the call.
        budget: an average rank in [min_rank, r] (`budget_kind="rank"`: budget * sum_l (in_l + out_l) parameters
            may be spent) or a number of adapter parameters (`budget_kind="params"`). Layer l at rank b costs
            b (in_l + out_l) (see `layer_costs`). The result never exceeds the budget and is full: no layer's
            next component still fits.
        method: "norm" (data-free: keep ||dW_l(b_l) - dW_l(r)||_F^2 small, see `truncation_errors`; it accounts
            for the scale alpha / b_l rescaling every kept component, which a per-component score
            ||B[:, i]|| ||A[i]|| alpha / b could not, as b_l is not known while scoring) or "greedy"
            (data-driven: each round grows by `step` components the layer whose growth lowers `loss_fn(model)`
            most per added parameter, even if none lowers it, until the budget is spent).
        loss_fn: for "greedy": model -> float, a calibration loss evaluated at the model's current ranks (run
            under `torch.no_grad`, model in eval mode). Exact greedy calls it n_layers times a round, and a round
            adds `step` components: about n_layers * n_layers * (budget - r_min) / step calls for an average
            rank budget with layers of one size; lazy greedy (the default) about 2-3 a round.
        budget_kind: "rank" or "params".
        adapter_name: the DyLoRA adapter (default: the active one).
        progress: show a progress bar (greedy).
        step: components a greedy round adds to a layer at once.
        min_rank: the smallest rank a layer may get: the adapter's r_min (None, the default) or 0, which lets
            allocation switch layers off (the budget may then be any average rank in [0, r]).
        lazy: greedy re-tries only the most promising layer each round (see `_greedy`); False tries all.
        basis: the ranks' basis, "prefix" or "svd" (each layer's best rank-b_l approximation); apply the result
            in the same basis (`set_layer_ranks(..., basis=...)`, `export_lora(..., basis=...)`).
    """
    check_basis(basis)
    name, cfg = one_adapter(model, adapter_name)
    if method not in ALLOCATION_METHODS:
        raise ValueError(f"method must be one of {', '.join(ALLOCATION_METHODS)}, got {method!r}")
    if method == "greedy" and not callable(loss_fn):
        raise ValueError("method='greedy' needs loss_fn: a callable model -> float (a calibration loss)")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an integer >= 1, got {step!r}")
    low = lowest_rank(min_rank, cfg.r_min)
    layers = named_layers(model, name)
    costs = layer_costs(model, name)
    per_rank = sum(costs.values())
    left = _budget_params(budget, budget_kind, per_rank, low, cfg.r) - low * per_rank
    if method == "norm":
        errors = {key: truncation_errors(module, name, basis) for key, module in layers.items()}
        return _norm(errors, costs, low, cfg.r_min, cfg.r, left)
    refuse_if_merged(model, [name])
    previous, training = rank_states(model, [name]), model.training
    model.eval()
    try:
        with torch.no_grad():
            return _greedy(model, name, layers, costs, low, cfg.r_min, cfg.r, left, loss_fn, step, lazy, progress,
                           basis)
    finally:
        restore_rank_states(previous)
        model.train(training)
