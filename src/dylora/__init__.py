"""DyLoRA: dynamic, search-free low-rank adaptation on top of Hugging Face PEFT.

Train a LoRA adapter once over every rank b in [r_min, r]; then evaluate, merge or export any rank.
Names are imported on first use (PEP 562), so `import dylora` and `dylora --help` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DyLoraConfig": "config",
    "RankSampler": "sampler",
    "rank_scale": "functional",
    **{name: "model" for name in ("add_dylora_adapter", "at_rank", "dylora_adapters", "example_ranks", "export_lora",
                                  "get_basis", "get_dylora_model", "get_layer_ranks", "get_rank", "load", "merge",
                                  "rank", "save", "set_example_ranks", "set_expected_scale", "set_layer_ranks",
                                  "set_rank")},
    **{name: "allocation" for name in ("allocate", "layer_costs")},
    **{name: "training" for name in ("DyLoraCallback", "DyLoraTrainer", "DyLoraTrainerMixin", "RecipeCallback",
                                     "dylora_loss", "step_rank")},
    "Recipe": "recipes",
    "TrainingGuard": "guard",
    **{name: "sweep" for name in ("SweepRow", "rank_parameters", "rank_sweep")},
    "export_kohya": "kohya",
    **{name: "resizing" for name in ("resize", "resize_state_dict")},
    "DyLoraSFTTrainer": "trl",  # needs trl (the eco extra)
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dylora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

