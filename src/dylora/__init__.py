"""DyLoRA: dynamic, search-free low-rank adaptation on top of Hugging Face PEFT.

Train a LoRA adapter once over every rank b in [r_min, r]; then evaluate, merge or export any rank.
The names below are the public API. They are imported on first use (PEP 562), so `import dylora` stays fast;
the `TYPE_CHECKING` imports show them to editors and type checkers. Everything else is importable from its
module (e.g. `dylora.model.set_example_ranks`, `dylora.recipes.Recipe`, `dylora.guard.TrainingGuard`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .allocation import allocate, layer_costs
    from .config import DyLoraConfig
    from .kohya import export_kohya
    from .model import (
        add_dylora_adapter,
        at_rank,
        example_ranks,
        export_lora,
        get_basis,
        get_dylora_model,
        get_layer_ranks,
        get_rank,
        load,
        merge,
        save,
        set_layer_ranks,
        set_rank,
    )
    from .resizing import resize
    from .sampler import RankSampler
    from .sweep import rank_sweep
    from .training import DyLoraCallback, DyLoraTrainer, dylora_loss
    from .trl import DyLoraSFTTrainer

__all__ = [
    # configure and build
    "DyLoraConfig", "RankSampler", "get_dylora_model", "add_dylora_adapter", "load", "save",
    # any rank after training (prefix or SVD basis; one rank for every layer, or a rank per layer)
    "set_rank", "get_rank", "at_rank", "get_basis", "example_ranks", "set_layer_ranks", "get_layer_ranks",
    "allocate", "layer_costs", "rank_sweep",
    # export: a plain PEFT LoRA, a merged model, a kohya file, the SVD cut of any PEFT LoRA
    "export_lora", "merge", "export_kohya", "resize",
    # train: the HF Trainer with a recipe, the paper's callback for a plain Trainer, the loss for your own, TRL
    "DyLoraTrainer", "DyLoraCallback", "dylora_loss", "DyLoraSFTTrainer",
]

_MODULES = {
    "DyLoraConfig": "config", "RankSampler": "sampler", "allocate": "allocation", "layer_costs": "allocation",
    "rank_sweep": "sweep", "export_kohya": "kohya", "resize": "resizing", "DyLoraTrainer": "training",
    "DyLoraCallback": "training", "dylora_loss": "training", "DyLoraSFTTrainer": "trl",  # trl: the eco extra
}


def __getattr__(name: str) -> Any:
    if name in __all__:
        value = getattr(importlib.import_module(f".{_MODULES.get(name, 'model')}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dylora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
