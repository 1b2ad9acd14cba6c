"""DyLoraConfig: a LoraConfig whose r is r_max, with validated DyLoRA fields."""

import pytest
from peft import LoraConfig

from dylora import DyLoraConfig


def test_is_a_lora_config_with_paper_defaults():
    c = DyLoraConfig(r=8, lora_alpha=16, target_modules=["query"])
    assert isinstance(c, LoraConfig)
    assert (c.r, c.r_min, c.rank_distribution, c.geometric_p, c.frozen) == (8, 1, "uniform", 0.15, False)
    assert c.peft_type.value == "LORA"


def test_to_dict_is_plain_lora_and_sidecar_holds_dylora_fields():
    c = DyLoraConfig(r=8, r_min=2, frozen=True, target_modules=["query"])
    assert "r_min" not in c.to_dict() and "frozen" not in c.to_dict()
    assert c.dylora_dict() == {"r_min": 2, "rank_distribution": "uniform", "geometric_p": 0.15,
                               "frozen": True, "seed": 0, "recipe": "paper", "sandwich_k": 1, "distill": False,
                               "distill_weight": 0.5, "rank_scaling": "alpha/b"}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r="),
        ({"r_min": 0}, "r_min="),
        ({"r": 4, "r_min": 5}, "r_min="),
        ({"rank_distribution": "zipf"}, "rank_distribution="),
        ({"geometric_p": 0.0}, "geometric_p="),
        ({"geometric_p": 1.5}, "geometric_p="),
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
