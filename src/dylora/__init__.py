"""DyLoRA: dynamic, search-free low-rank adaptation on top of Hugging Face PEFT.

Train a LoRA adapter once over every rank b in [r_min, r]; then evaluate, merge or export any rank.
"""

from .config import DyLoraConfig
from .functional import rank_scale
from .model import (
    add_dylora_adapter,
    dylora_adapters,
    export_lora,
    get_dylora_model,
    get_rank,
    load,
    merge,
    rank,
    save,
    set_rank,
)
from .sampler import RankSampler

__version__ = "0.1.0"

__all__ = [
    "DyLoraConfig",
    "RankSampler",
    "add_dylora_adapter",
    "dylora_adapters",
    "export_lora",
    "get_dylora_model",
    "get_rank",
    "load",
    "merge",
    "rank",
    "rank_scale",
    "save",
    "set_rank",
]
