"""The PEFT interface DyLoRA is built on, checked by name, so a PEFT release that changes it fails here with a line
saying what changed (not as a deep traceback in test_forward.py).

DyLoRA is a PEFT `LoraVariant` (src/dylora/layers.py): PEFT's LoRA layers must call the variant's `forward`,
`merge_safe`, `merge_unsafe` and `unmerge`; DyLoRA also replaces `get_delta_weight` and (for Embedding)
`_mixed_batch_forward` per layer, keeps its buffers in a `BufferDict` named in `other_param_names`, and reads the
layers' `lora_A` / `lora_B` / `lora_embedding_A` / `lora_embedding_B` / `scaling` / `lora_dropout` containers.
pyproject.toml caps peft below its next minor release; `make test-deps` runs this file at both ends of the range.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import peft
import pytest
import torch
from conftest import randomise_lora

import dylora
from dylora.layers import SCALE_BUFFERS

PEFT = f"PEFT {peft.__version__}"


def need(ok: bool, what: str) -> None:
    """Fail with one line: which PEFT, what changed, that DyLoRA depends on it."""
    assert ok, f"{PEFT}: {what}; DyLoRA depends on it (src/dylora/layers.py, model.py): update DyLoRA or pin peft"


def params(fn: Callable) -> list[str]:
    return list(inspect.signature(fn).parameters)


# (module, name): every PEFT name the core imports
IMPORTS = [
    ("peft", "LoraConfig"), ("peft", "PeftModel"), ("peft", "get_peft_model"),
    ("peft.tuners.lora.layer", "LoraLayer"), ("peft.tuners.lora.layer", "LoraVariant"),
    ("peft.tuners.lora.layer", "Linear"), ("peft.tuners.lora.layer", "Embedding"),
    ("peft.tuners.lora.layer", "_ConvNd"), ("peft.tuners.lora.layer", "ParamWrapper"),
    ("peft.tuners.lora.layer", "MultiheadAttention"), ("peft.tuners._buffer_dict", "BufferDict"),
    ("peft.utils", "get_peft_model_state_dict"), ("peft.utils", "set_peft_model_state_dict"),
    ("peft.utils.other", "transpose"), ("peft.utils.other", "get_pattern_key"),
]


@pytest.mark.parametrize(("module", "name"), IMPORTS, ids=[f"{m}.{n}" for m, n in IMPORTS])
def test_imports(module, name):
    try:
        found = importlib.import_module(module)
    except ImportError as err:
        need(False, f"module {module} is gone ({err})")
    need(hasattr(found, name), f"{module}.{name} is gone")


@pytest.mark.parametrize(("method", "args"), [
    ("forward", ["module", "active_adapter", "x", "result"]),
    ("merge_safe", ["module", "active_adapter", "orig_weight"]),
    ("merge_unsafe", ["module", "active_adapter", "orig_weight"]),
    ("unmerge", ["module", "active_adapter", "orig_weight"]),
    ("init", ["module", "adapter_name"]),
])
def test_lora_variant_methods(method, args):
    from peft.tuners.lora.layer import LoraVariant

    fn = getattr(LoraVariant, method, None)
    need(fn is not None, f"LoraVariant.{method} is gone")
    need(params(fn)[:len(args)] == args, f"LoraVariant.{method} takes ({', '.join(params(fn))}), not "
         f"({', '.join(args)}) first")


@pytest.mark.parametrize(("cls", "method", "args"), [
    ("Linear", "get_delta_weight", ["self", "adapter"]),
    ("Embedding", "get_delta_weight", ["self", "adapter"]),
    ("_ConvNd", "get_delta_weight", ["self", "adapter"]),
    ("Linear", "_mixed_batch_forward", ["self", "x"]),
    ("Embedding", "_mixed_batch_forward", ["self", "x"]),
    ("Embedding", "_embed", ["self", "input", "weight"]),
    ("LoraLayer", "_get_embed_scale", ["self"]),
    ("LoraLayer", "get_base_layer", ["self"]),
])
def test_layer_methods(cls, method, args):
    from peft.tuners.lora import layer

    fn = getattr(getattr(layer, cls), method, None)
    need(fn is not None, f"lora.{cls}.{method} is gone")
    need(params(fn)[:len(args)] == args, f"lora.{cls}.{method} takes ({', '.join(params(fn))}), not "
         f"({', '.join(args)}) first")


def test_mixed_batch_forward_takes_adapter_names():
    from peft.tuners.lora.layer import Embedding, Linear

    for cls in (Linear, Embedding):
        need("adapter_names" in params(cls._mixed_batch_forward),
             f"lora.{cls.__name__}._mixed_batch_forward takes no adapter_names")


class Net(torch.nn.Module):
    """One layer of each kind DyLoRA attaches to: Embedding, Linear, Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(20, 8)
        self.lin = torch.nn.Linear(8, 6)
        self.conv = torch.nn.Conv2d(2, 4, 3)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(self.emb(ids)), self.conv(image)


def dylora_net() -> Any:
    config = dylora.DyLoraConfig(r=4, r_min=1, lora_alpha=8, target_modules=["emb", "lin", "conv"])
    return dylora.get_dylora_model(Net(), config)


def layers(model) -> dict[str, Any]:
    from peft.tuners.lora.layer import LoraLayer

    return {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


INPUTS = (torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.randn(2, 2, 5, 5))


@pytest.mark.parametrize("kind", ["emb", "lin", "conv"])
def test_layer_attributes(kind):
    layer = layers(dylora_net())[kind]
    names = ("lora_embedding_A", "lora_embedding_B") if kind == "emb" else ("lora_A", "lora_B", "lora_dropout")
    for name in (*names, "scaling", "lora_variant", "lora_alpha", "r", "other_param_names", "base_layer"):
        need(hasattr(layer, name), f"PEFT's LoRA layer for {kind!r} ({type(layer).__name__}) has no {name!r}")
    need(isinstance(layer.lora_variant, dict | torch.nn.ModuleDict) and "default" in layer.lora_variant,
         f"{type(layer).__name__}.lora_variant is no longer a dict of variants by adapter name")
    need(SCALE_BUFFERS in layer.other_param_names, f"{type(layer).__name__}.other_param_names is not a tuple "
         "DyLoRA can extend")
    if kind == "lin":
        need(hasattr(layer, "fan_in_fan_out"), "lora.Linear has no fan_in_fan_out")


class Calls:
    """Wraps a variant's hooks to record which PEFT called, then runs them."""

    def __init__(self, model) -> None:
        self.seen: set[tuple[str, str]] = set()
        for kind, layer in layers(model).items():
            variant = layer.lora_variant["default"]
            for hook in ("forward", "merge_safe", "merge_unsafe", "unmerge"):
                setattr(variant, hook, self._wrap(kind, hook, getattr(variant, hook)))

    def _wrap(self, kind: str, hook: str, fn: Callable) -> Callable:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.seen.add((kind, hook))
            return fn(*args, **kwargs)
        return wrapped


@pytest.mark.parametrize("kind", ["emb", "lin", "conv"])
def test_peft_calls_the_variant(kind):
    model = dylora_net()
    calls = Calls(model)
    layer = layers(model)[kind]
    with torch.no_grad():
        model(*INPUTS)
        need((kind, "forward") in calls.seen, f"{type(layer).__name__}.forward no longer calls "
             "lora_variant[adapter].forward")
        layer.merge(safe_merge=True)
        need((kind, "merge_safe") in calls.seen, f"{type(layer).__name__}.merge(safe_merge=True) no longer calls "
             "lora_variant[adapter].merge_safe")
        layer.unmerge()
        need((kind, "unmerge") in calls.seen, f"{type(layer).__name__}.unmerge no longer calls "
             "lora_variant[adapter].unmerge")
        layer.merge()
        need((kind, "merge_unsafe") in calls.seen, f"{type(layer).__name__}.merge() no longer calls "
             "lora_variant[adapter].merge_unsafe")
        layer.unmerge()


def test_rank_reaches_forward_merge_and_mixed_batch():
    """What the calls above are for: the rank set on the model changes the forward, the merged weight and a
    mixed batch (`adapter_names`) alike; at rank b = r_max all three agree with plain LoRA."""
    model = dylora_net().eval()
    randomise_lora(model)
    with torch.no_grad():
        ids, image = INPUTS
        full = model(ids, image)
        dylora.set_rank(model, 1)
        low = model(ids, image)
        need(not torch.allclose(full[0], low[0]), "set_rank(model, 1) did not change the forward: PEFT no longer "
             "routes it through the variant")
        mixed = model(ids, image, adapter_names=["default", "__base__"])
        need(torch.allclose(mixed[0][0], low[0][0], atol=1e-5), "a mixed batch (adapter_names) no longer runs the "
             "variant's forward at the set rank")
        merged = dylora.merge(model, rank=1)
        need(torch.allclose(merged(ids, image)[0], low[0], atol=1e-5), "merge at rank 1 no longer folds in the "
             "variant's rank-1 update (merge_safe / merge_unsafe / get_delta_weight)")


def test_delete_adapter_drops_dylora_buffers():
    model = dylora_net()
    config = dylora.DyLoraConfig(r=2, r_min=1, lora_alpha=4, target_modules=["lin"])
    dylora.add_dylora_adapter(model, "other", config)
    model.delete_adapter("other")
    layer = layers(model)["lin"]
    need("other" not in getattr(layer, SCALE_BUFFERS), "PEFT's delete_adapter no longer clears the containers "
         "named in other_param_names")
