"""DyLoRA on PEFT's LoRA Conv2d: at every rank b the output is conv(x, W0) + c(b) conv(conv(x, A[:b]), B[:, :b])."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise_lora
from peft import PeftModel

import dylora
from dylora import DyLoraConfig
from dylora.layers import DyLoraConvVariant
from dylora.model import set_expected_scale
from dylora.sweep import rank_parameters


def conv_net(kernel: int = 3, stride: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 5, kernel, stride=stride, padding=kernel // 2)).eval()


def dylora_conv(base, r=4, alpha=8, **kw):
    model = dylora.get_dylora_model(base, DyLoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], **kw))
    randomise_lora(model)
    return model


def layer(model):
    return model.base_model.model[0]


def reference(model, x, b, alpha, scaling="alpha/b"):
    """The formula with F.conv2d on raw tensors: W0 x + c(b) B_b A_b x, A a conv with the layer's kernel, B 1x1."""
    m = layer(model)
    conv = m.get_base_layer()
    A, B = m.lora_A["default"].weight[:b], m.lora_B["default"].weight[:, :b]
    c = alpha / b if scaling == "alpha/b" else alpha / math.sqrt(b)
    h = F.conv2d(x, A, stride=conv.stride, padding=conv.padding)
    return F.conv2d(x, conv.weight, conv.bias, stride=conv.stride, padding=conv.padding) + c * F.conv2d(h, B)


@pytest.fixture
def x():
    return torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("scaling", ["alpha/b", "alpha/sqrt(b)"])
@pytest.mark.parametrize("kernel", [1, 3])
def test_conv2d_output_at_every_rank_b(kernel, scaling, x):
    model = dylora_conv(conv_net(kernel), rank_scaling=scaling)
    assert isinstance(layer(model).lora_variant["default"], DyLoraConvVariant)
    for b in range(1, 5):
        dylora.set_rank(model, b)
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference(model, x, b, 8, scaling), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv2d_merge_and_unmerge_at_rank_b(kernel, x):
    model = dylora_conv(conv_net(kernel))
    w0 = layer(model).get_base_layer().weight.detach().clone()
    for b in (1, 3):
        dylora.set_rank(model, b)
        with torch.no_grad():
            expected = model(x)
            merged = dylora.merge(model, b)  # a copy: (alpha / b) B_b A_b folded into W0
            torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
            model.merge_adapter()
            torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
            model.unmerge_adapter()
        torch.testing.assert_close(layer(model).get_base_layer().weight, w0, atol=1e-6, rtol=0)


def test_conv2d_export_loads_in_vanilla_peft(tmp_path, x):
    model = dylora_conv(conv_net(3))
    dylora.set_rank(model, 2)
    with torch.no_grad():
        expected = model(x)
    dylora.export_lora(model, 2, tmp_path / "b2")
    plain = PeftModel.from_pretrained(conv_net(3), tmp_path / "b2").eval()
    assert plain.base_model.model[0].lora_A["default"].weight.shape == (2, 3, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frozen", [False, True])
def test_conv2d_gradients(frozen, x):
    model = dylora_conv(conv_net(3), frozen=frozen).train()
    b = 3
    dylora.set_rank(model, b)
    model(x).pow(2).mean().backward()
    gA, gB = layer(model).lora_A["default"].weight.grad, layer(model).lora_B["default"].weight.grad
    trained = [b - 1] if frozen else list(range(b))
    rest = [i for i in range(4) if i not in trained]
    assert all(gA[i].abs().sum() > 0 and gB[:, i].abs().sum() > 0 for i in trained)
    assert torch.count_nonzero(gA[rest]) == 0 and torch.count_nonzero(gB[:, rest]) == 0


def test_conv2d_example_ranks_and_expected_scale(x):
    model = dylora_conv(conv_net(3))
    with torch.no_grad():
        per_rank = {}
        for b in range(1, 5):
            dylora.set_rank(model, b)
            per_rank[b] = model(x)
        with dylora.example_ranks(model, [4, 1]):
            rows = model(x)
        torch.testing.assert_close(rows[0], per_rank[4][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rows[1], per_rank[1][1], atol=1e-5, rtol=1e-5)
        pmf = torch.tensor([0.1, 0.2, 0.3, 0.4])
        set_expected_scale(model, pmf)
        mean = sum(p * per_rank[b] for b, p in zip(range(1, 5), pmf.tolist(), strict=True))
        torch.testing.assert_close(model(x), mean, atol=1e-5, rtol=1e-5)  # one layer: affine in s_b


def test_conv_rank_parameters_count_the_kernel():
    model = dylora_conv(conv_net(3))
    assert rank_parameters(model, 2) == 2 * (3 * 3 * 3 + 5)


def test_conv1d_too(x):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Conv1d(3, 5, 3, padding=1)).eval()
    model = dylora_conv(copy.deepcopy(base))
    seq = x[:, :, 0]
    dylora.set_rank(model, 2)
    m = layer(model)
    A, B = m.lora_A["default"].weight[:2], m.lora_B["default"].weight[:, :2]
    expected = base(seq) + 4 * F.conv1d(F.conv1d(seq, A, padding=1), B)
    with torch.no_grad():
        torch.testing.assert_close(model(seq), expected, atol=1e-5, rtol=1e-5)
