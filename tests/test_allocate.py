"""Per-layer ranks: at a rank map {l: b_l} layer l computes W0 x + (alpha/b_l) B_l[:, :b_l] A_l[:b_l] x,
exports and merges exactly, and `allocate` fills a parameter budget with b_l (in_l + out_l) per layer."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bert, tiny_gpt2
from safetensors.torch import load_file
from test_files import make, saved_base, vanilla_peft_outputs  # noqa: F401  (saved_base is a fixture)

import dylora
from dylora import DyLoraConfig

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


def layer_io(model, names, ids):
    """({name: (the layer's input, its output)} for the named layers, the logits) of one forward on `ids`."""
    seen = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda mod, args, out, name=name: seen.__setitem__(name, (args[0], out))) for name in names]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()
    return seen, logits


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_every_layer_at_its_own_rank_is_the_formula(family, ids):
    """nn.Linear (BERT), GPT-2 Conv1D and nn.Embedding, each layer checked on the input it really gets."""
    base, targets = (tiny_bert(), ["query", "value"]) if family == "bert" else (tiny_gpt2(), ["c_attn", "wte"])
    model = make(base, targets, r=4)
    ranks = spread(model)
    assert len(set(ranks.values())) > 1
    dylora.set_layer_ranks(model, ranks)
    assert dylora.get_layer_ranks(model) == ranks
    seen, _ = layer_io(model, ranks, ids)
    assert set(seen) == set(ranks)
    with torch.no_grad():
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


def test_a_layer_at_rank_0_is_switched_off_in_the_forward_the_export_and_the_merge(saved_base, tmp_path,  # noqa: F811
                                                                                   ids):
    """At b_l = 0 layer l computes W0 x; the export leaves it out (exclude_modules) and still loads exactly."""
    base_dir, fresh, targets = saved_base
    model = make(fresh(), targets, r=4)
    ranks = spread(model, 0, 3)
    off = [name for name, b in ranks.items() if b == 0]
    assert off and len(off) < len(ranks)
    dylora.set_layer_ranks(model, ranks)
    assert dylora.get_layer_ranks(model) == ranks
    seen, ours = layer_io(model, off, ids)
    for name, (x, out) in seen.items():
        torch.testing.assert_close(out, model.get_submodule(name).get_base_layer()(x), msg=name)

    path = dylora.export_lora(model, ranks=ranks, path=tmp_path / "plain")
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert sorted(cfg["exclude_modules"]) == sorted(name.removeprefix(PREFIX) for name in off)
    assert not any(key.rpartition(".lora_")[0] in off for key in load_file(path / "adapter_model.safetensors"))
    (got,) = vanilla_peft_outputs(base_dir, [path], ids, tmp_path)
    assert (got - ours).abs().max() <= 1e-5
    merged = dylora.merge(model, ranks=ranks)
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - ours).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="every layer is at rank 0") as e:
        dylora.export_lora(model, ranks=dict.fromkeys(ranks, 0), path=tmp_path / "none")
    one_line(e)
    assert not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match=r"outside \[r_min, r\] = \[1, 4\]"):
        dylora.set_rank(model, 0)  # off is per layer only


def calibration_loss(model, ids):
    """Mean squared distance of the logits to the model's logits now (at r_max): 0 at r everywhere."""
    with torch.no_grad():
        target = model(input_ids=ids).logits
    return lambda m: float(((m(input_ids=ids).logits - target) ** 2).mean())


@pytest.mark.parametrize("method", ["norm", "greedy"])
@pytest.mark.parametrize(("family", "kind", "budget"),
                         [("bert", "rank", 3), ("gpt2", "rank", 2.5), ("gpt2", "params", 2000)])
def test_budget_is_never_exceeded_and_left_with_no_room(method, family, kind, budget, ids):
    """BERT's layers all cost 64 a component, so an average rank of 3 is met exactly; GPT-2's cost 64..160."""
    if family == "bert":
        base, targets = tiny_bert(), ["query", "value"]
    else:
        base, targets = tiny_gpt2(), ["c_attn", "c_proj", "wte"]
    model = make(base, targets, r=4)
    loss_fn = calibration_loss(model, ids)
    dylora.set_layer_ranks(model, previous := spread(model))
    costs = dylora.layer_costs(model)
    allowed = math.floor(budget * sum(costs.values())) if kind == "rank" else budget
    ranks = dylora.allocate(model, budget, method, budget_kind=kind, loss_fn=loss_fn)
    assert dylora.get_layer_ranks(model) == previous  # the model's ranks are restored
    assert set(ranks) == set(costs) and all(1 <= b <= 4 for b in ranks.values())
    spent = sum(b * costs[name] for name, b in ranks.items())
    assert spent <= allowed
    assert all(b == 4 or spent + costs[name] > allowed for name, b in ranks.items())
    if family == "bert":
        assert spent == allowed == 3 * 64 * 4


class TwoPaths(torch.nn.Module):
    """y = a(x[:, :4]) + b(x[:, 4:]): on data with x[:, 4:] = 0 only layer a changes the output."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x[:, :4]) + self.b(x[:, 4:])


def two_paths():
    """TwoPaths with A = B = I in a (10 I as B in b), alpha = r = 4, and the squared distance of its outputs to
    its outputs at r on data where only a matters."""
    torch.manual_seed(0)
    model = dylora.get_dylora_model(TwoPaths(), DyLoraConfig(r=4, lora_alpha=4, target_modules=["a", "b"])).eval()
    with torch.no_grad():
        for name, scale in (("a", 1.0), ("b", 10.0)):
            layer = model.get_submodule(PREFIX + name)
            layer.lora_A["default"].weight.copy_(torch.eye(4))
            layer.lora_B["default"].weight.copy_(scale * torch.eye(4))
        x = torch.cat([torch.randn(64, 4), torch.zeros(64, 4)], dim=1)
        target = model(x)

    def loss_fn(m):
        with torch.no_grad():
            return float(((m(x) - target) ** 2).mean())

    return model, loss_fn


def test_greedy_spends_the_budget_where_the_loss_drops_norm_where_the_update_is():
    """Layer b has the larger update (norm's pick) but sees only zeros on the calibration set (greedy's pick: a).

    A = B = I in a (10 I as B in b), alpha = r = 4: ||dW(b) - dW(4)||^2 is 12, 4, 4/3, 0 for b = 1..4, a loss
    falling with every component of a.
    """
    model, loss_fn = two_paths()
    a, b = PREFIX + "a", PREFIX + "b"
    assert dylora.allocate(model, 2.5, "norm") == {a: 1, b: 4}  # 40 parameters: 2 components + 3 more
    assert dylora.allocate(model, 2.5, "greedy", loss_fn=loss_fn) == {a: 4, b: 1}
    assert dylora.allocate(model, 2.5, "greedy", loss_fn=loss_fn, step=2) == {a: 4, b: 1}
    dylora.set_layer_ranks(model, {a: 4, b: 1})
    assert loss_fn(model) == 0.0


@pytest.mark.parametrize("lazy", [True, False])
def test_with_min_rank_0_allocation_switches_off_the_layers_it_does_not_need(lazy):
    """Average rank 2 on TwoPaths is 4 components: greedy (4 at a time) gives them all to a and switches b off;
    norm gives them to b, the larger update. a alone at rank 1 (scale alpha / 1 = 4) is worse than a off."""
    model, loss_fn = two_paths()
    a, b = PREFIX + "a", PREFIX + "b"
    assert dylora.allocate(model, 2, "norm", min_rank=0) == {a: 0, b: 4}
    assert dylora.allocate(model, 2, "greedy", loss_fn=loss_fn, min_rank=0, lazy=lazy, step=4) == {a: 4, b: 0}
    assert dylora.allocate(model, 0.5, "greedy", loss_fn=loss_fn, min_rank=0, lazy=lazy, step=4) == {a: 0, b: 1}
    assert dylora.allocate(model, 0, "norm", min_rank=0) == {a: 0, b: 0}
    with pytest.raises(ValueError, match=r"min_rank must be 0 .* or r_min = 1, got 2") as e:
        dylora.allocate(model, 2, min_rank=2)
    one_line(e)
    with pytest.raises(ValueError, match=r"feasible range \[min_rank, r\] = \[0, 4\]"):
        dylora.allocate(model, -0.5, min_rank=0)


@pytest.mark.parametrize("budget", [1.5, 2.5, 3])
def test_lazy_greedy_meets_the_budget_like_exact_greedy(budget, ids):
    """Both fill the budget with no room left; on this model they pick the same ranks."""
    model = make(tiny_bert(), ["query", "value"], r=4)
    loss_fn = calibration_loss(model, ids)
    costs = dylora.layer_costs(model)
    calls = {"n": 0}

    def counted(m):
        calls["n"] += 1
        return loss_fn(m)

    lazy = dylora.allocate(model, budget, "greedy", loss_fn=counted, min_rank=0)
    n_lazy, calls["n"] = calls["n"], 0
    exact = dylora.allocate(model, budget, "greedy", loss_fn=counted, min_rank=0, lazy=False)
    for ranks in (lazy, exact):
        spent = sum(b * costs[name] for name, b in ranks.items())
        assert spent == math.floor(budget * sum(costs.values()))
    assert n_lazy < calls["n"]


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
        with pytest.raises(ValueError, match=rf"{query0}: rank .* is outside \[r_min, r\] = \[2, 8\]") as e:
            dylora.set_layer_ranks(model, {query0: bad})
        one_line(e)
    with pytest.raises(ValueError, match=r"\[2, 8\]"):
        dylora.export_lora(model, ranks={query0: 1}, path="unused")
    with pytest.raises(ValueError, match=r"\[2, 8\]"):
        dylora.merge(model, ranks={query0: 9})
    with pytest.raises(ValueError, match="either rank .* or ranks"):
        dylora.export_lora(model, 2, "unused", ranks={query0: 2})
    assert set(dylora.get_layer_ranks(model).values()) == {8}  # nothing was set


def test_bad_budgets_and_methods():
    model = make(tiny_bert(), ["query", "value"], r=8, r_min=2)
    per_rank = sum(dylora.layer_costs(model).values())
    for budget in (1.5, 8.5):
        with pytest.raises(ValueError, match=r"feasible range \[r_min, r\] = \[2, 8\]") as e:
            dylora.allocate(model, budget)
        one_line(e)
    for budget in (2 * per_rank - 1, 8 * per_rank + 1):
        with pytest.raises(ValueError, match=rf"feasible range \[{2 * per_rank}, {8 * per_rank}\]") as e:
            dylora.allocate(model, budget, budget_kind="params")
        one_line(e)
    with pytest.raises(ValueError, match="method must be one of norm, greedy"):
        dylora.allocate(model, 4, "svd")
    with pytest.raises(ValueError, match="needs loss_fn"):
        dylora.allocate(model, 4, "greedy")
    with pytest.raises(ValueError, match="budget_kind must be one of rank, params"):
        dylora.allocate(model, 4, budget_kind="flops")
    assert dylora.allocate(model, 8) == dict.fromkeys(dylora.get_layer_ranks(model), 8)
    assert dylora.allocate(model, 2 * per_rank, budget_kind="params") == dict.fromkeys(dylora.get_layer_ranks(model), 2)


def test_a_merged_adapter_keeps_its_ranks_per_layer_and_in_greedy_allocation(ids):
    """Merged, the output is fixed at the merged ranks: a per-layer change and greedy allocation are refused
    with one line; setting a layer to the rank it was merged at is no change and is allowed."""
    model = make(tiny_bert(), ["query", "value"], r=4)
    query0 = PREFIX + "bert.encoder.layer.0.attention.self.query"
    dylora.set_layer_ranks(model, {query0: 2})
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"merged into the base weights \(.*value\).*unmerge") as e:
        dylora.set_layer_ranks(model, {PREFIX + "bert.encoder.layer.1.attention.self.value": 3})
    one_line(e)
    dylora.set_layer_ranks(model, {query0: 2})
    with pytest.raises(ValueError, match="merged into the base weights") as e:
        dylora.allocate(model, 2, "greedy", loss_fn=calibration_loss(model, ids))
    one_line(e)
    model.unmerge_adapter()
    assert dylora.get_layer_ranks(model)[query0] == 2
    dylora.set_layer_ranks(model, {query0: 3})


def test_a_plain_lora_model_has_no_layer_ranks():
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query"]))
    for call in (dylora.get_layer_ranks, lambda m: dylora.allocate(m, 2)):
        with pytest.raises(ValueError, match="no DyLoRA adapter") as e:
            call(lora)
        one_line(e)


def test_pattern_keys_match_one_module_only_in_peft():
    """PEFT takes the first key k with re.match(rf"(.*\\.)?({k})$", name): plain paths would be ambiguous."""
    from peft.utils.other import get_pattern_key

    from dylora.model import pattern_key

    names = ["model.enc.layer.1.q", "dec.model.enc.layer.1.q", "model.enc.layer_1.q"]
    keys = [pattern_key(PREFIX + name) for name in names]
    assert [get_pattern_key(keys, name) for name in names] == keys
    assert [get_pattern_key(names, name) for name in names] == [names[0]] * 3  # what plain paths would do
