"""Model cards: every saved or exported adapter has a README.md in PEFT's format, saying what rank it holds."""

from conftest import tiny_llama
from huggingface_hub import ModelCard
from peft import PeftModel

import dylora
from dylora import DyLoraConfig
from dylora.cards import write_card
from dylora.sweep import SweepRow


def model():
    return dylora.get_dylora_model(tiny_llama(), DyLoraConfig(r=4, r_min=2, lora_alpha=8, target_modules=["q_proj"]))


def test_save_writes_a_dylora_card_over_peft_s(tmp_path):
    dylora.save(model(), tmp_path / "full")
    card = ModelCard.load(tmp_path / "full" / "README.md")
    assert card.data.library_name == "peft"
    assert {"dylora", "lora", "peft", "transformers"} <= set(card.data.tags)  # PEFT's tags kept
    assert card.data.base_model is None  # a model built from a config has none; PEFT's '' is dropped
    assert "every rank b in [r_min, r_max] = [2, 4]" in card.text and "`q_proj`" in card.text
    assert "More Information Needed" not in card.text


def test_export_lora_card_names_the_rank_and_loads_as_peft(tmp_path):
    m = model()
    dylora.export_lora(m, 3, tmp_path / "b3")
    card = ModelCard.load(tmp_path / "b3" / "README.md")
    assert "rank: 3 of r_max = 4" in card.text and "scale at rank 3: 2.66667" in card.text
    assert "PeftModel.from_pretrained" in card.text
    PeftModel.from_pretrained(tiny_llama(), tmp_path / "b3")  # the card does not disturb PEFT
    dylora.export_lora(m, 3, tmp_path / "nocard", card=False)
    assert not (tmp_path / "nocard" / "README.md").exists()


def test_write_card_adds_sweep_command_and_base_model(tmp_path):
    m = model()
    dylora.export_lora(m, 2, tmp_path / "b2")
    sweep = [SweepRow(2, {"accuracy": 0.81, "loss": 0.4321}, 1000), SweepRow(4, {"accuracy": 0.84}, 2000)]
    write_card(tmp_path / "b2", m.peft_config["default"], rank=2, sweep=sweep, base_model="org/tiny-llama",
               command=["dylora", "export", "runs/x", "--rank", "2"], training={"steps": 200})
    card = ModelCard.load(tmp_path / "b2" / "README.md")
    assert card.data.base_model == "org/tiny-llama" and "base_model:adapter:org/tiny-llama" in card.data.tags
    assert "| rank | accuracy | loss | params |" in card.text and "| 2 | 0.81 | 0.4321 | 1000 |" in card.text
    assert "| 4 | 0.84 |  | 2000 |" in card.text
    assert "dylora export runs/x --rank 2" in card.text and "- steps: 200" in card.text
