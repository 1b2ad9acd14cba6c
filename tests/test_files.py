"""Merge, save, load and export: any rank b leaves as a plain PEFT LoRA that vanilla PEFT loads exactly."""

import json

import pytest
import torch
from conftest import randomise_lora, tiny_bert, tiny_gpt2
from safetensors.torch import load_file, save_file
from tiny import ask

import dylora
from dylora import DyLoraConfig

# plain PEFT loads each adapter and runs it, in a process that never imports dylora (`tiny.ask`)
VANILLA = """
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from peft import PeftModel

def handle(base_dir, io, adapter_dirs):
    auto = AutoModelForCausalLM if "causal" in base_dir else AutoModelForSequenceClassification
    outs = {}
    for i, adapter_dir in enumerate(adapter_dirs):
        model = PeftModel.from_pretrained(auto.from_pretrained(base_dir), adapter_dir).eval()
        with torch.no_grad():
            outs[str(i)] = model(input_ids=load_file(io)["ids"]).logits.contiguous()
    save_file(outs, io + ".out")
"""


def vanilla_peft_outputs(base_dir, adapter_dirs, ids, tmp_path):
    """Load each adapter with plain PEFT in a separate process (dylora never imported there) and run it."""
    io = str(tmp_path / "io.safetensors")
    save_file({"ids": ids}, io)
    ask(VANILLA, str(base_dir), io, [str(d) for d in adapter_dirs])
    outs = load_file(io + ".out")
    return [outs[str(i)] for i in range(len(adapter_dirs))]


@pytest.fixture(params=["bert", "gpt2"])
def saved_base(request, tmp_path):
    """(base dir, fresh-base factory, targets): a tiny model written to disk so another process loads it."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if request.param == "bert":
        path, auto, targets = tmp_path / "bert-seqcls", AutoModelForSequenceClassification, ["query", "value"]
        tiny_bert().save_pretrained(path)
    else:
        path, auto, targets = tmp_path / "gpt2-causal", AutoModelForCausalLM, ["c_attn", "c_proj"]
        tiny_gpt2().save_pretrained(path)
    return path, lambda: auto.from_pretrained(path).eval(), targets


def make(base, targets, r=8, **kw):
    model = dylora.get_dylora_model(base, DyLoraConfig(r=r, lora_alpha=16, target_modules=targets, **kw))
    randomise_lora(model)
    return model.eval()


def out_at(model, b, ids):
    dylora.set_rank(model, b)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_save_and_export_load_in_vanilla_peft_with_equal_outputs(saved_base, tmp_path, ids):
    """The r_max checkpoint is a plain LoRA at b = r; export(b) is a plain LoRA of rank b, for every b."""
    base_dir, fresh, targets = saved_base
    model = make(fresh(), targets, r=4, r_min=2, frozen=True)
    model.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and "r_min" not in cfg
    side = json.loads((tmp_path / "adapter" / "dylora_config.json").read_text())
    assert side["r_min"] == 2 and side["frozen"] is True
    ranks = [2, 3, 4]
    for b in ranks:
        path = dylora.export_lora(model, rank=b, path=tmp_path / "exports" / f"lora-r{b}")
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["peft_type"]) == (b, 16, False, "LORA")
        assert not (path / "dylora_config.json").exists()
        weights = load_file(path / "adapter_model.safetensors")
        assert all(t.shape[0] == b for k, t in weights.items() if "lora_A" in k)
        assert all(t.shape[1] == b for k, t in weights.items() if "lora_B" in k)
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["lora-r2", "lora-r3", "lora-r4"]
    dirs = [tmp_path / "adapter"] + [tmp_path / "exports" / f"lora-r{b}" for b in ranks]
    saved, *exported = vanilla_peft_outputs(base_dir, dirs, ids, tmp_path)
    assert (saved - out_at(model, 4, ids)).abs().max() <= 1e-5
    for b, got in zip(ranks, exported, strict=True):
        assert (got - out_at(model, b, ids)).abs().max() <= 1e-5, f"rank {b}"


def test_load_restores_the_dylora_model_and_settings(saved_base, tmp_path, ids):
    _, fresh, targets = saved_base
    model = make(fresh(), targets, r_min=2, rank_distribution="geometric", geometric_p=0.3)
    dylora.save(model, tmp_path / "adapter")
    loaded = dylora.load(fresh(), tmp_path / "adapter")
    cfg = loaded.peft_config["default"]
    assert isinstance(cfg, DyLoraConfig)
    assert (cfg.r, cfg.r_min, cfg.rank_distribution, cfg.geometric_p) == (8, 2, "geometric", 0.3)
    assert dylora.get_rank(loaded) == 8
    for b in (2, 5, 8):
        torch.testing.assert_close(out_at(loaded, b, ids), out_at(model, b, ids), atol=0, rtol=0)


@pytest.mark.parametrize("b", [1, 4, 8])
def test_merge_at_rank_b_equals_the_unmerged_model(saved_base, ids, b):
    _, fresh, targets = saved_base
    model = make(fresh(), targets)
    merged = dylora.merge(model, rank=b)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - out_at(model, b, ids)).abs().max() <= 1e-5
    assert dylora.get_rank(model) == b  # the DyLoRA model itself is untouched, still usable


def test_merge_unmerge_merge_at_another_rank_never_corrupts_w0(saved_base, ids):
    _, fresh, targets = saved_base
    model = make(fresh(), targets)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    for first, second in [(2, 7), (8, 1), (5, 5)]:
        dylora.set_rank(model, first)
        model.merge_adapter()
        if second != first:  # the reference code unmerged at the new rank and corrupted W0: the change is refused
            with pytest.raises(ValueError, match="merged"):
                dylora.set_rank(model, second)
        assert dylora.get_rank(model) == first
        model.unmerge_adapter()
        for n, p in model.named_parameters():
            if n in w0:
                torch.testing.assert_close(p, w0[n], atol=1e-6, rtol=0)
        dylora.set_rank(model, second)
        model.merge_adapter()
        with torch.no_grad():
            merged_out = model(input_ids=ids).logits
        model.unmerge_adapter()
        torch.testing.assert_close(merged_out, out_at(model, second, ids), atol=1e-5, rtol=1e-5)


def test_safe_merge_path(ids):
    model = make(tiny_bert(), ["query"])
    dylora.set_rank(model, 3)
    expected = out_at(model, 3, ids)
    merged = model.merge_and_unload(safe_merge=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ errors, one line each


def test_export_rank_outside_range(tmp_path):
    model = make(tiny_bert(), ["query"], r_min=2)
    for bad in (1, 9):
        with pytest.raises(ValueError, match=r"\[2, 8\]"):
            dylora.export_lora(model, rank=bad, path=tmp_path / "x")
        with pytest.raises(ValueError, match=r"\[2, 8\]"):
            dylora.merge(model, rank=bad)
    assert not (tmp_path / "x").exists()


def test_load_into_model_with_other_shapes_names_the_key(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    dylora.save(make(tiny_bert(), ["query", "value"]), tmp_path / "a")
    other = BertForSequenceClassification(BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=48))
    with pytest.raises(ValueError, match=r"key base_model\.model\.bert\.encoder\.layer\.0\..*lora_A\.weight has "
                                         r"shape \(8, 32\), the model expects \(8, 48\)") as err:
        dylora.load(other, tmp_path / "a")
    assert "\n" not in str(err.value)


def test_missing_and_corrupted_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter directory not found"):
        dylora.load(tiny_bert(), tmp_path / "nope")
    dylora.save(make(tiny_bert(), ["query"]), tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupted adapter file .*adapter_model.safetensors") as err:
        dylora.load(tiny_bert(), tmp_path / "a")
    assert "\n" not in str(err.value)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="missing adapter file: .*adapter_model.safetensors"):
        dylora.load(tiny_bert(), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupted adapter file .*adapter_config.json"):
        dylora.load(tiny_bert(), tmp_path / "a")


def test_a_plain_lora_adapter_loads_as_dylora_with_r_min_1(tmp_path, ids):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query"]))
    randomise_lora(lora)
    lora.save_pretrained(tmp_path / "plain")
    model = dylora.load(tiny_bert(), tmp_path / "plain")
    assert dylora.get_rank(model) == 4 and model.peft_config["default"].r_min == 1
    with torch.no_grad():
        torch.testing.assert_close(out_at(model, 4, ids), lora.eval()(input_ids=ids).logits)
