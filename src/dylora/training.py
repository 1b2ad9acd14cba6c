"""Training with DyLoRA in the HF Trainer: the rank bookkeeping callback, the recipe Trainer, and the recipe loss.

A recipe (`dylora.recipes`) says what one optimizer step trains: its passes, each a forward and a loss at ranks
that are a pure function of (seed, optimizer step). `DyLoraTrainer` runs the recipe in the HF Trainer, one
backward per pass (so memory stays that of one pass and gradient checkpointing recomputes at the pass's rank);
`dylora_loss` is the same recipe as one summed loss, for a Trainer of your own. `RecipeCallback` keeps the rank
history and logs and puts the model back at r_max after each optimizer step; `DyLoraCallback` is that callback
for the paper's recipe with the plain HF Trainer, setting each step's rank itself.
The guard is `dylora.guard`, the rank sweep `dylora.sweep`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from .model import attach_dylora_layers, select_adapters, set_rank, unwrap
from .rebasis import rebasis
from .recipes import RANK_KEY, RANKS_KEY, Paper, Recipe, RecipePass
from .sampler import RankSampler


def step_rank(model: torch.nn.Module, sampler: RankSampler, step: int) -> int:
    """Set the rank of optimizer step `step` (for a manual loop) and return it."""
    b = sampler.sample(step)
    set_rank(model, b)
    return b


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None, *,
               shift: bool = False, denominator: torch.Tensor | float | None = None) -> torch.Tensor:
    """KL(p_teacher || p_student) of softmax predictions over the last dim, averaged over the positions whose
    label != -100 (or summed and divided by `denominator`, the task loss's own normaliser when it has one).

    Classification: logits (batch, classes), one distribution per row. Causal LM (`shift=True`): the logits
    at position t predict token t + 1, so they are compared where labels[t + 1] != -100.
    """
    if shift:
        student, teacher = student[..., :-1, :], teacher[..., :-1, :]
        labels = labels[..., 1:] if labels is not None else None
    log_s = F.log_softmax(student.float(), dim=-1)
    log_t = F.log_softmax(teacher.detach().float(), dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    keep = labels is not None and labels.shape == kl.shape
    mask = (labels != -100) if keep else torch.ones_like(kl, dtype=torch.bool)
    total = (kl * mask).sum()
    return total / (denominator if denominator is not None else mask.sum().clamp(min=1))


def _predicts_next_token(model: torch.nn.Module) -> bool:
    """Whether the model's head is a causal-LM head (logits at position t predict token t + 1, so the KL is taken on
    shifted positions). A question about the head, not the architecture: a Llama with a classification head is a
    decoder-only architecture (`app.zoo.is_causal_lm`) whose logits are per sequence."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    inner = unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return type(base).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def _rows(inputs: dict[str, Any]) -> int:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("inputs hold no tensor to count the batch rows from")


LossFn = Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, Any]]


def model_loss(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """The model's own loss: `(model(**inputs).loss, outputs)`."""
    outputs = model(**inputs)
    return outputs.loss, outputs


def select_rows(inputs: dict[str, Any], rows: tuple[int, ...]) -> dict[str, Any]:
    """The micro-batch's rows `rows`: every tensor indexed by batch row is cut to them, the rest passed through."""
    n = _rows(inputs)
    index = torch.tensor(rows, dtype=torch.long)
    return {k: v[index.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
            for k, v in inputs.items()}


def _share(labels: torch.Tensor | None, rows: tuple[int, ...], n: int, shift: bool) -> float:
    """The share of the micro-batch's loss items (labels != -100, shifted for a causal LM) in the rows `rows`."""
    if labels is None or labels.dim() < 2:
        return len(rows) / n
    valid = (labels[..., 1:] if shift else labels) != -100
    total = int(valid.sum())
    return int(valid[torch.tensor(rows, dtype=torch.long, device=valid.device)].sum()) / total if total else 1.0


def run_pass(model: torch.nn.Module, inputs: dict[str, Any], recipe: Recipe, p: RecipePass,
             compute_loss_fn: LossFn = model_loss, teacher: torch.Tensor | None = None,
             kl_denominator: torch.Tensor | float | None = None,
             teacher_rows: tuple[int, ...] | None = None) -> tuple[torch.Tensor, Any]:
    """The loss of one pass: the task loss at the pass's ranks, mixed with distillation where it has a teacher.

    A pass on a `subset` of the rows gets those rows' inputs (`compute_loss_fn`'s loss of them as it is: the model's
    own loss is their mean; `DyLoraTrainer` scales `num_items_in_batch` to their items). The KL towards a teacher that
    ran on `teacher_rows` only is taken on those rows, a mean over them (`kl_denominator` times their share of the
    batch's loss items)."""
    labels = inputs.get("labels")
    recipe.apply(model, p)
    loss, outputs = compute_loss_fn(model, inputs if p.subset is None else select_rows(inputs, p.subset))
    if p.distill and teacher is not None:
        w, student, denominator, shift = recipe.distill_weight, outputs.logits, kl_denominator, \
            _predicts_next_token(model)
        if teacher_rows is not None:
            index = torch.tensor(teacher_rows, dtype=torch.long, device=student.device)
            student, labels = student[index], labels[index] if labels is not None else None
            if denominator is not None:
                denominator = denominator * _share(inputs.get("labels"), teacher_rows, _rows(inputs), shift)
        kl = distill_kl(student, teacher, labels, shift=shift, denominator=denominator)
        loss = (1 - w) * loss + w * kl
    return loss, outputs


def dylora_loss(model: torch.nn.Module, inputs: dict[str, Any], step: int, recipe: Recipe,
                compute_loss_fn: LossFn = model_loss,
                kl_denominator: torch.Tensor | float | None = None) -> tuple[torch.Tensor, Any]:
    """The loss of optimizer step `step` under `recipe`: the sum of its passes' losses, and the first pass's
    outputs. For a Trainer of your own, call it from `compute_loss` with `step=self.state.global_step`
    and add `RecipeCallback(recipe)` (rank history, logs, back to r_max after each step).

    All passes' graphs live until the backward (memory grows with the passes), and the model stays in the
    last pass's state, so gradient checkpointing is only correct for one-pass recipes; `DyLoraTrainer`
    backpropagates pass by pass instead.
    """
    total, first, teacher, rows = None, None, None, None
    for p in recipe.passes(step, _rows(inputs)):
        loss, outputs = run_pass(model, inputs, recipe, p, compute_loss_fn, teacher, kl_denominator, rows)
        if p.teacher:
            teacher, rows = outputs.logits.detach(), p.subset
        total = loss if total is None else total + loss
        first = outputs if first is None else first
    return total, first


class RecipeCallback(TrainerCallback):
    """The rank bookkeeping of a recipe run in the HF Trainer: the rank history and logs, and `eval_rank` (r_max by
    default) after each optimizer step, so evaluation inside training never runs at a leftover sampled rank.

    `history` holds (optimizer step, rank) for every pass of paper and sandwich steps seen by this process; logged
    training steps get the recipe's `log_entry` in `trainer.state.log_history`: `dylora/rank` (paper) or
    `dylora/ranks` (sandwich).
    """

    def __init__(self, recipe: Recipe, eval_rank: int | None = None) -> None:
        self.recipe = recipe
        self.eval_rank = eval_rank if eval_rank is not None else recipe.sampler.r_max
        self.current: list[int] | None = None
        self.history: list[tuple[int, int]] = []
        self.rebased: list[int] = []  # the optimizer steps after which the layers were re-based (dylora.rebasis)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.recipe.total_steps is None:
            self.recipe.total_steps = state.max_steps

    def on_step_begin(self, args, state, control, **kwargs):
        self.current = self.recipe.step_ranks(state.global_step)
        self.history += [(state.global_step, b) for b in self.current or []]

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.recipe.rebasis_after(state.global_step):
            rebasis(model, optimizer, self.recipe.rebasis_state)
            self.rebased.append(state.global_step)
        set_rank(model, self.eval_rank)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self.current is not None and state.log_history:
            state.log_history[-1].update(self.recipe.log_entry(self.current))


class DyLoraCallback(RecipeCallback):
    """The paper's recipe with the HF Trainer: samples the DyLoRA rank once per optimizer step and sets it.

    `on_step_begin` fires once per optimizer step, so every gradient-accumulation micro-batch of a step
    uses the same rank b = sampler.sample(global_step); the rest is `RecipeCallback`'s (r_max after the step,
    `dylora/rank` in the logs, the history).
    """

    def __init__(self, sampler: RankSampler, eval_rank: int | None = None) -> None:
        super().__init__(Paper(sampler), eval_rank)
        self.sampler = sampler

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        super().on_step_begin(args, state, control, **kwargs)
        set_rank(model, self.current[0])


class DyLoraTrainerMixin:
    """A DyLoRA recipe (default: `Recipe.from_config` of the model's DyLoRA adapter) for any HF Trainer class:
    `class MyTrainer(DyLoraTrainerMixin, SomeTrainer)`, e.g. TRL's `SFTTrainer` (see `dylora.trl`).

    Every micro-batch of optimizer step `state.global_step` runs the step's passes (so gradient accumulation
    shares ranks and a resumed run repeats them), each with its own backward; the gradients add up into one
    optimizer step. The task loss is the wrapped Trainer's own `compute_loss` (label smoothing,
    `num_items_in_batch`, SFTTrainer's loss types). `recipe_callback.history` has the (step, rank) pairs, as
    `DyLoraCallback.history` does.
    """

    def __init__(self, *args: Any, recipe: Recipe | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        attach_dylora_layers(self.model)  # a DyLoraConfig the Trainer itself gave to get_peft_model (peft_config=)
        if recipe is None:
            recipe = Recipe.from_config(next(iter(select_adapters(self.model, None).values())))
        self.recipe = recipe
        if (recipe.rebasis_every or recipe.lora_first) and (self.args.fsdp or self.args.deepspeed):
            raise ValueError("a re-basis (rebasis_every, lora_first) rotates whole A and B matrices: it cannot run on "
                             "FSDP or DeepSpeed shards; train without them")
        self.recipe_callback = RecipeCallback(recipe)
        self.add_callback(self.recipe_callback)
        self._pass: RecipePass | None = None
        self._teacher: torch.Tensor | None = None
        self._teacher_rows: tuple[int, ...] | None = None

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        total, passes = None, self.recipe.passes(self.state.global_step, _rows(inputs))
        try:
            for p in passes:
                self._pass = p
                loss = super().training_step(model, inputs, num_items_in_batch)
                total = loss if total is None else total + loss
        finally:
            self._pass, self._teacher, self._teacher_rows = None, None, None
        # the gradients add up over the passes; the logged loss is their mean, so it reads like one pass's (and the
        # guard's chance level is ln K for every recipe, times `chance_weight` where passes are distilled)
        return total / len(passes)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        p = self._pass
        if p is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        want_outputs = return_outputs or p.teacher or p.distill  # only distillation needs the logits
        items = num_items_in_batch
        if p.subset is not None and items is not None:  # a loss normalised by it stays a mean over the subset's items
            items = items * _share(inputs.get("labels"), p.subset, _rows(inputs), _predicts_next_token(model))

        def task_loss(m: torch.nn.Module, x: dict[str, Any]) -> tuple[torch.Tensor, Any]:
            if want_outputs:
                return super(DyLoraTrainerMixin, self).compute_loss(m, x, True, items)
            return super(DyLoraTrainerMixin, self).compute_loss(m, x, False, items), None

        loss, outputs = run_pass(model, inputs, self.recipe, p, task_loss, self._teacher,
                                 self._kl_denominator(num_items_in_batch), self._teacher_rows)
        if p.teacher:
            self._teacher, self._teacher_rows = outputs.logits.detach(), p.subset
        return (loss, outputs) if return_outputs else loss

    def _kl_denominator(self, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor | int | None:
        """`num_items_in_batch` when the Trainer's task loss is normalised by it (then it is not divided by the
        accumulation steps, and the KL must not be either), else None (a per-micro-batch mean)."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None
        return num_items_in_batch if scaled else None


class DyLoraTrainer(DyLoraTrainerMixin, Trainer):
    """The HF Trainer with a DyLoRA recipe (see `DyLoraTrainerMixin`). With recipe "paper" it trains exactly as
    `Trainer` + `DyLoraCallback`."""


__all__ = ["RANKS_KEY", "RANK_KEY", "DyLoraCallback", "DyLoraTrainer", "DyLoraTrainerMixin", "Recipe",
           "RecipeCallback", "RecipePass", "distill_kl", "dylora_loss", "model_loss", "run_pass", "select_rows",
           "step_rank"]
