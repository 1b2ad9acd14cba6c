"""Training with DyLoRA: the HF Trainer callback, the recipes and their Trainer, a guard, and the rank sweep.

A recipe says what one optimizer step trains (`DyLoraConfig.recipe`); each step is a list of passes (a
forward, a loss) at ranks that are a pure function of (seed, optimizer step):

- paper:    one pass at b ~ P (the paper's Algorithm 1; what `DyLoraCallback` does).
- sandwich: passes at r_max, r_min and `sandwich_k` ranks drawn between them; the loss is their sum,
            L = sum_b L_b. With `distill`, each b < r_max has L_b = (1 - w) task_b + w KL(p_rmax || p_b),
            p_rmax being r_max's detached predictions of the same micro-batch.
- rowwise:  one pass, row j of the batch at rank b_j (stratified: every rank in every step). With
            `distill`, a pass at r_max comes first (task loss) and the rowwise pass's loss is
            (1 - w) task + w KL(p_rmax || p_rows): two passes, one of them at every rank.
- nested:   one pass at the expected scale E_b[s_b] (see `dylora.functional`).

`DyLoraTrainer` runs the recipe in the HF Trainer, one backward per pass (so memory stays that of one
pass and gradient checkpointing recomputes at the pass's rank); `dylora_loss` is the same recipe as one
summed loss, for a Trainer of your own. After each optimizer step the model is back at r_max.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from .config import RECIPES
from .layers import BASES
from .model import (
    at_rank,
    attach_dylora_layers,
    dylora_adapters,
    get_rank,
    select_adapters,
    set_example_ranks,
    set_expected_scale,
    set_rank,
    unwrap,
)
from .sampler import RankSampler

RANK_KEY = "dylora/rank"
RANKS_KEY = "dylora/ranks"


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


# ---------------------------------------------------------------- recipes


@dataclass(frozen=True)
class RecipePass:
    """One forward of a recipe step: at one rank ("rank"), a rank per row ("rows"), or at E_b[s_b] ("expected").
    `teacher`: its detached logits teach the later passes; `distill`: this pass learns from them."""

    kind: str
    ranks: tuple[int, ...] = ()
    teacher: bool = False
    distill: bool = False


@dataclass
class Recipe:
    """A training recipe (`DyLoraConfig.recipe` and its settings) with its rank sampler."""

    sampler: RankSampler
    name: str = "paper"
    sandwich_k: int = 1
    distill: bool = False
    distill_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise ValueError(f"unknown recipe {self.name!r}: choose one of {', '.join(RECIPES)}")

    @classmethod
    def from_config(cls, config) -> Recipe:
        return cls(RankSampler.from_config(config), config.recipe, config.sandwich_k, config.distill,
                   config.distill_weight)

    def passes(self, step: int, n_rows: int) -> list[RecipePass]:
        """The passes of optimizer step `step` on a micro-batch of `n_rows` rows."""
        if self.name == "paper":
            return [RecipePass("rank", (self.sampler.sample(step),))]
        if self.name == "rowwise":
            rows = RecipePass("rows", tuple(int(b) for b in self.sampler.example_ranks(n_rows, step)),
                              distill=self.distill)
            return [RecipePass("rank", (self.sampler.r_max,), teacher=True), rows] if self.distill else [rows]
        if self.name == "nested":
            return [RecipePass("expected")]
        top, *rest = self.sampler.sandwich_ranks(step, self.sandwich_k)
        return [RecipePass("rank", (top,), teacher=self.distill and bool(rest)),
                *(RecipePass("rank", (b,), distill=self.distill) for b in rest)]

    def step_ranks(self, step: int) -> list[int] | None:
        """The ranks a step trains one pass each (paper, sandwich), for logs and the rank history; else None."""
        if self.name == "paper":
            return [self.sampler.sample(step)]
        if self.name == "sandwich":
            return self.sampler.sandwich_ranks(step, self.sandwich_k)
        return None

    def apply(self, model: torch.nn.Module, p: RecipePass) -> None:
        """Put the model in the state of pass `p`."""
        if p.kind == "rank":
            set_rank(model, p.ranks[0])
        elif p.kind == "rows":
            set_example_ranks(model, list(p.ranks))
        else:
            set_expected_scale(model, self.sampler.pmf())


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


def _is_causal_lm(model: torch.nn.Module) -> bool:
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


def run_pass(model: torch.nn.Module, inputs: dict[str, Any], recipe: Recipe, p: RecipePass,
             compute_loss_fn: LossFn = model_loss, teacher: torch.Tensor | None = None,
             kl_denominator: torch.Tensor | float | None = None) -> tuple[torch.Tensor, Any]:
    """The loss of one pass: the task loss at the pass's ranks, mixed with distillation where it has a teacher."""
    labels = inputs.get("labels")
    recipe.apply(model, p)
    loss, outputs = compute_loss_fn(model, inputs)
    if p.distill and teacher is not None:
        w = recipe.distill_weight
        kl = distill_kl(outputs.logits, teacher, labels, shift=_is_causal_lm(model), denominator=kl_denominator)
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
    total, first, teacher = None, None, None
    for p in recipe.passes(step, _rows(inputs)):
        loss, outputs = run_pass(model, inputs, recipe, p, compute_loss_fn, teacher, kl_denominator)
        if p.teacher:
            teacher = outputs.logits.detach()
        total = loss if total is None else total + loss
        first = outputs if first is None else first
    return total, first


class RecipeCallback(TrainerCallback):
    """Bookkeeping of a recipe run in the HF Trainer: the rank history and logs, and r_max after each step.

    `history` holds (optimizer step, rank) for every pass of paper and sandwich steps (the format of
    `DyLoraCallback.history`); logged training steps get `dylora/rank` (paper) or `dylora/ranks` (sandwich).
    """

    def __init__(self, recipe: Recipe, eval_rank: int | None = None) -> None:
        self.recipe = recipe
        self.eval_rank = eval_rank if eval_rank is not None else recipe.sampler.r_max
        self.current: list[int] | None = None
        self.history: list[tuple[int, int]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.current = self.recipe.step_ranks(state.global_step)
        self.history += [(state.global_step, b) for b in self.current or []]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        set_rank(model, self.eval_rank)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self.current is not None and state.log_history:
            if self.recipe.name == "paper":
                state.log_history[-1][RANK_KEY] = self.current[0]
            else:
                state.log_history[-1][RANKS_KEY] = list(self.current)


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
        self.recipe_callback = RecipeCallback(recipe)
        self.add_callback(self.recipe_callback)
        self._pass: RecipePass | None = None
        self._teacher: torch.Tensor | None = None

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        total, passes = None, self.recipe.passes(self.state.global_step, _rows(inputs))
        try:
            for p in passes:
                self._pass = p
                loss = super().training_step(model, inputs, num_items_in_batch)
                total = loss if total is None else total + loss
        finally:
            self._pass, self._teacher = None, None
        # the gradients add up over the passes; the logged loss is their mean, so it reads like one pass's (and the
        # guard's chance level ln K holds for every recipe)
        return total / len(passes)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        p = self._pass
        if p is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        want_outputs = return_outputs or p.teacher or p.distill  # only distillation needs the logits

        def task_loss(m: torch.nn.Module, x: dict[str, Any]) -> tuple[torch.Tensor, Any]:
            if want_outputs:
                return super(DyLoraTrainerMixin, self).compute_loss(m, x, True, num_items_in_batch)
            return super(DyLoraTrainerMixin, self).compute_loss(m, x, False, num_items_in_batch), None

        loss, outputs = run_pass(model, inputs, self.recipe, p, task_loss, self._teacher,
                                 self._kl_denominator(num_items_in_batch))
        if p.teacher:
            self._teacher = outputs.logits.detach()
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


# ---------------------------------------------------------------- guard


def nonfinite_adapter_weights(model: torch.nn.Module) -> list[str]:
    """Names of trainable tensors holding NaN or inf."""
    return [n for n, p in unwrap(model).named_parameters() if p.requires_grad and not torch.isfinite(p).all()]


def _short(x: float) -> str:
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


class TrainingGuard(TrainerCallback):
    """Stops a run that cannot be learning, and says why in `reason` (None while all is well).

    Stops when a logged training loss is NaN/inf, or when, after warm-up and at least `min_steps` optimizer
    steps, every one of the last `window` logged losses is still >= `chance_ratio` * ln(num_classes) (chance
    for a classifier; not judged without `num_classes`): a run whose loss has just started to fall is left
    alone (a mean over the window would stop it while the plateau still fills the window). Short runs are
    never judged at chance. At the end it also checks the trainable weights are finite. The reason is one
    line naming the cause and an lr to try.
    """

    def __init__(self, num_classes: int | None = None, window: int = 5, min_steps: int = 50,
                 chance_ratio: float = 0.97) -> None:
        self.num_classes, self.window, self.min_steps, self.chance_ratio = num_classes, window, min_steps, chance_ratio
        self.reason: str | None = None
        self._losses: list[float] = []

    @property
    def stopped(self) -> bool:
        return self.reason is not None

    def _stop(self, control, args, cause: str) -> None:
        if self.reason is None:
            lr = args.learning_rate
            self.reason = f"{cause}; try --lr {_short(lr / 3)} (a third of {_short(lr)})"
        control.should_training_stop = True

    def on_train_begin(self, args, state, control, **kwargs):
        self._losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "train_loss" in logs and not math.isfinite(float(logs["train_loss"])):
            self._stop(control, args, f"the mean training loss is {float(logs['train_loss'])}")
        if not logs or "loss" not in logs:
            return
        loss = float(logs["loss"])
        if not math.isfinite(loss):
            self._stop(control, args, f"training loss is {loss} at step {state.global_step}")
            return
        if state.global_step <= args.get_warmup_steps(state.max_steps):
            return
        self._losses.append(loss)
        if not self.num_classes or self.num_classes < 2 or state.global_step < self.min_steps:
            return
        if len(self._losses) >= self.window:
            lowest = min(self._losses[-self.window:])
            if lowest >= self.chance_ratio * math.log(self.num_classes):
                self._stop(control, args, f"training loss stayed at chance ({lowest:.2f} >= {self.chance_ratio} "
                                          f"ln {self.num_classes}) after warm-up")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        bad = nonfinite_adapter_weights(model) if model is not None else []
        if bad and self.reason is None:
            lr = args.learning_rate
            self.reason = (f"{len(bad)} trainable tensors are not finite (e.g. {bad[0]}); "
                           f"try --lr {_short(lr / 3)} (a third of {_short(lr)})")


# ---------------------------------------------------------------- sweep


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
                    lora += r * (module.lora_A[name].weight[0].numel() + module.lora_B[name].weight[:, 0].numel())
                elif name in module.lora_embedding_A:
                    lora += r * (module.lora_embedding_A[name].shape[1] + module.lora_embedding_B[name].shape[0])
    others = sum(p.numel() for n, p in peft_model.named_parameters()
                 if p.requires_grad and "lora_" not in n)
    return lora + others


def rank_sweep(model: torch.nn.Module, evaluate: Callable[[torch.nn.Module], dict[str, float]],
               ranks: Iterable[int] | None = None, adapter_name: str | None = None,
               progress: bool = True, basis: str = "prefix") -> list[SweepRow]:
    """Evaluate the model at each rank (default every b in [r_min, r]) and restore the previous rank.

    `basis`: "prefix", "svd", or "both" (a row per rank and basis, prefix first).
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
            rows.append(SweepRow(b, dict(evaluate(model)), rank_parameters(model, b), basis=base))
    return rows


__all__ = ["RANKS_KEY", "RANK_KEY", "DyLoraCallback", "DyLoraTrainer", "DyLoraTrainerMixin", "Recipe",
           "RecipeCallback", "RecipePass", "SweepRow", "TrainingGuard", "distill_kl", "dylora_adapters", "dylora_loss",
           "get_rank", "model_loss", "nonfinite_adapter_weights", "rank_parameters", "rank_sweep", "run_pass",
           "step_rank"]
