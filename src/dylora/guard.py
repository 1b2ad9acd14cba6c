"""The training guard: an HF Trainer callback that stops a run that cannot be learning and says why.

`TrainingGuard.cause` is a `StopCause` (what happened, at which step, the numbers, and the run's lr and
lora_alpha); what to try is the application's to word (`dylora train` names its options, e.g. `--lr`).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from .model import dylora_adapters, unwrap
from .recipes import Recipe

MIN_MOVEMENT = 1e-4  # the guard's "lr too small": the lr summed over the steps below this moves no weight much


class StopKind(enum.Enum):
    """What stopped a run."""

    MEAN_LOSS_NOT_FINITE = "mean_loss_not_finite"  # the mean training loss at the end of training
    LOSS_NOT_FINITE = "loss_not_finite"  # a logged training loss
    GRAD_NORM_NOT_FINITE = "grad_norm_not_finite"  # a logged gradient norm: every update is clipped to nothing
    AT_CHANCE = "at_chance"  # the last logged losses all sat at chance after warm-up
    WEIGHTS_NOT_FINITE = "weights_not_finite"  # trainable tensors at the end of training
    NO_UPDATE = "no_update"  # every lora_B still 0 at the end of training


@dataclass(frozen=True)
class StopCause:
    """Why the guard stopped a run: `kind`, `what` happened (one line, no advice), at optimizer `step`, with
    `value` (the loss or gradient norm, the lowest loss of the window at chance, or the count of non-finite
    tensors); the run's peak `lr` and `lora_alpha` (None where unknown), `moved` (the lr summed over the steps
    so far) and whether the updates were `clipped` to nothing."""

    kind: StopKind
    what: str
    step: int
    value: float
    lr: float
    lora_alpha: float | None = None
    moved: float = 0.0
    clipped: bool = False

    @property
    def lr_too_small(self) -> bool:
        """At chance with an lr whose sum over the steps moves no weight much (AdamW moves each by <= lr a step)."""
        return self.kind is StopKind.AT_CHANCE and self.moved < MIN_MOVEMENT


def nonfinite_adapter_weights(model: torch.nn.Module) -> list[str]:
    """Names of trainable tensors holding NaN or inf."""
    return [n for n, p in unwrap(model).named_parameters() if p.requires_grad and not torch.isfinite(p).all()]


def chance_weight(recipe: Recipe, step: int | None = None) -> float:
    """The logged loss at chance as a fraction of ln K: the mean, over a step's passes, of the task loss's weight
    (1 - distill_weight in a pass that learns from r_max, whose KL is 0 while every rank predicts alike; 1 else).
    Rowwise with distillation logs 0.75 ln K at chance, not ln K; with `distill_every` k, the mean over the k steps
    of its period: one is taught, the k - 1 others are not, so (w(taught) + (k - 1) w(not)) / k, in closed form (a
    sum over the k steps would not end for a huge k). With `lora_first`, optimizer step `step` before the switch is a
    plain LoRA pass (1); from the switch on (and with `step` None), the recipe's weight."""
    base = recipe.switch_step if recipe.lora_first else 0
    if step is not None and step < base:
        return 1.0

    def weight(at: int) -> float:
        passes = recipe.passes(at, 1)
        return sum(1 - recipe.distill_weight if p.distill else 1.0 for p in passes) / len(passes)

    k = recipe.distill_every
    taught = -(-base // k) * k  # the first taught step from the switch on
    return weight(taught) if k == 1 else (weight(taught) + (k - 1) * weight(taught + 1)) / k


def _zero_adapter(model: torch.nn.Module) -> bool:
    """True when the model has LoRA B weights and every one is exactly 0: no update ever reached the adapter
    (B starts at 0, so one step of any finite, non-zero gradient moves it)."""
    bs = [p for n, p in unwrap(model).named_parameters() if p.requires_grad and p.numel()
          and ("lora_B" in n or "lora_embedding_B" in n)]
    return bool(bs) and not any(bool(p.detach().any()) for p in bs)


class TrainingGuard(TrainerCallback):
    """Stops a run that cannot be learning, and says why in `cause` (None while all is well).

    Stops when a logged training loss or gradient norm is NaN/inf (a gradient norm of inf clips every update to
    nothing; not judged under fp16, whose loss scaler skips such steps), or when, after warm-up and at least
    `min_steps` optimizer steps, every one of the last `window` logged losses is still >= `chance_ratio` *
    `chance_weight` * ln(num_classes) (chance for a classifier, weighted for a distilled recipe; not judged without
    `num_classes`): a run whose loss has just started to fall is left alone (a mean over the window would stop it
    while the plateau still fills the window). Short runs are never judged at chance. At the end it also checks
    the trainable weights are finite and, in a single process, that the adapter moved at all (some lora_B is
    not 0). The first cause found is kept.
    """

    def __init__(self, num_classes: int | None = None, window: int = 5, min_steps: int = 50,
                 chance_ratio: float = 0.97) -> None:
        self.num_classes, self.window, self.min_steps, self.chance_ratio = num_classes, window, min_steps, chance_ratio
        self.cause: StopCause | None = None
        self.recipe: Recipe | None = None  # the model's recipe, read at the start of training
        self.lora_alpha: float | None = None
        self._losses: list[tuple[float, float]] = []  # (logged loss, its chance weight)
        self._moved, self._step = 0.0, 0  # the sum of the lr over the steps so far (logged lr x steps between logs)

    @property
    def stopped(self) -> bool:
        return self.cause is not None

    @property
    def reason(self) -> str | None:
        """What happened, in one line (`cause.what`); None while all is well."""
        return self.cause.what if self.cause is not None else None

    def _found(self, args, kind: StopKind, what: str, step: int, value: float, clipped: bool = False) -> None:
        if self.cause is None:
            self.cause = StopCause(kind, what, step, value, args.learning_rate, self.lora_alpha, self._moved, clipped)

    def _stop(self, control, args, kind: StopKind, what: str, step: int, value: float, clipped: bool = False) -> None:
        self._found(args, kind, what, step, value, clipped)
        control.should_training_stop = True

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Read the model's recipe; on a resumed run, judge the logs of the steps before the checkpoint as they
        came (the Trainer restores them in `state.log_history`), so a run stopped at chance stops again."""
        self._losses, self._moved, self._step = [], 0.0, 0
        configs = list((getattr(unwrap(model), "peft_config", None) or {}).values()) if model is not None else []
        self.lora_alpha = getattr(configs[0], "lora_alpha", None) if configs else None
        adapters = dylora_adapters(model) if model is not None else {}
        self.recipe = Recipe.from_config(next(iter(adapters.values()))) if adapters else None
        if self.recipe is not None:
            self.recipe.total_steps = state.max_steps
        for logs in state.log_history or []:
            if isinstance(logs, dict) and isinstance(logs.get("step"), int):
                self._judge(args, logs["step"], state.max_steps, control, logs)
        self._step = self._step or state.global_step  # the last logged step, else where training starts

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._judge(args, state.global_step, state.max_steps, control, logs)

    def _judge(self, args, step: int, max_steps: int, control, logs) -> None:
        """One log entry at optimizer step `step`: stop where it shows a run that cannot be learning."""
        if logs and "train_loss" in logs and not math.isfinite(float(logs["train_loss"])):
            mean = float(logs["train_loss"])
            self._stop(control, args, StopKind.MEAN_LOSS_NOT_FINITE, f"the mean training loss is {mean}", step, mean)
        if not logs or "loss" not in logs:
            return
        loss = float(logs["loss"])
        if "learning_rate" in logs:
            self._moved += float(logs["learning_rate"]) * (step - self._step)
            self._step = step
        if not math.isfinite(loss):
            self._stop(control, args, StopKind.LOSS_NOT_FINITE, f"training loss is {loss} at step {step}", step, loss)
            return
        grad = float(logs.get("grad_norm", 0.0))
        if not math.isfinite(grad) and not args.fp16:
            self._stop(control, args, StopKind.GRAD_NORM_NOT_FINITE, f"the gradient norm is {grad} at step {step}, so "
                       "every update is clipped to nothing", step, grad, clipped=True)
            return
        if step <= args.get_warmup_steps(max_steps):
            return
        weight = chance_weight(self.recipe, step - 1) if self.recipe is not None else 1.0  # of the logged steps' last
        self._losses.append((loss, weight))
        if not self.num_classes or self.num_classes < 2 or step < self.min_steps:
            return
        if len(self._losses) >= self.window:
            window = self._losses[-self.window:]
            if all(value >= self.chance_ratio * w * math.log(self.num_classes) for value, w in window):
                lowest, weight = min(window, key=lambda lw: lw[0] / lw[1])
                weighted = f"{self.chance_ratio} x {weight:g}" if weight != 1 else f"{self.chance_ratio}"
                self._stop(control, args, StopKind.AT_CHANCE, f"training loss stayed at chance ({lowest:.2f} >= "
                           f"{weighted} ln {self.num_classes}) after warm-up", step, lowest)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is None or self.cause is not None:
            return
        bad = nonfinite_adapter_weights(model)
        if bad:
            self._found(args, StopKind.WEIGHTS_NOT_FINITE,
                        f"{len(bad)} trainable tensors are not finite (e.g. {bad[0]})", state.global_step, len(bad))
        elif args.world_size == 1 and state.global_step > 0 and _zero_adapter(model):
            self._found(args, StopKind.NO_UPDATE, f"no update reached the adapter in {state.global_step} steps "
                        "(every lora_B is still 0: the gradients were clipped to nothing or were 0)",
                        state.global_step, 0.0, clipped=True)


__all__ = ["MIN_MOVEMENT", "StopCause", "StopKind", "TrainingGuard", "chance_weight", "nonfinite_adapter_weights"]
