"""Settings: everything that defines a run, checked in one place before anything is loaded or written.

A setting with `help` in its metadata is an option of `dylora train` and (unless its metadata says `train_only`) of
`dylora lora`, named `--name` unless `flags` says otherwise, with this default: the CLI builds its options from
here. The DyLoRA options are not declared here: they are `dylora.options.DyLoraOptions`' fields (the fields
DyLoraConfig adds to LoRA), taken as settings with their help, flags and the command line's defaults
(`DyLoraSettings`); `Settings` declares the run's own knobs (model, data, LoRA's r / alpha / dropout / targets,
schedule, the sweep, quantization, output).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..options import DEFAULT_RECIPE, DISTILL_RECIPES, RECOMMENDED_RECIPE, DyLoraOptions, options_of

TRAINING_METHODS = ("dylora", "lora", "full")
SWEEP_BASES = ("prefix", "svd", "both")  # the bases a sweep evaluates (dylora.layers.BASES, or both)
QUANTIZE = ("4bit", "8bit")  # bitsandbytes' Linear4bit / Linear8bitLt
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# how the sweep picks each rank's basis on validation (report.pick_bases); the first is the default
BASIS_RULES = ("prefer-svd", "paired", "loss", "metric")
DATASETS: tuple[str, ...] = ("polarity", "tweets", "bbc")  # classification tasks fetched from registries (app.data)
GENERATION_DATASETS: tuple[str, ...] = ("bbc-headlines", "bbc-topic")
FILE_EXTENSIONS: tuple[str, ...] = (".csv", ".tsv", ".json", ".jsonl")  # a local dataset's file types


def unknown_data(data: str) -> str:
    """The one-line refusal of a --data that names no dataset and no file or directory."""
    return (f"unknown dataset {data!r} (and no such file or directory); choose one of "
            f"{', '.join(DATASETS + GENERATION_DATASETS)}, or give a path to a {'/'.join(FILE_EXTENSIONS)} file or a "
            "directory with train.* (optional validation.*, test.*)")


def _option(default: Any, help: str, *flags: str, train_only: bool = False) -> Any:
    """A setting that is a command-line option: its default, its help and (if not --name) its option names;
    `train_only`: an option of `dylora train` that `dylora lora` does not offer (a plain LoRA has one rank)."""
    return field(default=default, metadata={"help": help, "flags": flags, "train_only": train_only})


def _dylora_settings() -> type:
    """The DyLoRA options (`DyLoraOptions` fields but `seed`, which is the run's) as settings: the same names, help and
    flags, the command line's type and default (`cli_type`, `cli_default`), offered by `dylora train` only."""
    hints = typing.get_type_hints(DyLoraOptions)
    specs = [(f.name, f.metadata.get("cli_type", hints[f.name]),
              field(default=f.metadata.get("cli_default", f.default), metadata={**f.metadata, "train_only": True}))
             for f in dataclasses.fields(DyLoraOptions) if f.metadata.get("option", True)]
    doc = "The DyLoRA options of a run (dylora.options.DyLoraOptions, with the command line's defaults)."
    return dataclasses.make_dataclass("DyLoraSettings", specs, namespace={"__module__": __name__, "__doc__": doc})


DyLoraSettings = _dylora_settings()


@dataclass
class Settings(DyLoraSettings):
    """A run's settings; written to run.json so a result can be reproduced."""

    model: str = _option("minilm", "Short name (minilm, mpnet, smollm2), model directory or hub id.")
    data: str = _option("polarity", "polarity, tweets, bbc, bbc-headlines, bbc-topic, or a .csv/.tsv/.json/.jsonl "
                                    "file.")
    method: str = "dylora"  # dylora | lora | full
    r: int = _option(8, "LoRA rank (r_max for DyLoRA); --r-max under torchrun, whose own parser takes --r for one "
                     "of its options.", "--r", "--r-max")
    lora_alpha: float = _option(16, "LoRA alpha; the scale at rank b is alpha / b.")
    lora_dropout: float = _option(0.0, "LoRA dropout.")
    target_modules: list[str] | None = _option(None, "Comma-separated module names to adapt.")
    epochs: float = _option(3.0, "Training epochs.")
    max_steps: int = _option(-1, "Stop after this many optimizer steps (-1: epochs).")
    lr: float = _option(1e-3, "Peak learning rate (AdamW, linear schedule).")
    weight_decay: float = _option(0.0, "AdamW weight decay.")
    warmup_ratio: float = _option(0.06, "Warm-up fraction of the steps.")
    batch_size: int = _option(16, "Per-process batch size.")
    grad_accum: int = _option(1, "Gradient accumulation steps.")
    eval_batch_size: int = 64
    max_length: int | None = _option(None, "Maximum tokens per example (default: 64 for classification, 160 for "
                                     "generation).")
    seed: int = _option(0, "Seed of data split, init, and rank sampler.")
    max_train: int | None = _option(None, "Subsample the train split (seeded).")
    text_column: str | None = _option(None, "Text column of a local file.")
    label_column: str | None = _option(None, "Label column of a local file.")
    text_pair_column: str | None = _option(None, "Second text column (pairs).")
    save_steps: int = _option(0, "Checkpoint every N steps (0: none).")
    modules_to_save: list[str] | None = None  # trained in full beside the adapter (default: the task head)
    logging_steps: int = 10
    within: float = _option(0.5, "'Smallest rank within' this many points of the best.", train_only=True)
    max_eval: int | None = _option(None, "Evaluate at most this many validation/test rows.")
    label_smoothing: float = _option(0.0, "Label smoothing of the training loss.")
    ranks: list[int] | None = _option(None, "Ranks the sweep evaluates, comma-separated (default: every rank from "
                                      "r_min to r).", train_only=True)
    basis: str | None = _option(None, "Bases the sweep evaluates at each rank: prefix (the first b components), svd "
                                "(the best rank-b approximation of the r_max update) or both (the default), each "
                                "rank then exported in the one picked on validation (--basis-rule).", train_only=True)
    quantize: str | None = _option(None, "Load the base model quantized by bitsandbytes, 4bit (QLoRA; QDyLoRA with "
                                   "dylora train) or 8bit; the adapter stays in full precision. Needs "
                                   "'dylora[quant]'.")
    quant_type: str = _option("nf4", "4-bit data type: nf4 or fp4.")
    double_quant: bool = _option(True, "4-bit: quantize the quantization constants too (QLoRA's double quantization).",
                                 "--double-quant/--no-double-quant")
    compute_dtype: str | None = _option(None, "dtype the quantized layers compute in: float32, bfloat16 or float16 "
                                        "(default: float32 on CPU, bfloat16 on CUDA).")
    basis_rule: str = _option(BASIS_RULES[0], "How the sweep picks each rank's basis on validation: prefer-svd (the "
                              "SVD cut unless the prefix is better beyond noise: a paired z-test on per-example "
                              "correctness, or losses for other metrics, z = 1), metric (the better score), loss "
                              "(the lower mean loss) or paired (the prefix unless the SVD cut's per-example losses "
                              "are lower beyond noise, z = 2).",
                              train_only=True)
    guard: bool = True  # stop a run whose loss is not finite or stays at chance (TrainingGuard); CLI --no-guard

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Settings:
        """Settings from run.json (older runs wrote `distribution` for `rank_distribution`)."""
        values = dict(values)
        if "distribution" in values:
            values.setdefault("rank_distribution", values.pop("distribution"))
        values.setdefault("recipe", DEFAULT_RECIPE)  # runs written before recipes existed trained the paper's way
        values.setdefault("distill", False)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def validate(self) -> Settings:
        """Refuse a bad value with one line naming it, before any side effect; fill in the default recipe."""
        self._default_recipe()
        if self.method not in TRAINING_METHODS:
            raise ValueError(f"method {self.method!r} is invalid: choose one of {', '.join(TRAINING_METHODS)}")
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
        if self.basis_rule not in BASIS_RULES:
            raise ValueError(f"--basis-rule must be one of {', '.join(BASIS_RULES)}, got {self.basis_rule!r}")
        if self.basis is not None and self.basis not in SWEEP_BASES:
            raise ValueError(f"--basis must be one of {', '.join(SWEEP_BASES)}, got {self.basis!r}")
        if self.data not in DATASETS + GENERATION_DATASETS and not Path(self.data).expanduser().exists():
            raise ValueError(unknown_data(self.data))  # before the training stack is imported: a typo fails at once
        self._validate_quantization()
        if self.method != "full":
            self.peft_config(["x"])  # DyLoraConfig / LoraConfig name the field and the valid range
        if self.method == "dylora" and self.ranks is not None:
            from ..functional import check_rank

            if not self.ranks:
                raise ValueError("--ranks is empty: give ranks like 1,2,4,8")
            for b in self.ranks:
                check_rank(b, self.r_min, self.r)
        return self

    def quantization(self) -> dict[str, Any]:
        """How the base model is loaded: the keywords of `zoo.load_kwargs` and `zoo.describe_quantization`."""
        return {"quantize": self.quantize, "quant_type": self.quant_type, "double_quant": self.double_quant,
                "compute_dtype": self.compute_dtype}

    def _validate_quantization(self) -> None:
        if self.quantize is None:
            return
        if self.quantize not in QUANTIZE:
            raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"--quant-type must be one of {', '.join(QUANT_TYPES)}, got {self.quant_type!r}")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.method == "full":
            raise ValueError("--quantize trains an adapter on a frozen quantized base: use it with dylora train or "
                             "dylora lora, not full fine-tuning")
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"--quantize {self.quantize} needs bitsandbytes: pip install 'dylora[quant]'")

    def _default_recipe(self) -> None:
        """recipe None: options.RECOMMENDED_RECIPE, rowwise (with distill None: distilled from r_max, two passes a
        step), the recipe closest to LoRA at every rank (docs/results.md, "Training recipes"); with `frozen`, which
        trains one component a step, options.DEFAULT_RECIPE (paper). distill None: on where the recipe has it
        (options.DISTILL_RECIPES: sandwich, rowwise)."""
        if self.recipe is None:
            self.recipe = DEFAULT_RECIPE if self.frozen else RECOMMENDED_RECIPE
        if self.distill is None:
            self.distill = self.recipe in DISTILL_RECIPES

    def peft_config(self, targets: list[str], task_type: str = "SEQ_CLS") -> Any:
        """The adapter's config: a DyLoraConfig, or a plain LoraConfig for the LoRA baseline, whose r,
        lora_alpha and lora_dropout pass DyLoraConfig's checks too. A bad value is named as its option."""
        from peft import LoraConfig

        from ..config import DyLoraConfig

        self._default_recipe()
        common = dict(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                      target_modules=targets, task_type=task_type, modules_to_save=self.modules_to_save)
        extra = options_of(self)  # the DyLoRA options; `seed` is the run's
        try:
            config = DyLoraConfig(**common, **(extra if self.method == "dylora" else {}))
        except ValueError as err:  # "DyLoraConfig.lora_alpha=nan is invalid: ..." -> "--lora-alpha=nan is ..."
            raise ValueError(re.sub(r"^DyLoraConfig\.(\w+)=", lambda m: f"--{m[1].replace('_', '-')}=",
                                    str(err))) from None
        return config if self.method == "dylora" else LoraConfig(**common)


def train_only() -> tuple[str, ...]:
    """The settings that are options of `dylora train` and not of `dylora lora`: the DyLoRA options, the sweep's."""
    return tuple(f.name for f in dataclasses.fields(Settings) if f.metadata.get("train_only"))
