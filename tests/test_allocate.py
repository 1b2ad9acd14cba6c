"""Per-layer ranks: at a rank map {l: b_l} layer l computes W0 x + (alpha/b_l) B_l[:, :b_l] A_l[:b_l] x,
and exports and merges exactly."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bert, tiny_gpt2
from safetensors.torch import load_file
from test_files import make, saved_base, vanilla_peft_outputs  # noqa: F401  (saved_base is a fixture)

import dylora

PREFIX = "base_model.model."


def spread(model, lo=1, hi=None):
    """A rank map with different ranks in neighbouring layers, cycling through lo, lo + 1, ..., hi."""
    names = list(dylora.get_layer_ranks(model))
    hi = hi or model.peft_config["default"].r
    return {name: lo + i % (hi - lo + 1) for i, name in enumerate(names)}


def formula(module, x, b, alpha):
    """W0 x + (alpha / b) B[:, :b] A[:b] x from the raw tensors of one PEFT LoRA layer."""
    base = module.get_base_layer()(x)
    if "default" in module.lora_embedding_A:
        A, B = module.lora_embedding_A["default"], module.lora_embedding_B["default"]
        return base + (alpha / b) * F.embedding(x, A[:b].T) @ B[:, :b].T
    A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
    return base + (alpha / b) * x @ A[:b].T @ B[:, :b].T


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_every_layer_at_its_own_rank_is_the_formula(family, ids):
    """nn.Linear (BERT), GPT-2 Conv1D and nn.Embedding, each layer checked on the input it really gets."""
    base, targets = (tiny_bert(), ["query", "value"]) if family == "bert" else (tiny_gpt2(), ["c_attn", "wte"])
    model = make(base, targets, r=4)
    ranks = spread(model)
    assert len(set(ranks.values())) > 1
    dylora.set_layer_ranks(model, ranks)
    assert dylora.get_layer_ranks(model) == ranks
    seen = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda mod, args, out, name=name: seen.__setitem__(name, (args[0], out))) for name in ranks]
    with torch.no_grad():
        model(input_ids=ids)
        for h in hooks:
            h.remove()
        assert set(seen) == set(ranks)
        for name, (x, out) in seen.items():
            expected = formula(model.get_submodule(name), x, ranks[name], 16)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=name)


def test_names_with_or_without_prefix_and_unlisted_layers_keep_their_rank():
    model = make(tiny_bert(), ["query", "value"])
    dylora.set_rank(model, 3)
    query0 = PREFIX + "bert.encoder.layer.0.attention.self.query"
    dylora.set_layer_ranks(model, {"bert.encoder.layer.1.attention.self.value": 5, query0: 1})
    got = dylora.get_layer_ranks(model)
    assert got.pop(query0) == 1 and got.pop(PREFIX + "bert.encoder.layer.1.attention.self.value") == 5
    assert set(got.values()) == {3}
    with pytest.raises(RuntimeError, match=r"disagree on the rank: \[1, 3, 5\]; use dylora\.get_layer_ranks"):
        dylora.get_rank(model)


def test_export_at_a_rank_map_loads_in_vanilla_peft(saved_base, tmp_path, ids):  # noqa: F811
    """r = the largest b_l, rank_pattern anchored to full paths; with bake_scale B carries alpha_l / b_l."""
    base_dir, fresh, targets = saved_base
    if "causal" in base_dir.name:
        targets = [*targets, "wte"]
    model = make(fresh(), targets, r=4)
    ranks = {name.removeprefix(PREFIX) if i % 2 else name: b for i, (name, b) in enumerate(spread(model, 1, 3).items())}
    plain = dylora.export_lora(model, ranks=ranks, path=tmp_path / "plain")
    baked = dylora.export_lora(model, ranks=ranks, path=tmp_path / "baked", bake_scale=True)
    cfg, cfg_baked = (json.loads((p / "adapter_config.json").read_text()) for p in (plain, baked))
    full = {PREFIX + k.removeprefix(PREFIX): b for k, b in ranks.items()}
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 16 and cfg["alpha_pattern"] == {}
    assert cfg["rank_pattern"] == {"^" + k.removeprefix(PREFIX).replace(".", r"\."): b
                                   for k, b in full.items() if b != 3}
    assert cfg_baked["lora_alpha"] == 3 and cfg_baked["alpha_pattern"] == cfg_baked["rank_pattern"]
    weights, weights_baked = (load_file(p / "adapter_model.safetensors") for p in (plain, baked))
    for key, t in weights.items():
        module, _, part = key.rpartition(".lora_")
        b = full[module]
        assert t.shape[0 if part in ("A.weight", "embedding_A") else 1] == b
        if part in ("B.weight", "embedding_B"):
            torch.testing.assert_close(weights_baked[key], t * 16 / b)
    got_plain, got_baked = vanilla_peft_outputs(base_dir, [plain, baked], ids, tmp_path)
    dylora.set_layer_ranks(model, ranks)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    assert (got_plain - ours).abs().max() <= 1e-5
    assert (got_baked - ours).abs().max() <= 1e-5


def test_merge_at_a_rank_map_equals_the_unmerged_model(ids):
    model = make(tiny_gpt2(), ["c_attn", "c_proj", "wte"], r=4)
    ranks = spread(model)
    before = dylora.get_layer_ranks(model)
    merged = dylora.merge(model, ranks=ranks)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert dylora.get_layer_ranks(model) == before  # merge works on a copy
    dylora.set_layer_ranks(model, ranks)
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() <= 1e-5


# ------------------------------------------------------------------ errors, one line each


def one_line(err):
    assert "\n" not in str(err.value)


def test_bad_names_and_ranks():
    model = make(tiny_bert(), ["query", "value"], r=8, r_min=2)
    with pytest.raises(ValueError, match=r"unknown module 'bert\.nope'.*like base_model\.model\.bert\.") as e:
        dylora.set_layer_ranks(model, {"bert.nope": 2})
    one_line(e)
    query0 = "bert.encoder.layer.0.attention.self.query"
    for bad in (1, 9, 2.5):
        with pytest.raises(ValueError, match=rf"{query0}: rank must be an integer in \[r_min, r\] = \[2, 8\]") as e:
            dylora.set_layer_ranks(model, {query0: bad})
        one_line(e)
    with pytest.raises(ValueError, match=r"\[2, 8\]"):
        dylora.export_lora(model, ranks={query0: 1}, path="unused")
    with pytest.raises(ValueError, match=r"\[2, 8\]"):
        dylora.merge(model, ranks={query0: 9})
    with pytest.raises(ValueError, match="either rank .* or ranks"):
        dylora.export_lora(model, 2, "unused", ranks={query0: 2})
    assert set(dylora.get_layer_ranks(model).values()) == {8}  # nothing was set


def test_a_plain_lora_model_has_no_layer_ranks():
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query"]))
    with pytest.raises(ValueError, match="no DyLoRA adapter") as e:
        dylora.get_layer_ranks(lora)
    one_line(e)


def test_pattern_keys_match_one_module_only_in_peft():
    """PEFT takes the first key k with re.match(rf"(.*\\.)?({k})$", name): plain paths would be ambiguous."""
    from peft.utils.other import get_pattern_key

    from dylora.model import pattern_key

    names = ["model.enc.layer.1.q", "dec.model.enc.layer.1.q", "model.enc.layer_1.q"]
    keys = [pattern_key(PREFIX + name) for name in names]
    assert [get_pattern_key(keys, name) for name in names] == keys
    assert [get_pattern_key(names, name) for name in names] == [names[0]] * 3  # what plain paths would do
