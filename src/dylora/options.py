"""The options DyLoRA adds to a LoRA config, declared once: each is a field of `DyLoraOptions` with its help and check.

`DyLoraConfig` (a PEFT LoraConfig) inherits these fields; `dylora train` offers each as an option with the same help
and default (`cli_default` where the command line's differs) and run.json records it; `Recipe.from_config` and the
training guard read it from the config. Adding an option is one field here, its check in `DyLoraOptions.check`, and
its test. This module imports nothing heavier than the standard library, so the CLI can build its options from it.

Field metadata: `help` (the option's help text), `flags` (its option names where not `--name`), `cli_default` and
`cli_type` (the command line's default and type, where they differ from the library's), `when` (the settings it applies
with, as `(words, predicate)`: the CLI refuses the option given otherwise), `option=False` (not an option of its own:
`seed` comes from the run's `--seed`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

DISTRIBUTIONS = ("uniform", "geometric")
RANK_SCALINGS = ("alpha/b", "alpha/sqrt(b)")  # c(b), see dylora.functional.rank_coefficient
MAX_DISTILL_EVERY = 1_000_000  # a teacher pass every million steps is already none after step 0
# The recipes (what an optimizer step trains): the names of dylora.recipes.RECIPE_CLASSES, in its order (stated
# here, where they are checked, since the recipe classes import the model); and the defaults, in one place.
RECIPES = ("paper", "sandwich", "rowwise", "nested")
DISTILL_RECIPES = ("sandwich", "rowwise")  # the recipes that can distill from r_max (dylora train: on by default)
DEFAULT_RECIPE = "paper"  # DyLoraConfig's: the paper's Algorithm 1; a sidecar or run.json without a recipe trained so
RECOMMENDED_RECIPE = "rowwise"  # dylora train's (with distill), the closest to LoRA at every rank (docs/results.md)
REBASIS_STATES = ("reset", "rotate")  # what a re-basis does to the optimizer state of A and B (dylora.rebasis)


def _option(default: Any, help: str, *flags: str, when: tuple[str, Callable[[Any], bool]] | None = None,
            **cli: Any) -> Any:
    metadata = {"help": help, "flags": flags, **({"when": when} if when else {}), **cli}
    return field(default=default, metadata=metadata)


@dataclass
class DyLoraOptions:
    """What DyLoRA adds to LoRA's settings (the rank r of LoRA is r_max)."""

    r_min: int = _option(1, "Smallest rank trained and served (b >= r_min).")
    rank_distribution: str = _option("uniform", "Rank distribution: uniform over [r_min, r], or geometric: "
                                     "P(b) ~ p (1-p)^(b - r_min).", "--rank-distribution", "--distribution")
    geometric_p: float = _option(0.15, "p of the geometric distribution, in (0, 1].", when=(
        "with --rank-distribution geometric", lambda o: o.rank_distribution == "geometric"))
    top_share: float = _option(0.0, "Probability of rank r itself; the ranks below it share the rest as the "
                               "distribution gives (rowwise: about this fraction of every batch's rows at r). 0: as "
                               "the distribution gives.")
    frozen: bool = _option(False, "DyLoRA (Frozen): train only component b at rank b.", "--frozen")
    seed: int = _option(0, "Seed of the rank sampler (dylora train: the run's --seed).", option=False)
    recipe: str = _option(DEFAULT_RECIPE, "How each step uses ranks: paper (one sampled rank, the paper's), sandwich, "
                          "rowwise or nested (dylora train's default: rowwise; paper with --frozen).",
                          cli_default=None, cli_type=str | None)
    sandwich_k: int = _option(1, "Sandwich: sampled ranks per step besides r_min and r.",
                              when=("with --recipe sandwich", lambda o: o.recipe == "sandwich"))
    distill: bool = _option(False, "Sandwich, rowwise: smaller ranks also learn from r's predictions (in-place "
                            "distillation; dylora train's default: on for those recipes).", "--distill/--no-distill",
                            cli_default=None, cli_type=bool | None)
    distill_weight: float = _option(0.5, "Weight w of the distillation term: (1 - w) task loss + w KL(r || b).",
                                    when=("with distillation (--distill, rowwise or sandwich)", lambda o: o.distill))
    distill_every: int = _option(1, "Rowwise with distill: run the r pass (the teacher) on every k-th step only; a "
                                 "step costs about 1 + 1/k passes instead of 2.")
    distill_fraction: float = _option(1.0, "Rowwise with distill: run the r pass (the teacher) on this fraction of "
                                      "each batch's rows only, drawn anew each step; a taught step costs about 1 + f "
                                      "passes instead of 2.")
    rank_scaling: str = _option("alpha/b", "Scale at rank b: alpha/b (the paper's) or alpha/sqrt(b).")
    rebasis_every: int = _option(0, "Rowwise: after every k-th optimizer step rotate A and B into singular-value "
                                 "order, B A unchanged (0: never).")
    rebasis_state: str = _option("reset", "The optimizer state of A and B at a re-basis: reset or rotate.")
    lora_first: float = _option(0.0, "Rowwise: train plain LoRA at r for this fraction of the steps, re-basis once "
                                "into singular-value order, then the recipe (0: off).")

    def check(self, r: int) -> None:
        """Refuse an invalid option, given the rank r (= r_max): a ValueError naming the field and what is valid."""
        def bad(name: str, valid: str) -> ValueError:
            return ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r} is invalid: {valid}")

        def integer(name: str, low: int, high: float = float("inf")) -> bool:
            value = getattr(self, name)
            return not isinstance(value, bool) and isinstance(value, int) and low <= value <= high

        def real(name: str) -> bool:  # a number, not a bool (True would pass as 1)
            value = getattr(self, name)
            return not isinstance(value, bool) and isinstance(value, int | float)

        if not integer("r_min", 1):
            raise bad("r_min", "r_min must be an integer >= 1")
        if self.r_min > r:
            raise bad("r_min", f"r_min must lie in [1, r] = [1, {r}]")
        if self.rank_distribution not in DISTRIBUTIONS:
            raise bad("rank_distribution", f"choose one of {', '.join(DISTRIBUTIONS)}")
        if not 0.0 < float(self.geometric_p) <= 1.0:
            raise bad("geometric_p", "geometric_p must lie in (0, 1]")
        if not real("top_share") or not 0.0 <= self.top_share < 1.0:
            raise bad("top_share", "top_share must be a probability in [0, 1) (0: as the distribution gives)")
        if self.top_share and self.recipe == "sandwich":
            raise bad("top_share", "a sandwich step trains r every step and draws its other ranks strictly below "
                                   "it: top_share has no effect there (use paper, rowwise or nested)")
        if self.recipe not in RECIPES:
            raise bad("recipe", f"choose one of {', '.join(RECIPES)}")
        if not integer("sandwich_k", 0):
            raise bad("sandwich_k", "sandwich_k must be an integer >= 0")
        if not isinstance(self.distill, bool):
            raise bad("distill", "distill must be true or false")
        if self.distill and self.recipe not in DISTILL_RECIPES:
            raise bad("distill", f"distillation is implemented for recipes {' and '.join(DISTILL_RECIPES)} only")
        if not 0.0 <= float(self.distill_weight) <= 1.0:
            raise bad("distill_weight", "distill_weight must lie in [0, 1]")
        if not integer("distill_every", 1, MAX_DISTILL_EVERY):
            raise bad("distill_every", f"distill_every must be an integer in [1, {MAX_DISTILL_EVERY}]")
        if self.distill_every > 1 and not (self.distill and self.recipe == "rowwise"):
            raise bad("distill_every", "distill_every > 1 thins rowwise's r_max pass: it needs recipe='rowwise' and "
                                       "distill=True")
        if not real("distill_fraction") or not 0.0 < self.distill_fraction <= 1.0:
            raise bad("distill_fraction", "distill_fraction must be a fraction of the rows in (0, 1]")
        if self.distill_fraction < 1 and not (self.distill and self.recipe == "rowwise"):
            raise bad("distill_fraction", "distill_fraction < 1 thins rowwise's r_max pass: it needs recipe='rowwise' "
                                          "and distill=True")
        if not integer("rebasis_every", 0):
            raise bad("rebasis_every", "rebasis_every must be an integer >= 0 (0: never)")
        if self.rebasis_state not in REBASIS_STATES:
            raise bad("rebasis_state", f"choose one of {', '.join(REBASIS_STATES)}")
        if not real("lora_first") or not 0.0 <= self.lora_first < 1.0:
            raise bad("lora_first", "lora_first must be a fraction of the steps in [0, 1)")
        for name in ("rebasis_every", "lora_first"):
            if getattr(self, name) and self.recipe != "rowwise":
                raise bad(name, f"{name} is implemented for recipe rowwise only, not {self.recipe}")
        if self.rank_scaling not in RANK_SCALINGS:
            raise bad("rank_scaling", f"choose one of {', '.join(RANK_SCALINGS)}")
        if self.frozen and self.recipe in ("rowwise", "nested"):
            raise bad("frozen", f"recipe {self.recipe} trains in full mode; frozen=True works with paper, sandwich")
        inner = r - self.r_min - 1  # the ranks a sandwich step draws from (its r_max and r_min passes come anyway)
        if self.recipe == "sandwich" and self.sandwich_k > max(1, inner):
            raise bad("sandwich_k", f"sandwich_k must lie in [0, {max(1, inner)}]: a sandwich step draws its extra "
                                    f"ranks from the {inner} strictly between r_min = {self.r_min} and r = {r}")


def option_names() -> tuple[str, ...]:
    """The DyLoRA options, in their order of declaration."""
    return tuple(f.name for f in fields(DyLoraOptions))


def options_of(source: Any) -> dict[str, Any]:
    """The DyLoRA options of `source` (a DyLoraConfig, the CLI's settings), by name."""
    return {name: getattr(source, name) for name in option_names()}


__all__ = ["DEFAULT_RECIPE", "DISTILL_RECIPES", "DISTRIBUTIONS", "DyLoraOptions", "MAX_DISTILL_EVERY",
           "RANK_SCALINGS", "REBASIS_STATES", "RECIPES", "RECOMMENDED_RECIPE", "option_names", "options_of"]
