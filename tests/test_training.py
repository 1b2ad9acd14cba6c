"""Trainer integration: one rank per optimizer step from the sampler, logged; evaluation at r_max; sweeps."""

import pytest
import torch
from conftest import tiny_bert
from datasets import Dataset
from transformers import Trainer, TrainingArguments

import dylora
from dylora import DyLoraConfig, RankSampler
from dylora.recipes import RANK_KEY
from dylora.sweep import rank_parameters, rank_sweep
from dylora.training import DyLoraCallback, step_rank


def toy_dataset(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (n, 6), generator=g)
    labels = (ids[:, 0] > 60).long()
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def train(tmp_path, grad_accum=1, steps=10, seed=0):
    model = dylora.get_dylora_model(tiny_bert(), DyLoraConfig(r=8, target_modules=["query", "value"],
                                                              task_type="SEQ_CLS", seed=seed))
    sampler = RankSampler(1, 8, seed=seed)
    callback = DyLoraCallback(sampler)
    seen = []  # the rank each forward (micro-batch) ran at
    model.register_forward_pre_hook(lambda m, a, k: seen.append(dylora.get_rank(m)) if m.training else None,
                                    with_kwargs=True)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=grad_accum, logging_steps=1, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, learning_rate=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=toy_dataset(), callbacks=[callback])
    trainer.train()
    return trainer, callback, sampler, seen, model


def test_callback_sets_the_sampled_rank_each_step_and_logs_it(tmp_path):
    trainer, callback, sampler, seen, model = train(tmp_path)
    expected = [sampler.sample(step) for step in range(10)]
    assert [b for _, b in callback.history] == expected
    assert seen == expected
    logged = [e[RANK_KEY] for e in trainer.state.log_history if RANK_KEY in e]
    assert logged == expected
    assert dylora.get_rank(model) == 8  # after training the model is back at r_max


def test_rank_fixed_within_a_gradient_accumulation_group(tmp_path):
    _, callback, sampler, seen, _ = train(tmp_path, grad_accum=3, steps=6)
    expected = [sampler.sample(step) for step in range(6)]
    assert seen == [b for b in expected for _ in range(3)]


def test_evaluation_inside_training_runs_at_r_max(tmp_path):
    model = dylora.get_dylora_model(tiny_bert(), DyLoraConfig(r=8, target_modules=["query"], task_type="SEQ_CLS"))
    eval_ranks = []
    model.register_forward_pre_hook(lambda m, a, k: eval_ranks.append(dylora.get_rank(m)) if not m.training
                                    else None, with_kwargs=True)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                             eval_strategy="steps", eval_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, per_device_eval_batch_size=8)
    sampler = RankSampler(1, 8, seed=3)
    assert any(sampler.sample(s) != 8 for s in range(4))
    Trainer(model=model, args=args, train_dataset=toy_dataset(), eval_dataset=toy_dataset(16, 1),
            callbacks=[DyLoraCallback(sampler)]).train()
    assert eval_ranks and set(eval_ranks) == {8}


def test_manual_loop_step_rank():
    model = dylora.get_dylora_model(tiny_bert(), DyLoraConfig(r=8, target_modules=["query"]))
    sampler = RankSampler(2, 8, seed=1)
    for step in range(5):
        assert step_rank(model, sampler, step) == sampler.sample(step) == dylora.get_rank(model)


def test_rank_sweep_every_rank_restores_the_rank_and_counts_parameters():
    model = dylora.get_dylora_model(tiny_bert(), DyLoraConfig(r=8, r_min=2, target_modules=["query", "value"]))
    dylora.set_rank(model, 5)
    rows = rank_sweep(model, lambda m: {"rank_seen": dylora.get_rank(m)}, progress=False)
    assert [row.rank for row in rows] == list(range(2, 9))
    assert [row.metrics["rank_seen"] for row in rows] == list(range(2, 9))
    assert dylora.get_rank(model) == 5
    # 2 layers x 2 targets, each b * (32 in + 32 out); nothing else is trainable here
    assert [row.params for row in rows] == [4 * b * 64 for b in range(2, 9)]
    assert rank_parameters(model, 3) == 4 * 3 * 64
    rows = rank_sweep(model, lambda m: {}, ranks=[8, 2], progress=False)
    assert [row.rank for row in rows] == [8, 2]


def test_rank_sweep_out_of_range():
    model = dylora.get_dylora_model(tiny_bert(), DyLoraConfig(r=4, target_modules=["query"]))
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        rank_sweep(model, lambda m: {}, ranks=[5], progress=False)
