"""PEFT's own LoRA behaviours, run against DyLoRA on every layer type it supports, at b = r and b < r.

The reference at rank b is a vanilla PEFT LoRA of rank b (same lora_alpha, so PEFT's scale alpha / b) holding
A[:b] and B[:, :b]: whatever PEFT promises for that LoRA (merging, disabling, several adapters, mixed batches,
saving, dtypes, delta weights, weighted adapters), DyLoRA at rank b must do too. Written here from PEFT's
documented behaviour (issue #20), on one-layer models so the whole file runs in seconds.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomise_lora
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from transformers.pytorch_utils import Conv1D

import dylora
from dylora import DyLoraConfig
from dylora.layers import GRAD_BUFFERS, SCALE_BUFFERS

R, ALPHA = 4, 8  # the DyLoRA adapter "default": r (= r_max) and lora_alpha
R2, ALPHA2 = 3, 5  # a second DyLoRA adapter "other"
KINDS = ("linear", "gpt2_conv1d", "embedding", "conv1d", "conv2d", "conv3d")
RANKS = (R, 2)  # b = r and b < r


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: on layers this small, a second thread only adds its start-up (10x slower convs here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Net(torch.nn.Module):
    """One layer named `layer`: the target of every adapter here."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def base_net(kind: str) -> Net:
    """The same base weights on every call (seeded), so a fresh base can receive a saved adapter."""
    torch.manual_seed(0)
    layer = {
        "linear": lambda: torch.nn.Linear(6, 5),
        "gpt2_conv1d": lambda: Conv1D(5, 6),  # GPT-2's (in, out) weight: PEFT's fan_in_fan_out
        "embedding": lambda: torch.nn.Embedding(10, 5),
        "conv1d": lambda: torch.nn.Conv1d(3, 5, 3, padding=1),
        "conv2d": lambda: torch.nn.Conv2d(3, 5, 3, padding=1),
        "conv3d": lambda: torch.nn.Conv3d(3, 5, 3, padding=1),
    }[kind]()
    with torch.no_grad():
        for p in layer.parameters():  # a non-zero bias and weight on every layer (Conv1D starts its bias at 0)
            p.copy_(torch.randn(p.shape) * 0.5)
    return Net(layer).eval()


def inputs(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if kind == "embedding":
        return torch.randint(0, 10, (3, 4), generator=g)
    shape = {"linear": (3, 6), "gpt2_conv1d": (3, 6), "conv1d": (3, 3, 7), "conv2d": (3, 3, 5, 5),
             "conv3d": (3, 3, 3, 4, 4)}[kind]
    return torch.randn(shape, generator=g)


def lora_kwargs(kind: str) -> dict:
    return {"target_modules": ["layer"], "fan_in_fan_out": kind == "gpt2_conv1d"}


def dylora_net(kind: str, two: bool = False) -> PeftModel:
    """A DyLoRA adapter "default" (and with `two` a second one, "other") with random A and B."""
    model = dylora.get_dylora_model(base_net(kind), DyLoraConfig(r=R, lora_alpha=ALPHA, **lora_kwargs(kind)))
    if two:
        dylora.add_dylora_adapter(model, "other", DyLoraConfig(r=R2, lora_alpha=ALPHA2, **lora_kwargs(kind)))
    randomise_lora(model)
    return model.eval()


def layer_of(model: torch.nn.Module) -> LoraLayer:
    return model.base_model.model.layer


def factors(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one adapter: A (r, ...), B (out, r, ...), whatever the layer type."""
    if adapter in layer.lora_embedding_A:
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


def vanilla(kind: str, source: PeftModel, ranks: dict[str, int]) -> PeftModel:
    """A vanilla PEFT LoRA on a fresh base: adapter a of rank ranks[a], lora_alpha as in `source`, holding
    A[:b] and B[:, :b] of `source`'s adapter a; every adapter in `ranks` is active."""
    model = None
    for adapter, b in ranks.items():
        cfg = LoraConfig(r=b, lora_alpha=source.peft_config[adapter].lora_alpha, **lora_kwargs(kind))
        if model is None:
            model = get_peft_model(base_net(kind), cfg, adapter_name=adapter)
        else:
            model.add_adapter(adapter, cfg)
        A, B = factors(layer_of(source), adapter)
        A_new, B_new = factors(layer_of(model), adapter)
        with torch.no_grad():
            A_new.copy_(A[:b])
            B_new.copy_(B[:, :b])
    model.base_model.set_adapter(list(ranks))
    return model.eval()


def run(model: torch.nn.Module, x: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **kw)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def other_rank(b: int) -> int:
    return R2 if b == R else 1


def at_rank(kind: str, b: int, two: bool = False) -> tuple[PeftModel, torch.Tensor]:
    """A DyLoRA net with "default" at rank b (and "other" at `other_rank(b)`), and its input."""
    model = dylora_net(kind, two)
    dylora.set_rank(model, b, "default")
    if two:
        dylora.set_rank(model, other_rank(b), "other")
    return model, inputs(kind)


cases = pytest.mark.parametrize("kind", KINDS)
ranks = pytest.mark.parametrize("b", RANKS, ids=lambda b: "b=r" if b == R else f"b={b}<r")


@cases
@ranks
def test_output_equals_vanilla_lora_of_rank_b(kind, b):
    model, x = at_rank(kind, b)
    expected = run(vanilla(kind, model, {"default": b}), x)
    assert not torch.allclose(expected, run(base_net(kind), x))  # the adapter does something
    close(run(model, x), expected)


@cases
@ranks
@pytest.mark.parametrize("safe", [False, True], ids=["merge", "safe_merge"])
def test_merge_unmerge_and_merge_and_unload(kind, b, safe):
    model, x = at_rank(kind, b)
    expected = run(vanilla(kind, model, {"default": b}), x)
    w0 = layer_of(model).get_base_layer().weight.detach().clone()
    model.merge_adapter(safe_merge=safe)
    assert layer_of(model).merged
    close(run(model, x), expected)
    model.unmerge_adapter()
    assert not layer_of(model).merged
    torch.testing.assert_close(layer_of(model).get_base_layer().weight, w0, atol=1e-6, rtol=0)
    close(run(model, x), expected)
    plain = copy.deepcopy(model).merge_and_unload(safe_merge=safe)
    assert type(plain.layer) is type(base_net(kind).layer)
    close(run(plain, x), expected)


@cases
@ranks
def test_disable_adapter_gives_the_base_model(kind, b):
    model, x = at_rank(kind, b)
    with model.disable_adapter():
        close(run(model, x), run(base_net(kind), x))
    close(run(model, x), run(vanilla(kind, model, {"default": b}), x))


@cases
@ranks
def test_two_active_adapters_add_their_deltas(kind, b):
    model, x = at_rank(kind, b, two=True)
    model.base_model.set_adapter(["default", "other"])
    close(run(model, x), run(vanilla(kind, model, {"default": b, "other": other_rank(b)}), x))


@cases
@ranks
def test_mixed_batch_gives_each_row_its_adapter(kind, b):
    """`model(x, adapter_names=[...])`: row j uses adapter adapter_names[j] ("__base__": none)."""
    model, x = at_rank(kind, b, two=True)
    names = ["other", "default", "__base__"]
    rows = run(model, x, adapter_names=names)
    refs = {"default": run(vanilla(kind, model, {"default": b}), x),
            "other": run(vanilla(kind, model, {"other": other_rank(b)}), x), "__base__": run(base_net(kind), x)}
    for j, name in enumerate(names):
        close(rows[j], refs[name][j])


@cases
@ranks
def test_delete_adapter_leaves_no_dylora_state(kind, b):
    model, x = at_rank(kind, b, two=True)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    for module in model.modules():
        if isinstance(module, LoraLayer):
            assert "other" not in module.lora_variant
            for buffers in (SCALE_BUFFERS, GRAD_BUFFERS):
                assert "other" not in set(getattr(module, buffers, {})), f"{buffers} keeps the deleted adapter"
    close(run(model, x), run(vanilla(kind, model, {"default": b}), x))


@cases
@ranks
def test_save_and_reload_in_vanilla_peft_and_in_dylora(kind, b, tmp_path):
    """A saved DyLoRA adapter is a PEFT LoRA of rank r (vanilla PEFT loads it, as rank r); exported at b, the
    LoRA of rank b; dylora.load gives back every rank."""
    model = dylora_net(kind)
    x = inputs(kind)
    at_r = run(model, x)
    dylora.set_rank(model, b)
    at_b = run(model, x)
    dylora.save(model, tmp_path / "saved")
    close(run(PeftModel.from_pretrained(base_net(kind), tmp_path / "saved").eval(), x), at_r)
    dylora.export_lora(model, b, tmp_path / "cut")
    plain = PeftModel.from_pretrained(base_net(kind), tmp_path / "cut").eval()
    assert plain.peft_config["default"].r == b
    close(run(plain, x), at_b)
    loaded = dylora.load(base_net(kind), tmp_path / "saved")
    close(run(loaded, x), at_r)
    dylora.set_rank(loaded, b)
    close(run(loaded, x), at_b)


@cases
@ranks
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_forward_follows_float32(kind, b, dtype):
    model, x = at_rank(kind, b)
    expected = run(model, x)
    low = model.to(dtype)
    out = run(low, x if kind == "embedding" else x.to(dtype))
    assert out.dtype == dtype
    assert ((out.float() - expected).norm() / expected.norm()).item() < 2e-2
    dylora.set_rank(low, 1)  # the rank still switches in low precision
    assert not torch.allclose(run(low, x if kind == "embedding" else x.to(dtype)), out)


def reference_delta(kind: str, layer: LoraLayer, adapter: str, b: int, alpha: float) -> torch.Tensor:
    """(alpha / b) B_b A_b, shaped like the base weight: (out, in, *kernel), (in, out) for GPT-2's Conv1D,
    (num_embeddings, dim) for an Embedding."""
    A, B = factors(layer, adapter)
    A, B = A[:b].detach(), B[:, :b].detach()
    delta = (alpha / b) * torch.einsum("oj,ji...->oi...", B.flatten(1), A)
    return delta.T if kind in ("gpt2_conv1d", "embedding") else delta


@cases
@ranks
def test_get_delta_weight_is_at_rank_b(kind, b):
    model, _ = at_rank(kind, b)
    layer = layer_of(model)
    delta = layer.get_delta_weight("default")
    assert delta.shape == layer.get_base_layer().weight.shape
    torch.testing.assert_close(delta, reference_delta(kind, layer, "default", b, ALPHA), atol=1e-5, rtol=1e-5)


# PEFT 0.21's svd combination reshapes conv weights for Conv2d only: on Conv1d/Conv3d it fails for a vanilla
# LoRA too (a 2-D lora_A for a conv, or "diag(): Supports 1D or 2D tensors"), so it is no behaviour to match there
WEIGHTED = [(c, k) for c in ("linear", "cat", "svd") for k in KINDS if not (c == "svd" and k in ("conv1d", "conv3d"))]


@pytest.mark.parametrize(("combination", "kind"), WEIGHTED)
@ranks
def test_add_weighted_adapter_is_right_at_rank_b_or_refused(kind, b, combination):
    """The new adapter reproduces the adapters at their current ranks, or the call is refused in one line.

    linear: "default" alone (PEFT turns any one-adapter combination into linear); cat: default + other;
    svd: default + 0 x other (exact at the new rank r, as the sum has rank b <= r)."""
    model, x = at_rank(kind, b, two=True)
    adapters, weights = {"linear": (["default"], [1.0]), "cat": (["default", "other"], [1.0, 1.0]),
                         "svd": (["default", "other"], [1.0, 0.0])}[combination]
    rank_of = {"default": b, "other": other_rank(b)}
    expected = run(vanilla(kind, model, {a: rank_of[a] for a, w in zip(adapters, weights, strict=True) if w}), x)
    try:
        model.add_weighted_adapter(adapters, weights, "mix", combination_type=combination)
    except ValueError as err:
        assert "\n" not in str(err)
        return
    model.base_model.set_adapter("mix")
    close(run(model, x), expected)


# ---------------------------------------------------------------- LoRA variants set after the config was made (#29)


VARIANT_OPTIONS = [("use_dora", True), ("use_rslora", True), ("lora_bias", True), ("kasa_config", {})]


@pytest.mark.parametrize(("option", "value"), VARIANT_OPTIONS, ids=[o for o, _ in VARIANT_OPTIONS])
def test_a_variant_set_after_the_config_was_made_is_refused_wherever_layers_are_attached(option, value):
    """`DyLoraConfig` refuses these when it is made; set afterwards they were accepted and silently replaced by
    DyLoRA's own layer (outputs off by up to 1.7), and `attach_dylora_layers` on the DoRA model PEFT built
    returned [] (issue 29)."""
    from peft.tuners.lora.config import KasaConfig

    def config() -> DyLoraConfig:
        c = DyLoraConfig(r=R, lora_alpha=ALPHA, target_modules=["layer"])
        setattr(c, option, KasaConfig() if option == "kasa_config" else value)
        return c

    base = base_net("linear")
    with pytest.raises(ValueError, match=f"DyLoraConfig.{option}=") as err:
        dylora.get_dylora_model(base, config())
    assert "\n" not in str(err.value)
    assert not any(isinstance(m, LoraLayer) for m in base.modules())  # refused before PEFT changed the base
    model = dylora_net("linear")
    with pytest.raises(ValueError, match=f"DyLoRA.*{option}=|DyLoraConfig.{option}="):
        dylora.add_dylora_adapter(model, "other", config())
    assert "other" not in model.peft_config
    built = get_peft_model(base_net("linear"), config())  # PEFT alone builds the variant's layers
    with pytest.raises(ValueError, match=f"DyLoraConfig.{option}="):
        dylora.model.attach_dylora_layers(built)


def test_a_layer_carrying_another_variant_is_refused_by_name(tmp_path):
    config = DyLoraConfig(r=R, lora_alpha=ALPHA, target_modules=["layer"])
    config.use_dora = True
    built = get_peft_model(base_net("linear"), config)  # DoRA layers
    config.use_dora = False  # the config now reads as plain DyLoRA; the layers still carry DoRA
    with pytest.raises(ValueError, match="'base_model.model.layer' already carries PEFT's DoraLinearVariant"):
        dylora.model.attach_dylora_layers(built)
    dora = get_peft_model(base_net("linear"), LoraConfig(r=R, target_modules=["layer"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="use_dora"):
        dylora.load(base_net("linear"), tmp_path / "dora")


def test_adapted_no_layer_names_the_targets_and_what_they_matched():
    from peft.tuners.tuners_utils import BaseTunerLayer

    class Custom(torch.nn.Module, BaseTunerLayer):
        """A custom PEFT layer (LoraConfig._register_custom_module) that is not a LoRA layer."""

        adapter_layer_names = ("custom_w",)

        def __init__(self, target, adapter_name, config=None, **kwargs):
            super().__init__()
            self.base_layer = target
            self.custom_w = torch.nn.ParameterDict({adapter_name: torch.nn.Parameter(torch.zeros(1))})
            self._active_adapter = adapter_name

        def forward(self, x):
            return self.base_layer(x)

    config = DyLoraConfig(r=R, lora_alpha=ALPHA, target_modules=["layer"])
    config._register_custom_module({torch.nn.Linear: Custom})
    with pytest.raises(ValueError, match=r"adapted no layer: target_modules \{'layer'\} matched "
                                         r"base_model.model.layer \(Custom, not a LoRA layer\)") as err:
        dylora.get_dylora_model(base_net("linear"), config)
    assert "\n" not in str(err.value)
