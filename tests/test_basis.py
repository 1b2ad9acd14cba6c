"""The SVD basis: at rank b a layer adds U_b S_b V_b^T, the best rank-b approximation (Eckart-Young) of its full
update c(r) B A, checked against an independent float64 SVD for Linear, GPT-2 Conv1D, Conv2d and Embedding."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise_lora
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

import dylora
from dylora import DyLoraConfig
from dylora.allocation import truncation_errors
from dylora.kohya import kohya_state_dict

R, ALPHA = 4, 8


class One(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


CASES = {
    "linear": (lambda: torch.nn.Linear(7, 6), lambda g: torch.randn(3, 7, generator=g), {}),
    "narrow": (lambda: torch.nn.Linear(3, 6), lambda g: torch.randn(3, 3, generator=g), {}),  # in = 3 < r = 4
    "conv1d": (lambda: Conv1D(6, 7), lambda g: torch.randn(3, 7, generator=g), {"fan_in_fan_out": True}),
    "conv2d": (lambda: torch.nn.Conv2d(3, 5, 3, padding=1), lambda g: torch.randn(2, 3, 5, 5, generator=g), {}),
    "embedding": (lambda: torch.nn.Embedding(11, 6), lambda g: torch.randint(0, 11, (3, 4), generator=g), {}),
}


def build(kind: str, r: int = R, **kw):
    torch.manual_seed(0)
    make, inputs, extra = CASES[kind]
    model = dylora.get_dylora_model(One(make()), DyLoraConfig(r=r, lora_alpha=ALPHA, target_modules=["layer"],
                                                              **extra, **kw))
    randomise_lora(model)
    return model.eval(), inputs(torch.Generator().manual_seed(2))


def lora_layer(model):
    return model.base_model.model.layer


def full_update(model) -> torch.Tensor:
    """c(r) B A in float64 as an (out, in_flat) matrix, from the raw parameters."""
    m = lora_layer(model)
    if "default" in m.lora_embedding_A:
        A, B = m.lora_embedding_A["default"], m.lora_embedding_B["default"]
    else:
        A, B = m.lora_A["default"].weight.flatten(1), m.lora_B["default"].weight.flatten(1)
    return ALPHA / R * (B.detach().double() @ A.detach().double())


def best(update: torch.Tensor, b: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(update, full_matrices=False)
    return U[:, :b] * S[:b] @ Vh[:b]


def with_weight(model, x, update: torch.Tensor) -> torch.Tensor:
    """The base layer's output with W0 + update (update as out x in_flat)."""
    base = lora_layer(model).get_base_layer()
    W0 = base.weight.double()
    if isinstance(base, torch.nn.Embedding):
        return F.embedding(x, W0 + update.T).float()
    if isinstance(base, Conv1D):
        return (x.double() @ (W0 + update.T) + base.bias.double()).float()
    if isinstance(base, torch.nn.Conv2d):
        W = W0 + update.view(W0.shape)
        return F.conv2d(x.double(), W, base.bias.double(), padding=base.padding).float()
    return F.linear(x.double(), W0 + update, base.bias.double()).float()


@pytest.mark.parametrize("kind", list(CASES))
def test_at_every_rank_b_the_svd_basis_adds_the_best_rank_b_approximation(kind):
    model, x = build(kind)
    update = full_update(model)
    for b in range(1, R + 1):
        dylora.set_rank(model, b, basis="svd")
        assert dylora.get_basis(model) == "svd" and dylora.get_rank(model) == b
        with torch.no_grad():
            torch.testing.assert_close(model(x), with_weight(model, x, best(update, b)), atol=1e-4, rtol=1e-4)
        # PEFT's get_delta_weight is the update at the layer's rank and basis, shaped like the weight
        delta = lora_layer(model).get_delta_weight("default")
        base = lora_layer(model).get_base_layer()
        ref = best(update, b)
        ref = ref.T if isinstance(base, torch.nn.Embedding | Conv1D) else ref.view(base.weight.shape)
        torch.testing.assert_close(delta.double(), ref, atol=1e-5, rtol=1e-5)
    # at b = r both bases are the full update
    dylora.set_rank(model, R)
    prefix = model(x)
    dylora.set_rank(model, R, basis="svd")
    torch.testing.assert_close(model(x), prefix, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(CASES))
def test_prefix_basis_is_the_papers_truncation(kind):
    model, x = build(kind)
    m = lora_layer(model)
    for b in range(1, R + 1):
        dylora.set_rank(model, b)
        if "default" in m.lora_embedding_A:
            A, B = m.lora_embedding_A["default"][:b], m.lora_embedding_B["default"][:, :b]
        else:
            A, B = m.lora_A["default"].weight[:b].flatten(1), m.lora_B["default"].weight[:, :b].flatten(1)
        with torch.no_grad():
            torch.testing.assert_close(model(x), with_weight(model, x, ALPHA / b * B.double() @ A.double()),
                                       atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", list(CASES))
def test_merge_and_export_in_the_svd_basis(kind, tmp_path):
    model, x = build(kind)
    b = 2
    dylora.set_rank(model, b, basis="svd")
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(dylora.merge(model, rank=b, basis="svd")(x), expected, atol=1e-4, rtol=1e-4)
    dylora.export_lora(model, rank=b, path=tmp_path / "lora", basis="svd")
    make, _, _ = CASES[kind]
    torch.manual_seed(0)
    vanilla = PeftModel.from_pretrained(One(make()), str(tmp_path / "lora")).eval()
    assert lora_layer(vanilla).r["default"] == b
    with torch.no_grad():
        torch.testing.assert_close(vanilla(x), expected, atol=1e-4, rtol=1e-4)
    # the merged adapter keeps its basis: changing it is refused
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        dylora.set_rank(model, b, basis="prefix")
    model.unmerge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_the_svd_is_computed_again_after_an_optimizer_step():
    model, x = build("linear")
    dylora.set_rank(model, 2, basis="svd")
    variant = lora_layer(model).lora_variant["default"]
    first = variant.svd(lora_layer(model), "default")
    assert variant.svd(lora_layer(model), "default") is first  # cached while the weights stay
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x).pow(2).sum().backward()
    opt.step()
    model.eval()
    assert variant.svd(lora_layer(model), "default") is not first
    with torch.no_grad():
        torch.testing.assert_close(model(x), with_weight(model, x, best(full_update(model), 2)), atol=1e-4,
                                   rtol=1e-4)


@pytest.mark.parametrize("write", ["A.data.add_", "B.data.add_", "load_state_dict"])
def test_the_svd_cache_sees_writes_that_bump_no_version_counter(write):
    """`p.data.add_` bumps the version counter of the tensor `.data` returns, not p's (checked below), so a cache
    keyed on p._version kept the old factors (issue 29: logits 2.3e-4 off a fresh model with the same weights)."""
    model, x = build("linear")
    layer = lora_layer(model)
    dylora.set_rank(model, 2, basis="svd")
    with torch.no_grad():
        model(x)  # the cache is filled
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    before = (A._version, B._version)
    if write == "load_state_dict":
        state = {k: v.clone() for k, v in model.state_dict().items()}
        key = next(k for k in state if "lora_A" in k)
        state[key] += 0.3
        for name, param in model.named_parameters():  # load through `.data` views, as some checkpoint loaders do
            if name in state:
                param.data.copy_(state[name])
    else:
        (A if write.startswith("A") else B).data.add_(0.3 * torch.randn_like(A if write.startswith("A") else B))
    assert (A._version, B._version) == before  # the write is invisible to the version counters
    fresh, _ = build("linear")
    fresh.load_state_dict(model.state_dict())
    dylora.set_rank(fresh, 2, basis="svd")
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model(x), with_weight(model, x, best(full_update(model), 2)), atol=1e-4,
                                   rtol=1e-4)


def test_per_example_ranks_in_the_svd_basis_and_the_state_restored():
    model, x = build("linear")
    dylora.set_rank(model, 3, basis="svd")
    ranks = [1, 4, 2]
    with torch.no_grad(), dylora.example_ranks(model, ranks, basis="svd"):
        with pytest.raises(RuntimeError, match="a rank per example"):
            dylora.get_rank(model)
        out = model(x)
    assert (dylora.get_rank(model), dylora.get_basis(model)) == (3, "svd")
    for j, b in enumerate(ranks):
        with torch.no_grad(), dylora.at_rank(model, b, basis="svd"):
            torch.testing.assert_close(out[j], model(x[j:j + 1])[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="basis must be one of prefix, svd"):
        dylora.set_rank(model, 2, basis="pca")


def test_a_plain_lora_is_usable_at_every_rank_in_the_svd_basis(tmp_path):
    torch.manual_seed(0)
    lora = get_peft_model(One(torch.nn.Linear(7, 6)), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["layer"]))
    randomise_lora(lora)
    lora.save_pretrained(str(tmp_path))
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = dylora.load(One(torch.nn.Linear(7, 6)), tmp_path)
    update = full_update(model)
    for b in range(1, R + 1):
        with torch.no_grad(), dylora.at_rank(model, b, basis="svd"):
            torch.testing.assert_close(model(x), with_weight(model, x, best(update, b)), atol=1e-4, rtol=1e-4)


def test_sweep_allocation_and_kohya_in_the_svd_basis():
    model, x = build("linear")
    layer = lora_layer(model)
    S = torch.linalg.svdvals(full_update(model))
    errors = truncation_errors(layer, "default", "svd")
    torch.testing.assert_close(torch.tensor(errors), torch.tensor([float((S[b:] ** 2).sum()) for b in range(R + 1)]),
                               rtol=1e-6, atol=1e-8)
    rows = dylora.rank_sweep(model, lambda m: {"out": float(m(x).sum())}, ranks=[1, 2], basis="both", progress=False)
    assert [(row.rank, row.basis) for row in rows] == [(1, "prefix"), (1, "svd"), (2, "prefix"), (2, "svd")]
    with torch.no_grad(), dylora.at_rank(model, 1, basis="svd"):
        assert rows[1].metrics["out"] == pytest.approx(float(model(x).sum()), rel=1e-6)
    assert dylora.get_rank(model) == R and dylora.get_basis(model) == "prefix"
    state, meta = kohya_state_dict({"unet": model}, 2, basis="svd")
    down, up, alpha = (state["lora_unet_layer." + k] for k in ("lora_down.weight", "lora_up.weight", "alpha"))
    assert down.shape == (2, 7) and meta["ss_network_dim"] == "2"
    torch.testing.assert_close((float(alpha) / 2) * up.double() @ down.double(), best(full_update(model), 2),
                               atol=1e-5, rtol=1e-5)


def test_svd_of_a_large_layer_is_exact_without_an_svd_of_the_update():
    """QR of A^T and B plus an r x r SVD: the singular values of a 384 x 1536 update of rank 8."""
    from dylora.functional import svd_factors

    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(8, 1536, generator=g), torch.randn(384, 8, generator=g)
    B[:, 5] = 0  # rank-deficient: B's column 5 is zero
    A_s, B_s, S = svd_factors(A, B, 2.0)
    ref = torch.linalg.svdvals(2.0 * B.double() @ A.double())[:8]
    torch.testing.assert_close(S, ref, rtol=1e-9, atol=1e-9)
    for b in (1, 4, 8):
        torch.testing.assert_close(B_s[:, :b] @ A_s[:b], best(2.0 * B.double() @ A.double(), b), rtol=1e-8, atol=1e-8)


def test_svd_export_loads_in_vanilla_peft_in_another_process(tmp_path):
    """The exported rank-2 SVD cut is a plain PEFT LoRA: a fresh process with only peft loads it."""
    model, x = build("linear")
    dylora.export_lora(model, rank=2, path=tmp_path / "lora", basis="svd")
    with torch.no_grad(), dylora.at_rank(model, 2, basis="svd"):
        expected = model(x)
    base = lora_layer(model).get_base_layer()
    save_file({"x": x, "weight": base.weight.detach(), "bias": base.bias.detach()}, str(tmp_path / "io.safetensors"))
    code = f"""
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
io = load_file({str(tmp_path / 'io.safetensors')!r})
class One(torch.nn.Module):
    def __init__(self):
        super().__init__(); self.layer = torch.nn.Linear(7, 6)
    def forward(self, x):
        return self.layer(x)
base = One(); base.layer.load_state_dict({{"weight": io["weight"], "bias": io["bias"]}})
model = PeftModel.from_pretrained(base, {str(tmp_path / 'lora')!r}).eval()
with torch.no_grad():
    save_file({{"out": model(io["x"])}}, {str(tmp_path / 'out.safetensors')!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    torch.testing.assert_close(load_file(str(tmp_path / "out.safetensors"))["out"], expected, atol=1e-5, rtol=1e-5)
