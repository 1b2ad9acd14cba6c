"""DyLoraConfig: a LoraConfig whose r is r_max, with validated DyLoRA fields."""

from dataclasses import fields

import pytest
import torch
from conftest import randomise_lora, tiny_bert, tiny_llama
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import config as lc

import dylora
from dylora import DyLoraConfig
from dylora import config as dyconfig
from dylora.config import REFUSED_LORA_OPTIONS, SUPPORTED_LORA_FIELDS


def test_is_a_lora_config_with_paper_defaults():
    c = DyLoraConfig(r=8, lora_alpha=16, target_modules=["query"])
    assert isinstance(c, LoraConfig)
    assert (c.r, c.r_min, c.rank_distribution, c.geometric_p, c.frozen) == (8, 1, "uniform", 0.15, False)
    assert c.peft_type.value == "LORA"


def test_to_dict_is_plain_lora_and_sidecar_holds_dylora_fields():
    c = DyLoraConfig(r=8, r_min=2, frozen=True, target_modules=["query"])
    assert "r_min" not in c.to_dict() and "frozen" not in c.to_dict()
    assert c.dylora_dict() == {"r_min": 2, "rank_distribution": "uniform", "geometric_p": 0.15,
                               "top_share": 0.0, "frozen": True, "seed": 0, "recipe": "paper", "sandwich_k": 1,
                               "distill": False,
                               "distill_weight": 0.5, "distill_every": 1, "distill_fraction": 1.0,
                               "rank_scaling": "alpha/b",
                               "rebasis_every": 0, "rebasis_state": "reset", "lora_first": 0.0}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r="),
        ({"r_min": 0}, "r_min="),
        ({"r": 4, "r_min": 5}, "r_min="),
        ({"rank_distribution": "zipf"}, "rank_distribution="),
        ({"geometric_p": 0.0}, "geometric_p="),
        ({"geometric_p": 1.5}, "geometric_p="),
        ({"top_share": 1.0}, "top_share="), ({"top_share": -0.1}, "top_share="), ({"top_share": True}, "top_share="),
        ({"use_rslora": True}, "use_rslora="),
        ({"use_dora": True}, "use_dora="),
        ({"lora_bias": True}, "lora_bias="),
        ({"rank_pattern": {"query": 2}}, "rank_pattern="),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        DyLoraConfig(target_modules=["query"], **kwargs)
    assert "\n" not in str(err.value)


def test_error_names_the_valid_range():
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        DyLoraConfig(r=4, r_min=5, target_modules=["query"])
    with pytest.raises(ValueError, match="uniform, geometric"):
        DyLoraConfig(rank_distribution="zipf", target_modules=["query"])


# ---------------------------------------------------------------- PEFT's LoRA options (issue #20, item 2)

def _refused_examples() -> dict[str, list]:
    """A set value for every refused option (several for init_lora_weights, one per refused method)."""
    return {
        "use_rslora": [True], "use_dora": [True], "use_qalora": [True], "velora_config": [lc.VeloraConfig()],
        "alora_invocation_tokens": [[1, 2]], "monteclora_config": [lc.MontecloraConfig()],
        "use_bdlora": [lc.BdLoraConfig(target_modules_bd_a=["query"], target_modules_bd_b=["value"], nblocks=2)],
        "arrow_config": [lc.ArrowConfig()], "kasa_config": [lc.KasaConfig()], "lora_bias": [True],
        "rank_pattern": [{"query": 2}], "megatron_config": [{"num_layers": 2}], "target_parameters": [["w"]],
        "init_lora_weights": ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga", "orthogonal", "eva",
                              "mica", "Gaussian"],
        "loftq_config": [lc.LoftQConfig()], "eva_config": [lc.EvaConfig()], "corda_config": [lc.CordaConfig()],
        "lora_ga_config": [lc.LoraGAConfig()],
    }


def test_every_peft_lora_field_is_supported_or_refused():
    """A PEFT upgrade that adds a LoraConfig field fails here until the field is sorted in dylora.config."""
    peft_fields = {f.name for f in fields(LoraConfig)}
    assert not SUPPORTED_LORA_FIELDS & set(REFUSED_LORA_OPTIONS)
    assert peft_fields == SUPPORTED_LORA_FIELDS | set(REFUSED_LORA_OPTIONS)
    assert set(_refused_examples()) == set(REFUSED_LORA_OPTIONS)  # each refusal is tested below


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, vs in _refused_examples().items() for v in vs])
def test_each_refused_lora_option_is_one_line_naming_it(name, value):
    """KaSA, BD-LoRA, ... were taken, then replaced by DyLoRA's variant or broken at merge (issue #20)."""
    with pytest.raises(ValueError, match=f"^DyLoraConfig.{name}=") as err:
        DyLoraConfig(r=4, target_modules=["query"], **{name: value})
    assert "\n" not in str(err.value)


def test_a_lora_field_dylora_has_not_sorted_is_refused_when_set(monkeypatch):
    """What a field added by a PEFT upgrade meets: refused when set, ignored at its default."""
    monkeypatch.setattr(dyconfig, "SUPPORTED_LORA_FIELDS", dyconfig.SUPPORTED_LORA_FIELDS - {"layer_replication"})
    DyLoraConfig(r=4, target_modules=["query"])
    with pytest.raises(ValueError, match="layer_replication=.*does not implement"):
        DyLoraConfig(r=4, target_modules=["query"], layer_replication=[(0, 1)])


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_supported_inits_leave_the_base_alone_at_every_rank(init, ids):
    """B starts at zero with True and 'gaussian', so the model is W0 at every rank b (False: both random)."""

    base = tiny_bert()
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = dylora.get_dylora_model(base, DyLoraConfig(r=4, target_modules=["query"], init_lora_weights=init))
    for b in range(1, 5):
        dylora.set_rank(model, b)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, expected)


def test_orthogonal_init_is_refused_because_it_cancels_at_rank_r_only():
    """PEFT's orthogonal init: B A = 0 at rank r, but B[:, :b] A[:b] != 0 below it (the reason for refusing)."""
    model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query"], init_lora_weights="orthogonal"))
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert (B @ A).abs().max() < 1e-6
    assert (B[:, :2] @ A[:2]).abs().max() > 1e-4


@pytest.mark.parametrize("kwargs", [{"trainable_token_indices": [3, 5]}, {"init_lora_weights": False},
                                    {"bias": "lora_only"}, {"alpha_pattern": {"value": 4}}])
def test_supported_lora_options_keep_the_rank_formula(kwargs, ids):
    """Options DyLoRA takes still give a model whose rank b changes the output, and train at b."""
    model = dylora.get_dylora_model(tiny_bert(), DyLoraConfig(r=4, target_modules=["query", "value"], **kwargs))
    randomise_lora(model)
    outs = []
    for b in (1, 4):
        dylora.set_rank(model, b)
        with torch.no_grad():
            outs.append(model(input_ids=ids).logits)
    assert not torch.allclose(outs[0], outs[1])
    model.train()
    dylora.set_rank(model, 2)
    model(input_ids=ids).logits.sum().backward()
    A = model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_A["default"].weight
    assert A.grad[:2].abs().sum() > 0 and torch.count_nonzero(A.grad[2:]) == 0


def test_layer_replication_gives_each_replica_its_dylora_layer():
    """PEFT's layer_replication (layers 0, 1, 1 of a 2-layer llama) gets a DyLoRA layer in every replica."""
    model = dylora.get_dylora_model(tiny_llama(), DyLoraConfig(r=4, target_modules=["q_proj"],
                                                                layer_replication=[(0, 2), (1, 2)]))
    assert len(dylora.get_layer_ranks(model)) == 3
    dylora.set_rank(model, 2)
    assert set(dylora.get_layer_ranks(model).values()) == {2}
    ids = torch.randint(0, 120, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


# ---------------------------------------------------------------- sandwich_k (issue #20, item 6)

def test_sandwich_k_is_bounded_by_the_ranks_to_draw():
    with pytest.raises(ValueError, match=r"sandwich_k=1000000 is invalid: sandwich_k must lie in \[0, 2\]") as err:
        DyLoraConfig(r=4, target_modules=["query"], recipe="sandwich", sandwich_k=1_000_000)
    assert "\n" not in str(err.value)
    assert DyLoraConfig(r=4, target_modules=["query"], recipe="sandwich", sandwich_k=2).sandwich_k == 2
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        DyLoraConfig(r=8, r_min=2, target_modules=["query"], recipe="sandwich", sandwich_k=6)
    # r = r_min + 1: no rank between; the default 1 draws nothing and is kept
    assert DyLoraConfig(r=2, target_modules=["query"], recipe="sandwich").sandwich_k == 1
