"""`dylora resize`: the SVD cut of any PEFT LoRA, checked against a full float64 SVD of each layer's update."""

import json
import math

import pytest
import torch
from conftest import randomise_lora, tiny_gpt2
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from test_files import saved_base, vanilla_peft_outputs  # noqa: F401 (saved_base is a fixture)

import dylora
from dylora.app.cli import main
from dylora.resizing import resize_state_dict


class Net(torch.nn.Module):
    """Linear layers of different shapes, a Conv2d (3x3 and 1x1) and an Embedding: every LoRA layer kind."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(30, 12)
        self.a = torch.nn.Linear(12, 20)
        self.b = torch.nn.Linear(20, 9)
        self.c = torch.nn.Linear(9, 16)
        self.conv = torch.nn.Conv2d(3, 10, 3)
        self.point = torch.nn.Conv2d(10, 7, 1)


KINDS = {  # name: (base factory, LoraConfig kwargs)
    "linear": (Net, dict(r=6, lora_alpha=8, target_modules=["a", "b", "c"], rank_pattern={"b": 4},
                         alpha_pattern={"c": 3.0})),
    "linear-rslora": (Net, dict(r=5, lora_alpha=6, target_modules=["a", "c"], use_rslora=True,
                                rank_pattern={"^c": 3})),
    "conv2d": (Net, dict(r=5, lora_alpha=4, target_modules=["conv", "point"])),
    "embedding": (Net, dict(r=6, lora_alpha=12, target_modules=["emb"])),
    "gpt2-conv1d": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
}


def save_adapter(kind, path, seed=1, dtype=torch.float64):
    """A PEFT LoRA of `kind` with random A and B, saved to `path`; returns the PEFT model."""
    base, kwargs = KINDS[kind]
    model = get_peft_model(base().to(dtype), LoraConfig(**kwargs))
    randomise_lora(model, seed=seed)
    model.save_pretrained(path)
    return model.eval()


def deltas(model):
    """{module: PEFT's own delta weight c B A (float64, 2-D)} of every LoRA layer of a PEFT model."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.r:
            d = module.get_delta_weight("default").detach().double()
            out[name.removeprefix("base_model.model.")] = d.reshape(d.shape[0], -1)
    return out


def svd_cut(dW, b):
    """The reference: the best rank-b approximation of dW from a full float64 SVD."""
    u, s, vh = torch.linalg.svd(dW.double(), full_matrices=False)
    return (u[:, :b] * s[:b]) @ vh[:b]


def spectrum(dW):
    return torch.linalg.svdvals(dW.double())


def layer_ranks(model):
    return {name.removeprefix("base_model.model."): m.r["default"] for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and "default" in m.r}


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_cut_is_the_full_svd_reference_at_every_rank(kind, tmp_path):
    model = save_adapter(kind, tmp_path / "in")
    ref, r_of = deltas(model), layer_ranks(model)
    base = KINDS[kind][0]
    for b in range(1, max(r_of.values()) + 1):
        out = dylora.resize(tmp_path / "in", tmp_path / f"r{b}", rank=b)
        loaded = PeftModel.from_pretrained(base().double(), out)
        assert layer_ranks(loaded) == {m: min(b, r) for m, r in r_of.items()}
        got = deltas(loaded)
        for module, dW in ref.items():
            want = svd_cut(dW, min(b, r_of[module]))
            assert (got[module] - want).abs().max() <= 1e-10 * dW.abs().max(), (module, b)
            if b >= r_of[module]:  # a layer cut at its own rank keeps its whole update
                assert (got[module] - dW).abs().max() <= 1e-10 * dW.abs().max()


def test_the_state_dict_function_is_pure_and_keeps_the_input_settings(tmp_path):
    save_adapter("linear", tmp_path / "in")
    config = json.loads((tmp_path / "in" / "adapter_config.json").read_text())
    state = load_file(tmp_path / "in" / "adapter_model.safetensors")
    before = {k: t.clone() for k, t in state.items()}
    new, new_state, ranks = resize_state_dict(config, state, rank=3)
    assert ranks == {"a": 3, "b": 3, "c": 3}
    assert (new["r"], new["rank_pattern"], new["alpha_pattern"], new["lora_alpha"]) == (3, {}, {"c": 3.0}, 8)
    assert config["r"] == 6 and all(torch.equal(state[k], t) for k, t in before.items())
    assert {k: tuple(t.shape) for k, t in new_state.items()} == {
        "base_model.model.a.lora_A.weight": (3, 12), "base_model.model.a.lora_B.weight": (20, 3),
        "base_model.model.b.lora_A.weight": (3, 20), "base_model.model.b.lora_B.weight": (9, 3),
        "base_model.model.c.lora_A.weight": (3, 9), "base_model.model.c.lora_B.weight": (16, 3)}
    assert all(t.dtype == torch.float64 for t in new_state.values())


def test_vanilla_peft_loads_the_output_and_equals_the_merged_svd_reference(saved_base, tmp_path, ids):  # noqa: F811
    """In a separate process (dylora not imported), PEFT runs the resized adapters; the reference is the
    base model with each layer's SVD cut (from a full SVD) added to its weight."""
    base_dir, fresh, targets = saved_base
    extra = {"modules_to_save": ["classifier"]} if "bert" in str(base_dir) else {}
    model = get_peft_model(fresh(), LoraConfig(r=6, lora_alpha=12, target_modules=targets, **extra))
    randomise_lora(model, seed=3)
    if extra:  # a trained head rides along untouched
        with torch.no_grad():
            model.base_model.model.classifier.modules_to_save["default"].weight.mul_(-2)
    model.save_pretrained(tmp_path / "in")
    runs = {"r2": dict(rank=2), "fro": dict(sv_fro=0.8), "params": dict(params=1200)}
    ranks = {}
    for name, kw in runs.items():
        cfg, _, ranks[name] = resize_state_dict(json.loads((tmp_path / "in" / "adapter_config.json").read_text()),
                                                load_file(tmp_path / "in" / "adapter_model.safetensors"), **kw)
        dylora.resize(tmp_path / "in", tmp_path / name, **kw)
    assert any(len(set(ranks[n].values())) > 1 for n in ("fro", "params"))  # rank_pattern is exercised
    outs = vanilla_peft_outputs(base_dir, [tmp_path / n for n in runs], ids, tmp_path)
    ref = deltas(model)
    for name, got in zip(runs, outs, strict=True):
        merged = fresh()
        modules = dict(merged.named_modules())
        with torch.no_grad():
            for module, dW in ref.items():
                w = modules[module].weight
                w += svd_cut(dW, ranks[name][module]).reshape(w.shape).to(w.dtype)
            if extra:
                merged.classifier.weight.copy_(model.base_model.model.classifier.modules_to_save["default"].weight)
            want = merged(input_ids=ids).logits
        assert (got - want).abs().max() <= 1e-4, name


def fractions(S):
    """sqrt(sum_{i<b} S_i^2 / sum S_i^2) for b = 1 .. len(S)."""
    e = torch.cumsum(S.double() ** 2, 0)
    return torch.sqrt(e / e[-1])


@pytest.fixture
def spectra(tmp_path):
    """(adapter dir, {module: its r_l reference singular values}, {module: in + out}) of a 3-layer adapter."""
    model = save_adapter("linear", tmp_path / "in")
    r_of = layer_ranks(model)
    return tmp_path / "in", {m: spectrum(d)[:r_of[m]] for m, d in deltas(model).items()}, \
        {m: d.shape[0] + d.shape[1] for m, d in deltas(model).items()}


@pytest.mark.parametrize("F", [0.3, 0.6, 0.85, 0.95, 0.999, 1.0])
def test_sv_fro_keeps_the_smallest_rank_holding_fraction_F_in_every_layer(spectra, tmp_path, F):
    path, S, _ = spectra
    out = dylora.resize(path, tmp_path / "out", sv_fro=F)
    _, _, ranks = resize_state_dict(json.loads((path / "adapter_config.json").read_text()),
                                    load_file(path / "adapter_model.safetensors"), sv_fro=F)
    for module, s in S.items():
        f = fractions(s)
        assert (f[:-1] - F).abs().min() > 1e-9  # no layer sits on the boundary: the answer is unambiguous
        b = ranks[module]
        assert f[b - 1] >= F and (b == 1 or f[b - 2] < F), (module, b, f.tolist())
    assert json.loads((out / "adapter_config.json").read_text())["r"] == max(ranks.values())


@pytest.mark.parametrize("X", [1.0, 1.5, 3.0, 10.0, math.inf])
def test_sv_ratio_keeps_every_singular_value_above_the_largest_over_X(spectra, X):
    path, S, _ = spectra
    _, _, ranks = resize_state_dict(json.loads((path / "adapter_config.json").read_text()),
                                    load_file(path / "adapter_model.safetensors"), sv_ratio=X)
    for module, s in S.items():
        if X < math.inf:
            assert (s[1:] - s[0] / X).abs().min() > 1e-9 * s[0]
        assert ranks[module] == int((s >= s[0] / X).sum()), module


@pytest.mark.parametrize("N", ["floor", 700, 1500, 3000, "all"])
def test_params_is_one_global_threshold_on_gain_per_parameter_within_the_budget(spectra, N):
    path, S, cost = spectra
    floor, full = sum(cost.values()), sum(len(s) * cost[m] for m, s in S.items())
    N = {"floor": floor, "all": full}.get(N, N)
    _, state, ranks = resize_state_dict(json.loads((path / "adapter_config.json").read_text()),
                                        load_file(path / "adapter_model.safetensors"), params=N)
    used = sum(b * cost[m] for m, b in ranks.items())
    assert used == sum(t.numel() for k, t in state.items() if ".lora_" in k) <= N
    assert all(b >= 1 for b in ranks.values())
    kept = [float(S[m][i]) ** 2 / cost[m] for m, b in ranks.items() for i in range(1, b)]
    dropped = [(float(S[m][i]) ** 2 / cost[m], m) for m, b in ranks.items() for i in range(b, len(S[m]))]
    if kept and dropped:
        assert min(kept) >= max(g for g, _ in dropped)  # one threshold: every kept gain beats every dropped one
    if dropped:  # the next component in the order did not fit
        assert cost[max(dropped)[1]] > N - used
    if N == floor:
        assert set(ranks.values()) == {1}
    if N == full:
        assert ranks == {m: len(s) for m, s in S.items()}


def test_an_all_zero_layer_gets_rank_one_with_zero_weights(tmp_path):
    model = save_adapter("linear", tmp_path / "in")
    state = load_file(tmp_path / "in" / "adapter_model.safetensors")
    state["base_model.model.b.lora_B.weight"].zero_()  # PEFT's own init: B = 0
    save_file(state, tmp_path / "in" / "adapter_model.safetensors")
    del model
    config = json.loads((tmp_path / "in" / "adapter_config.json").read_text())
    for kw in (dict(sv_fro=0.9), dict(sv_ratio=2.0), dict(params=10_000)):
        _, new, ranks = resize_state_dict(config, state, **kw)
        assert ranks["b"] == 1 and ranks["a"] > 1, kw
        assert not new["base_model.model.b.lora_A.weight"].any() and not new["base_model.model.b.lora_B.weight"].any()


def test_a_dylora_adapter_is_cut_at_r_max_with_its_sidecar_rank_scaling(tmp_path):
    model = dylora.get_dylora_model(Net(), dylora.DyLoraConfig(r=6, lora_alpha=4, target_modules=["a", "b"],
                                                             rank_scaling="alpha/sqrt(b)"))
    randomise_lora(model, seed=2)
    model.save_pretrained(tmp_path / "dy")
    state = load_file(tmp_path / "dy" / "adapter_model.safetensors")
    out = dylora.resize(tmp_path / "dy", tmp_path / "r2", rank=2)
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"] is True
    got = deltas(PeftModel.from_pretrained(Net(), out))
    for module in ("a", "b"):
        A, B = (state[f"base_model.model.{module}.lora_{x}.weight"].double() for x in "AB")
        want = svd_cut(4 / math.sqrt(6) * B @ A, 2)  # c(r_max) = lora_alpha / sqrt(r) under "alpha/sqrt(b)"
        assert (got[module] - want).abs().max() <= 1e-5 * want.abs().max()


def test_the_model_card_names_source_method_ranks_and_kept_energy(tmp_path):
    save_adapter("linear", tmp_path / "in")
    out = dylora.resize(tmp_path / "in", tmp_path / "out", sv_fro=0.9)
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and str(tmp_path / "in") in card
    assert "--sv-fro 0.9" in card and "b_l from" in card and "of the update's Frobenius norm" in card
    assert float(card.split("at least ")[1].split()[0]) >= 0.9  # sv_fro keeps >= F in every layer
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


# --- refusals: one line, a ValueError, nothing written ---------------------------------------------------

def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_state(path, fn):
    state = load_file(path / "adapter_model.safetensors")
    fn(state)
    save_file(state, path / "adapter_model.safetensors")


def _nan(state):
    state["base_model.model.a.lora_A.weight"][0, 0] = float("nan")


def _misfit(state):
    state["base_model.model.a.lora_B.weight"] = torch.zeros(20, 5, dtype=torch.float64)


def _magnitude(state):
    state["base_model.model.a.lora_magnitude_vector"] = torch.ones(20, dtype=torch.float64)


def _orphan(state):
    del state["base_model.model.a.lora_A.weight"]


BROKEN = {  # name: (how to break a good adapter at `path`, resize kwargs, error match)
    "rank 0": (None, dict(rank=0), r"rank 0 is outside \[r_min, r\] = \[1, 6\]"),
    "rank above r": (None, dict(rank=7), r"rank 7 is outside"),
    "no method": (None, {}, "exactly one of rank, sv_fro"),
    "two methods": (None, dict(rank=2, sv_fro=0.5), "exactly one of .* got rank, sv_fro"),
    "sv_fro 0": (None, dict(sv_fro=0.0), r"sv_fro must lie in \(0, 1\]"),
    "sv_fro above 1": (None, dict(sv_fro=1.5), r"sv_fro must lie in \(0, 1\]"),
    "sv_ratio below 1": (None, dict(sv_ratio=0.5), "sv_ratio must be a number >= 1"),
    "sv_ratio nan": (None, dict(sv_ratio=float("nan")), "sv_ratio must be a number >= 1"),
    "params too small": (None, dict(params=80), "params 80 is too small: rank 1 in every layer takes 86"),
    "no adapter_config": (lambda p: (p / "adapter_config.json").unlink(), dict(rank=2), "has no adapter_config.json"),
    "not LORA": (lambda p: _edit_config(p, peft_type="IA3"), dict(rank=2), "peft_type 'IA3'"),
    "DoRA config": (lambda p: _edit_config(p, use_dora=True), dict(rank=2), "not a plain LoRA .use_dora=True"),
    "DoRA weights": (lambda p: _edit_state(p, _magnitude), dict(rank=2), "a DoRA adapter"),
    "lora_bias": (lambda p: _edit_config(p, lora_bias=True), dict(rank=2), "not a plain LoRA .lora_bias=True"),
    "PiSSA": (lambda p: _edit_config(p, init_lora_weights="pissa_niter_4"), dict(rank=2), "init_lora_weights"),
    "bad JSON": (lambda p: (p / "adapter_config.json").write_text("{r: 1"), dict(rank=2), "corrupted adapter file"),
    "JSON not an object": (lambda p: (p / "adapter_config.json").write_text("[1]"), dict(rank=2), "expected a JSON"),
    "bad safetensors": (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x10\x00junk"), dict(rank=2),
                        "corrupted adapter file"),
    "no weights": (lambda p: (p / "adapter_model.safetensors").unlink(), dict(rank=2), "has no adapter_model"),
    "shapes misfit": (lambda p: _edit_state(p, _misfit), dict(rank=2), "shapes of a's lora_A .6, 12. and lora_B"),
    "rank differs from config": (lambda p: _edit_config(p, r=5), dict(rank=2), "a has rank 6 in its weights but 5"),
    "lora_B alone": (lambda p: _edit_state(p, _orphan), dict(rank=2), "has no matching lora_A"),
    "non-finite": (lambda p: _edit_state(p, _nan), dict(rank=2), "non-finite values"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_bad_input_is_refused_in_one_line_and_nothing_is_written(case, tmp_path):
    save_adapter("linear", tmp_path / "in")
    breaker, kw, match = BROKEN[case]
    if breaker:
        breaker(tmp_path / "in")
    with pytest.raises(ValueError, match=match) as err:
        dylora.resize(tmp_path / "in", tmp_path / "out", **kw)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_a_real_dora_adapter_and_an_existing_out_are_refused(tmp_path):
    model = get_peft_model(Net(), LoraConfig(r=4, target_modules=["a"], use_dora=True))
    model.save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="use_dora=True"):
        dylora.resize(tmp_path / "dora", tmp_path / "out", rank=2)
    save_adapter("linear", tmp_path / "in")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        dylora.resize(tmp_path / "in", tmp_path / "out", rank=2)
    assert (tmp_path / "out" / "adapter_config.json").read_text() == "{}"
    dylora.resize(tmp_path / "in", tmp_path / "out", rank=2, overwrite=True)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 2


def test_cli_resize_writes_the_adapter_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    save_adapter("linear", tmp_path / "in")
    assert main(["resize", str(tmp_path / "in"), "--sv-ratio", "2", "--out", str(tmp_path / "out")]) == 0
    assert "wrote a plain PEFT LoRA" in capsys.readouterr().out
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Command" in card and "--sv-ratio 2 --out" in card
    new = ["--out", str(tmp_path / "new")]
    for args, match in (([str(tmp_path / "in"), "--rank", "9", *new], "rank 9 is outside"),
                        ([str(tmp_path / "in"), "--rank", "2", "--params", "900", *new], "exactly one"),
                        ([str(tmp_path / "in"), "--sv-fro", "2", *new], "sv_fro must lie in"),
                        ([str(tmp_path / "in"), "--rank", "x", *new], "Invalid value"),
                        ([str(tmp_path / "in"), *new], "exactly one"),
                        ([str(tmp_path / "in"), "--rank", "2"], "Missing option '--out'"),
                        ([str(tmp_path / "missing"), "--rank", "2", *new], "has no adapter_config.json"),
                        ([str(tmp_path / "in"), "--rank", "2", "--out", str(tmp_path / "out")], "exists; pass")):
        code = main(["resize", *args])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("dylora: error:") and err.count("\n") == 1 and match in err, (args, err)
    assert not (tmp_path / "new").exists()


def test_the_cut_runs_on_one_thread_and_gives_the_thread_count_back(tmp_path, monkeypatch):
    """The r x r LAPACK calls run single-threaded (threads only cost synchronisation at that size)."""
    import dylora.resizing as resizing

    seen = []
    real = resizing.svd_factors
    monkeypatch.setattr(resizing, "svd_factors", lambda *a: (seen.append(torch.get_num_threads()), real(*a))[1])
    save_adapter("linear", tmp_path / "in")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        dylora.resize(tmp_path / "in", tmp_path / "out", rank=2)
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
