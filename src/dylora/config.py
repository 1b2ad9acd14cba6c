"""DyLoraConfig: a PEFT LoraConfig whose `r` is r_max, plus the settings DyLoRA adds."""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, dataclass, fields
from typing import Any

from peft import LoraConfig

from .files import write_json
from .options import DyLoraOptions, option_names

MAX_RANK = 4096  # far above any useful LoRA rank; larger values only exhaust memory
SIDECAR_NAME = "dylora_config.json"

# The one list of what DyLoRA takes from peft.LoraConfig. Every field of PEFT's LoraConfig is in
# SUPPORTED_LORA_FIELDS (any value works) or in REFUSED_LORA_OPTIONS (refused once set away from PEFT's
# default); a field in neither, which a PEFT upgrade may add, is refused too until it is sorted here
# (tests/test_config.py walks the installed PEFT's fields).
SUPPORTED_LORA_FIELDS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "bias", "modules_to_save", "layers_to_transform", "layers_pattern", "alpha_pattern", "trainable_token_indices",
    "layer_replication", "runtime_config", "ensure_weight_tying", "megatron_core", "qalora_group_size",
})
# init_lora_weights values DyLoRA takes: B starts at zero (or both random, for debugging), so the adapter
# leaves W0 alone at every rank b
SUPPORTED_INITS = (True, False, "gaussian")
_RESIDUAL = "subtracts the rank-r product from W0, so at a rank b < r the model starts away from W0"
_INIT_WHY = {
    "pissa": f"PiSSA {_RESIDUAL}", "olora": f"OLoRA {_RESIDUAL}", "corda": f"CorDA {_RESIDUAL}",
    "loftq": f"LoftQ {_RESIDUAL}", "lora_ga": f"LoRA-GA {_RESIDUAL}",
    "orthogonal": "the orthogonal init cancels B A at rank r only, so at a rank b < r the model starts away from W0",
    "eva": "EVA needs its own data-driven init pass and redistributes ranks across layers",
    "mica": "MiCA is a LoRA variant DyLoRA does not implement",
}
_VARIANT = "is a LoRA variant DyLoRA does not implement"
REFUSED_LORA_OPTIONS = {
    "use_rslora": "DyLoRA scales by lora_alpha / b; for lora_alpha / sqrt(b) set rank_scaling='alpha/sqrt(b)'",
    "use_dora": f"DoRA {_VARIANT}",
    "use_qalora": f"QA-LoRA {_VARIANT}",
    "velora_config": f"VeLoRA {_VARIANT}",
    "alora_invocation_tokens": f"aLoRA (activated LoRA) {_VARIANT}",
    "monteclora_config": f"MonteCLoRA {_VARIANT}",
    "use_bdlora": f"BD-LoRA (block-diagonal LoRA) {_VARIANT}",
    "arrow_config": f"Arrow (routing over LoRA experts) {_VARIANT}",
    "kasa_config": f"KaSA {_VARIANT}",
    "lora_bias": "a LoRA bias has no rank; it is not supported with DyLoRA",
    "rank_pattern": "DyLoRA needs one r_max for every layer; leave rank_pattern empty",
    "megatron_config": "Megatron's parallel LoRA layers take no DyLoRA variant",
    "target_parameters": "LoRA on nn.Parameter targets (PEFT's ParamWrapper) takes no DyLoRA variant; "
                         "target the modules (target_modules) instead",
    "init_lora_weights": f"choose one of {', '.join(map(repr, SUPPORTED_INITS))}",
    "loftq_config": "it goes with init_lora_weights='loftq', which DyLoRA refuses",
    "eva_config": "it goes with init_lora_weights='eva', which DyLoRA refuses",
    "corda_config": "it goes with init_lora_weights='corda', which DyLoRA refuses",
    "lora_ga_config": "it goes with init_lora_weights='lora_ga', which DyLoRA refuses",
}


@dataclass
class DyLoraConfig(LoraConfig, DyLoraOptions):
    """LoRA trained over every rank b in [r_min, r] (Valipour et al., 2023).

    `r` is r_max. Training draws ranks b from `rank_distribution` (one a step with the paper's recipe, one a row
    with rowwise: see `recipe`); at rank b a layer computes W0 x + (lora_alpha / b) B[:, :b] A[:b] x.
    `frozen=True` trains only row b of A and column b of B at each step (the paper's "DyLoRA (Frozen)");
    `frozen=False` trains rows/columns 1..b.

    The adapter saves as a plain PEFT LoRA (peft_type "LORA", the DyLoRA fields are left out of
    `adapter_config.json`) with the DyLoRA fields in a sidecar `dylora_config.json`.
    `use_rslora` is refused: its alpha / sqrt(r) scale contradicts DyLoRA's alpha / b; set
    `rank_scaling="alpha/sqrt(b)"` for rsLoRA's scale at every rank b instead.

    `recipe` says what each optimizer step trains (see `dylora.recipes`): "paper" one sampled rank,
    "sandwich" r_max + r_min + `sandwich_k` sampled ranks with the losses summed (with `distill`, every rank
    below r_max also learns from r_max's detached predictions, weight `distill_weight`), "rowwise" one
    pass with a stratified rank per example (with `distill`, a pass at r_max first, whose detached
    predictions the rowwise pass also learns from; `distill_every=k` runs that pass on every k-th step only),
    "nested" one pass at the expected scale E_b[s_b].

    Rowwise only: `rebasis_every=k` rotates every layer's A and B after every k-th optimizer step so that their
    components come in singular-value order (B A unchanged; `functional.svd_rebasis`), the optimizer state of A and B
    reset or rotated (`rebasis_state`); `lora_first=f` trains plain LoRA at r_max for the first round(f * steps)
    optimizer steps, re-bases once after them, then trains the recipe (with its teacher, if `distill`).

    The DyLoRA fields, their help and their checks are declared once, in `dylora.options.DyLoraOptions`.
    """


    def __post_init__(self) -> None:
        _validate(self)
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        """The plain-LoRA part only, so `adapter_config.json` loads in vanilla PEFT without warnings."""
        out = super().to_dict()
        for name in dylora_field_names():
            out.pop(name, None)
        return out

    def dylora_dict(self) -> dict[str, Any]:
        """The DyLoRA-only settings, as written to the sidecar file."""
        return {name: getattr(self, name) for name in dylora_field_names()}

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        super().save_pretrained(save_directory, **kwargs)
        payload = {"format": "dylora", "version": 1, "r": self.r, "lora_alpha": self.lora_alpha,
                   **self.dylora_dict()}
        write_json(os.path.join(save_directory, SIDECAR_NAME), payload, sort_keys=True)

    @classmethod
    def from_lora_config(cls, lora: dict[str, Any], dylora: dict[str, Any]) -> DyLoraConfig:
        """Rebuild from an `adapter_config.json` dict and a sidecar dict (whose r and lora_alpha, where it has
        them, must be adapter_config.json's: a sidecar of another adapter is refused, not ignored)."""
        for name in ("r", "lora_alpha"):
            if name in dylora and dylora[name] != lora.get(name):
                raise ValueError(f"its {SIDECAR_NAME} has {name}={dylora[name]!r} but adapter_config.json has "
                                 f"{name}={lora.get(name)!r}: the sidecar belongs to another adapter")
        known = {f.name for f in fields(cls) if f.init}
        kwargs = {k: v for k, v in lora.items() if k in known and k != "peft_type"}
        if kwargs.pop("use_rslora", False):  # a plain rsLoRA adapter (e.g. exported): its scale at every rank
            kwargs["rank_scaling"] = "alpha/sqrt(b)"
        kwargs.update({k: v for k, v in dylora.items() if k in dylora_field_names()})
        return cls(**kwargs)


def dylora_field_names() -> tuple[str, ...]:
    """The fields DyLoRA adds to LoraConfig (`dylora.options.DyLoraOptions`)."""
    return option_names()


def check_config(config: DyLoraConfig) -> None:
    """Refuse a DyLoraConfig whose values are invalid now (a ValueError naming the field): the checks of its
    construction, run again where layers are attached, for options set on it after it was made."""
    _validate(config)


def _validate(c: DyLoraConfig) -> None:
    def bad(name: str, valid: str) -> ValueError:
        return ValueError(f"DyLoraConfig.{name}={getattr(c, name)!r} is invalid: {valid}")

    if isinstance(c.r, bool) or not isinstance(c.r, int) or c.r < 1:
        raise bad("r", "r (= r_max) must be an integer >= 1")
    if c.r > MAX_RANK:
        raise bad("r", f"r (= r_max) must be at most {MAX_RANK}")
    if isinstance(c.lora_alpha, bool) or not isinstance(c.lora_alpha, int | float) or not math.isfinite(c.lora_alpha) \
            or c.lora_alpha <= 0:
        raise bad("lora_alpha", "lora_alpha must be a finite number > 0")
    if not isinstance(c.lora_dropout, int | float) or not 0 <= c.lora_dropout < 1:
        raise bad("lora_dropout", "lora_dropout must lie in [0, 1)")
    c.check(c.r)
    for f in fields(LoraConfig):
        if f.name not in SUPPORTED_LORA_FIELDS and _is_set(f, getattr(c, f.name)):
            raise bad(f.name, _refusal(f.name, getattr(c, f.name)))


def _is_set(f: Any, value: Any) -> bool:
    """Whether a LoraConfig field holds a value other than PEFT's default (falsy values all count as unset)."""
    if f.name == "init_lora_weights":
        return not any(value is v or (isinstance(v, str) and value == v) for v in SUPPORTED_INITS)
    default = f.default_factory() if f.default is MISSING else f.default
    return value != default and bool(value or default)


def _refusal(name: str, value: Any) -> str:
    """Why DyLoRA refuses a set LoRA option (an option a PEFT upgrade added is named as such)."""
    if name == "init_lora_weights":
        why = next((w for k, w in _INIT_WHY.items() if isinstance(value, str) and value.lower().startswith(k)), None)
        return f"{why}; {REFUSED_LORA_OPTIONS[name]}" if why else REFUSED_LORA_OPTIONS[name]
    return REFUSED_LORA_OPTIONS.get(name, "a PEFT LoRA option DyLoRA does not implement (not in "
                                          "dylora.config.SUPPORTED_LORA_FIELDS)")
