"""DyLoRA with TRL: `DyLoraSFTTrainer` is TRL's `SFTTrainer` with a DyLoRA recipe (paper, sandwich, rowwise,
nested), as `DyLoraTrainer` is the HF Trainer's.

`SFTTrainer` + `DyLoraCallback` is enough for the paper's recipe (one rank per optimizer step). The model is
a DyLoRA model (`dylora.get_dylora_model`), or a plain one with `peft_config=DyLoraConfig(...)`.
"""

from __future__ import annotations

from typing import Any

from trl import SFTTrainer

from .recipes import Recipe
from .training import DyLoraTrainerMixin


class DyLoraSFTTrainer(DyLoraTrainerMixin, SFTTrainer):
    """TRL's SFTTrainer with the DyLoRA recipe of the model's adapter (or `recipe=`), SFT's own loss at each pass.

    Distillation (`distill` with sandwich or rowwise, which `dylora train` distills by default) is refused:
    SFTTrainer's fused LM head builds no logits with gradient.
    The re-basis options (`rebasis_every`, `lora_first` without `distill`) run here as in `DyLoraTrainer` (a callback
    after the optimizer step); both trainers refuse them under FSDP or DeepSpeed, whose shards hold no whole A or B.
    """

    def __init__(self, *args: Any, recipe: Recipe | None = None, **kwargs: Any) -> None:
        super().__init__(*args, recipe=recipe, **kwargs)
        if self.recipe.distill:
            raise ValueError("DyLoraSFTTrainer cannot distill (SFTTrainer builds no logits with gradient); "
                             "use distill=False (any recipe), or DyLoraTrainer")
