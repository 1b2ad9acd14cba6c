"""The training recipes: what one optimizer step trains (`DyLoraConfig.recipe`), one class a recipe.

A recipe's step is a list of passes (a forward, a loss) at ranks that are a pure function of (seed, optimizer step):

- paper:    one pass at b ~ P (the paper's Algorithm 1; what `DyLoraCallback` does).
- sandwich: passes at r_max, r_min and `sandwich_k` ranks drawn between them; the loss is their sum,
            L = sum_b L_b. With `distill`, each b < r_max has L_b = (1 - w) task_b + w KL(p_rmax || p_b),
            p_rmax being r_max's detached predictions of the same micro-batch.
- rowwise:  one pass, row j of the batch at rank b_j (stratified: every rank in every step). With
            `distill`, a pass at r_max comes first (task loss) and the rowwise pass's loss is
            (1 - w) task + w KL(p_rmax || p_rows): two passes, one of them at every rank. With
            `distill_every` k > 1, only steps 0, k, 2k, ... have the r_max pass (about 1 + 1/k passes a step);
            the others are the rowwise pass alone. With `distill_fraction` f < 1, the r_max pass runs on a random
            f of the batch's rows (at least one, drawn anew each step) and the KL is taken on those rows: an unbiased
            estimate of the two-pass loss at about 1 + f passes a step.
- nested:   one pass at the expected scale E_b[s_b] (see `dylora.functional`).

Rowwise's re-basis options (`dylora.rebasis`): with `lora_first` f > 0, the first `switch_step` = round(f * steps)
optimizer steps are one plain pass at r_max (LoRA), the layers are re-based into singular-value order once after
them, and the recipe trains the rest; with `rebasis_every` k > 0, every k-th optimizer step is followed by a re-basis
(`rebasis_after`: which steps; `RecipeCallback` runs it). Both need the run's step count, `total_steps`, which the
Trainer gives `RecipeCallback` (a loop of your own sets it).

Each class says its passes (`passes`), how a pass sets the model's ranks (`apply`), and what a step logs
(`step_ranks`, `log_entry`). `RECIPE_CLASSES` maps a name to its class; `Recipe(sampler, name, ...)` builds the
class of `name`. `dylora.training` runs them in the HF Trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from .model import set_example_ranks, set_expected_scale, set_rank
from .options import DEFAULT_RECIPE, option_names
from .sampler import RankSampler

RANK_KEY = "dylora/rank"  # log_history entry of a step trained at one rank (paper)
RANKS_KEY = "dylora/ranks"  # log_history entry of a step trained at several ranks, one pass each (sandwich)


@dataclass(frozen=True)
class RecipePass:
    """One forward of a recipe step: at one rank ("rank"), a rank per row ("rows"), or at E_b[s_b] ("expected").
    `teacher`: its detached logits teach the later passes; `distill`: this pass learns from them. `subset`: the batch
    rows this pass runs on (None: all of them)."""

    kind: str
    ranks: tuple[int, ...] = ()
    teacher: bool = False
    distill: bool = False
    subset: tuple[int, ...] | None = None


@dataclass
class Recipe:
    """A training recipe (`DyLoraConfig.recipe` and its settings, the fields named as the DyLoRA options of
    `dylora.options`) with its rank sampler.

    `Recipe(sampler, name, ...)` is the class of `name` in `RECIPE_CLASSES` (an unknown name is a ValueError);
    a subclass is the one recipe it names.
    """

    sampler: RankSampler
    name: str = DEFAULT_RECIPE
    sandwich_k: int = 1
    distill: bool = False
    distill_weight: float = 0.5
    distill_every: int = 1
    distill_fraction: float = 1.0
    rebasis_every: int = 0
    rebasis_state: str = "reset"
    lora_first: float = 0.0
    total_steps: int | None = None  # the run's optimizer steps (set by RecipeCallback at the start of training)

    def __new__(cls, *args: Any, **kwargs: Any) -> Recipe:
        if cls is Recipe:  # the class of the recipe named (the second argument, as in the dataclass's __init__)
            cls = recipe_class(kwargs["name"] if "name" in kwargs else args[1] if len(args) > 1 else DEFAULT_RECIPE)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if self.name != type(self).name:
            raise ValueError(f"{type(self).__name__} is recipe {type(self).name!r}, not {self.name!r}")

    @classmethod
    def from_config(cls, config: Any) -> Recipe:
        """The recipe of a DyLoraConfig, with its rank sampler."""
        settings = {f.name: getattr(config, f.name) for f in fields(cls) if f.name in option_names()}
        return Recipe(RankSampler.from_config(config), config.recipe, **settings)

    @property
    def switch_step(self) -> int:
        """The first optimizer step after the LoRA phase of `lora_first` (0 without one): round(f * total_steps)."""
        if not self.lora_first:
            return 0
        if self.total_steps is None:
            raise ValueError("lora_first needs the run's step count: set recipe.total_steps (the Trainer does)")
        return round(self.lora_first * self.total_steps)

    def rebasis_after(self, done: int) -> bool:
        """Whether the layers are re-based after `done` optimizer steps: at the switch of `lora_first`, and on every
        `rebasis_every`-th step before the last."""
        if self.lora_first and done == self.switch_step:
            return True
        last = self.total_steps is not None and done >= self.total_steps
        return bool(self.rebasis_every) and done % self.rebasis_every == 0 and done > 0 and not last

    def passes(self, step: int, n_rows: int) -> list[RecipePass]:
        """The passes of optimizer step `step` on a micro-batch of `n_rows` rows."""
        raise NotImplementedError

    def apply(self, model: torch.nn.Module, p: RecipePass) -> None:
        """Put the model in the state of pass `p` (a pass at one rank here)."""
        set_rank(model, p.ranks[0])

    def step_ranks(self, step: int) -> list[int] | None:
        """The ranks a step trains one pass each, for logs and the rank history; None where a pass mixes ranks."""
        return None

    def log_entry(self, ranks: list[int]) -> dict[str, Any]:
        """What a logged training step adds to `log_history`, given its `step_ranks`."""
        return {RANKS_KEY: list(ranks)}


@dataclass
class Paper(Recipe):
    """The paper's Algorithm 1: one pass a step at b ~ P."""

    name: str = "paper"

    def passes(self, step: int, n_rows: int) -> list[RecipePass]:
        return [RecipePass("rank", (self.sampler.sample(step),))]

    def step_ranks(self, step: int) -> list[int] | None:
        return [self.sampler.sample(step)]

    def log_entry(self, ranks: list[int]) -> dict[str, Any]:
        return {RANK_KEY: ranks[0]}


@dataclass
class Sandwich(Recipe):
    """Passes at r_max, r_min and `sandwich_k` drawn ranks, losses summed; with `distill`, r_max teaches the rest."""

    name: str = "sandwich"

    def passes(self, step: int, n_rows: int) -> list[RecipePass]:
        top, *rest = self.sampler.sandwich_ranks(step, self.sandwich_k)
        return [RecipePass("rank", (top,), teacher=self.distill and bool(rest)),
                *(RecipePass("rank", (b,), distill=self.distill) for b in rest)]

    def step_ranks(self, step: int) -> list[int] | None:
        return self.sampler.sandwich_ranks(step, self.sandwich_k)


@dataclass
class Rowwise(Recipe):
    """One pass with a rank per row (every rank in every step); with `distill`, a pass at r_max teaches it (on
    every `distill_every`-th step, on a `distill_fraction` of the rows)."""

    name: str = "rowwise"

    def passes(self, step: int, n_rows: int) -> list[RecipePass]:
        if step < self.switch_step:  # lora_first: plain LoRA at r_max
            return [RecipePass("rank", (self.sampler.r_max,))]
        taught = self.distill and step % self.distill_every == 0
        rows = RecipePass("rows", tuple(int(b) for b in self.sampler.example_ranks(n_rows, step)), distill=taught)
        if not taught:
            return [rows]
        subset = None if self.distill_fraction >= 1 else self.sampler.teacher_rows(n_rows, step, self.distill_fraction)
        return [RecipePass("rank", (self.sampler.r_max,), teacher=True, subset=subset), rows]

    def apply(self, model: torch.nn.Module, p: RecipePass) -> None:
        if p.kind == "rows":
            set_example_ranks(model, list(p.ranks))
        else:
            super().apply(model, p)


@dataclass
class Nested(Recipe):
    """One pass at the expected scale E_b[s_b] under the rank distribution."""

    name: str = "nested"

    def passes(self, step: int, n_rows: int) -> list[RecipePass]:
        return [RecipePass("expected")]

    def apply(self, model: torch.nn.Module, p: RecipePass) -> None:
        set_expected_scale(model, self.sampler.pmf())


# the one table of recipes: options.RECIPES (the names DyLoraConfig accepts, which options states without importing
# the model) names these classes, in this order (tests/test_recipes.py checks)
RECIPE_CLASSES: dict[str, type[Recipe]] = {c.name: c for c in (Paper, Sandwich, Rowwise, Nested)}


def recipe_class(name: str) -> type[Recipe]:
    """The class of recipe `name`; a ValueError naming the valid ones for any other."""
    if name not in RECIPE_CLASSES:
        raise ValueError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPE_CLASSES)}")
    return RECIPE_CLASSES[name]


__all__ = ["RANKS_KEY", "RANK_KEY", "RECIPE_CLASSES", "Nested", "Paper", "Recipe", "RecipePass", "Rowwise",
           "Sandwich", "recipe_class"]
