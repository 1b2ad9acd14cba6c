"""Settings: everything that defines a run, checked in one place before anything is loaded or written."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .config import DyLoraConfig
from .functional import check_rank

METHODS = ("dylora", "lora", "full")


@dataclass
class Settings:
    """A run's settings; written to run.json so a result can be reproduced."""

    model: str = "minilm"
    data: str = "polarity"
    method: str = "dylora"  # dylora | lora | full
    r: int = 8
    r_min: int = 1
    lora_alpha: float = 16
    frozen: bool = False
    rank_distribution: str = "uniform"
    geometric_p: float = 0.15
    recipe: str | None = None  # paper | sandwich | rowwise | nested; None: rowwise (paper with `frozen`)
    sandwich_k: int = 1
    distill: bool | None = None  # None: on where the recipe has it (sandwich, rowwise)
    distill_weight: float = 0.5
    rank_scaling: str = "alpha/b"
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None
    epochs: float = 3.0
    max_steps: int = -1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    batch_size: int = 16
    grad_accum: int = 1
    eval_batch_size: int = 64
    max_length: int | None = None  # tokens per example (None: the task's default, capped by the model)
    seed: int = 0
    max_train: int | None = None
    text_column: str | None = None
    label_column: str | None = None
    text_pair_column: str | None = None
    save_steps: int = 0  # checkpoint every N optimizer steps (0: no checkpoints)
    modules_to_save: list[str] | None = None  # trained in full beside the adapter (default: the task head)
    logging_steps: int = 10
    within: float = 0.5  # "smallest rank within this many points of the best"
    max_eval: int | None = None  # cap the validation and test splits (quick runs and tests)
    label_smoothing: float = 0.0  # label_smoothing_factor of the Trainer
    ranks: list[int] | None = None  # the ranks the sweep evaluates (default: every b in [r_min, r])
    guard: bool = True  # stop a run whose loss is not finite or stays at chance (TrainingGuard)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Settings:
        """Settings from run.json (older runs wrote `distribution` for `rank_distribution`)."""
        values = dict(values)
        if "distribution" in values:
            values.setdefault("rank_distribution", values.pop("distribution"))
        values.setdefault("recipe", "paper")  # runs written before recipes existed trained the paper's way
        values.setdefault("distill", False)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def validate(self) -> Settings:
        """Refuse a bad value with one line naming it, before any side effect; fill in the default recipe."""
        self._default_recipe()
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is invalid: choose one of {', '.join(METHODS)}")
        for name in ("epochs", "lr", "batch_size", "eval_batch_size", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
        for name, low in (("weight_decay", 0), ("warmup_ratio", 0), ("within", 0), ("label_smoothing", 0)):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= {low}, got {value}")
        for name in ("max_length", "max_eval", "max_train"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.method != "full":
            self.peft_config(["x"])  # DyLoraConfig / LoraConfig name the field and the valid range
        if self.method == "dylora" and self.ranks is not None:
            if not self.ranks:
                raise ValueError("--ranks is empty: give ranks like 1,2,4,8")
            for b in self.ranks:
                check_rank(b, self.r_min, self.r)
        return self

    def _default_recipe(self) -> None:
        """recipe None: rowwise (with distill None: distilled from r_max, two passes a step), the recipe closest
        to LoRA at every rank (docs/results.md, "Training recipes"); paper with `frozen`, which trains one
        component a step. distill None: on where the recipe has it (sandwich, rowwise)."""
        if self.recipe is None:
            self.recipe = "paper" if self.frozen else "rowwise"
        if self.distill is None:
            self.distill = self.recipe in ("sandwich", "rowwise")

    def peft_config(self, targets: list[str], task_type: str = "SEQ_CLS") -> Any:
        """The adapter's config: a DyLoraConfig, or a plain LoraConfig for the LoRA baseline."""
        from peft import LoraConfig

        self._default_recipe()
        common = dict(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                      target_modules=targets, task_type=task_type, modules_to_save=self.modules_to_save)
        if self.method == "dylora":
            return DyLoraConfig(r_min=self.r_min, frozen=self.frozen, rank_distribution=self.rank_distribution,
                                geometric_p=self.geometric_p, seed=self.seed, recipe=self.recipe,
                                sandwich_k=self.sandwich_k, distill=self.distill, distill_weight=self.distill_weight,
                                rank_scaling=self.rank_scaling, **common)
        from .config import MAX_RANK

        if isinstance(self.r, bool) or not isinstance(self.r, int) or not 1 <= self.r <= MAX_RANK:
            raise ValueError(f"--r must be an integer in [1, {MAX_RANK}], got {self.r}")
        if not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"--lora-alpha must be a finite number > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora-dropout must lie in [0, 1), got {self.lora_dropout}")
        return LoraConfig(**common)
