"""Training with DyLoRA: the HF Trainer callback, the manual-loop helper, and the rank sweep."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from .model import at_rank, dylora_adapters, get_rank, select_adapters, set_rank, unwrap
from .sampler import RankSampler

RANK_KEY = "dylora/rank"


def step_rank(model: torch.nn.Module, sampler: RankSampler, step: int) -> int:
    """Set the rank of optimizer step `step` (for a manual loop) and return it."""
    b = sampler.sample(step)
    set_rank(model, b)
    return b


class DyLoraCallback(TrainerCallback):
    """Samples the DyLoRA rank once per optimizer step with the HF Trainer.

    `on_step_begin` fires once per optimizer step, so every gradient-accumulation micro-batch of a step
    uses the same rank b = sampler.sample(global_step). After the step the rank goes back to `eval_rank`
    (r_max by default), so evaluation inside training never runs at a leftover sampled rank. Each logged
    training step gets a `dylora/rank` entry in `trainer.state.log_history`.
    """

    def __init__(self, sampler: RankSampler, eval_rank: int | None = None) -> None:
        self.sampler = sampler
        self.eval_rank = eval_rank if eval_rank is not None else sampler.r_max
        self.current: int | None = None
        self.history: list[tuple[int, int]] = []  # (optimizer step, rank) seen by this process

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.current = step_rank(model, self.sampler, state.global_step)
        self.history.append((state.global_step, self.current))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        set_rank(model, self.eval_rank)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self.current is not None and state.log_history:
            state.log_history[-1][RANK_KEY] = self.current


@dataclass
class SweepRow:
    """One rank of a sweep: the rank, its metrics, and the trainable parameters a rank-b adapter has."""

    rank: int
    metrics: dict[str, float]
    params: int
    extra: dict[str, Any] = field(default_factory=dict)


def rank_parameters(model: torch.nn.Module, b: int) -> int:
    """Trainable parameters of the model cut to rank b: b (in + out) per adapted layer, plus the rest."""
    from peft.tuners.lora.layer import LoraLayer

    peft_model = unwrap(model)
    lora = 0
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for name, r in module.r.items():
                k = b if name in module.lora_variant else r  # a plain LoRA adapter has its own fixed rank
                if name in module.lora_A:
                    lora += k * (module.lora_A[name].in_features + module.lora_B[name].out_features)
                elif name in module.lora_embedding_A:
                    lora += k * (module.lora_embedding_A[name].shape[1] + module.lora_embedding_B[name].shape[0])
    others = sum(p.numel() for n, p in peft_model.named_parameters()
                 if p.requires_grad and "lora_" not in n)
    return lora + others


def rank_sweep(model: torch.nn.Module, evaluate: Callable[[torch.nn.Module], dict[str, float]],
               ranks: Iterable[int] | None = None, adapter_name: str | None = None,
               progress: bool = True) -> list[SweepRow]:
    """Evaluate the model at each rank (default every b in [r_min, r]) and restore the previous rank."""
    cfg = next(iter(select_adapters(model, adapter_name).values()))
    ranks = list(range(cfg.r_min, cfg.r + 1)) if ranks is None else list(ranks)
    rows = []
    iterator: Iterable[int] = ranks
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(ranks, desc="rank sweep", unit="rank")
    for b in iterator:
        with at_rank(model, b, adapter_name):
            rows.append(SweepRow(b, dict(evaluate(model)), rank_parameters(model, b)))
    return rows


__all__ = ["RANK_KEY", "DyLoraCallback", "SweepRow", "dylora_adapters", "get_rank", "rank_parameters",
           "rank_sweep", "step_rank"]
