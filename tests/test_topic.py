"""bbc-topic: the topic word of an article's first words, scored by one teacher-forced forward (NLL, perplexity,
and exact match that equals greedy decoding's), on tiny random GPT-2 and Llama models."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from test_generation import SOURCES, dylora_lm
from tiny import make_tiny_model, run_cli

from dylora import set_rank
from dylora.app import data as d
from dylora.app.tasks.generation import IGNORE, PROMPTS, encode_example, encode_prompt, teacher_forced

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {kind: str(make_tiny_model(kind, root / f"tiny-{kind}")) for kind in ("gpt2", "llama")}


def test_bbc_topic_splits_are_stratified_and_hold_300_test_articles():
    task = d.load_generation_task("bbc-topic", seed=0)
    sizes = {k: len(v) for k, v in task.splits.items()}
    assert sizes == {"train": 2225 - 450, "validation": 150, "test": 300}
    labels = {"business", "entertainment", "politics", "sports", "tech"}
    for split in d.SPLITS:
        counts = Counter(task.splits[split]["target"])
        assert set(counts) == labels
        assert max(counts.values()) / len(task.splits[split]) < 0.25  # no topic dominates
    assert all(len(x.split()) <= d.TOPIC_WORDS for x in task.splits["test"]["source"])
    assert Counter(task.splits["test"]["target"])["sports"] == pytest.approx(300 * 511 / 2225, abs=1)
    again = d.load_generation_task("bbc-topic", seed=0, max_train=100)
    assert again.splits["test"]["source"] == task.splits["test"]["source"] and len(again.splits["train"]) == 100
    assert d.load_generation_task("bbc-topic", seed=1).splits["test"]["source"] != task.splits["test"]["source"]


def greedy_ids(model, prompts: list[list[int]], n: int, pad: int) -> list[list[int]]:
    """model.generate (greedy, left-padded batch, KV cache) of exactly n new tokens for each prompt."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             num_beams=1, pad_token_id=pad, eos_token_id=None, temperature=None, top_p=None,
                             top_k=None)
    return out[:, width:].tolist()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_exact_match_of_one_forward_is_greedy_decodings(tiny, kind):
    """References: the greedy continuation itself (a match), or with one token changed (not a match, wherever the
    change is); prompts of different lengths share a left-padded batch. teacher_forced's exact match must equal
    "model.generate writes the reference", per example."""
    model, tokenizer = dylora_lm(tiny[kind], seed=3)
    set_rank(model, 3)
    prompts = [encode_prompt(tokenizer, x, 40, PROMPTS["bbc-topic"]) for x in SOURCES * 2]
    greedy = greedy_ids(model, prompts, 3, tokenizer.pad_token_id)
    rows, expected = [], []
    for i, (p, g) in enumerate(zip(prompts, greedy, strict=True)):
        target = list(g)
        if i % 2:  # change one token: the first, the second or the last
            j = (i // 2) % 3
            target[j] = (target[j] + 7) % len(tokenizer)
        rows.append({"input_ids": p + target, "labels": [IGNORE] * len(p) + target})
        expected.append(greedy_ids(model, [p], 3, tokenizer.pad_token_id)[0] == target)
    assert expected == [i % 2 == 0 for i in range(len(rows))]  # the batch decodes as each prompt alone
    for batch_size in (3, 8):
        scores = teacher_forced(model, rows, tokenizer.pad_token_id, batch_size=batch_size, examples=True)
        assert scores["example_correct"] == [float(x) for x in expected]
        assert scores["exact_match"] == pytest.approx(50.0)


def test_nll_is_the_mean_over_reference_tokens_of_each_example_alone(tiny):
    model, tokenizer = dylora_lm(tiny["llama"], seed=2)
    rows = [encode_example(tokenizer, x, y, 64, PROMPTS["bbc-topic"])
            for x, y in zip(SOURCES, ["business", "weather", "sports", "politics"], strict=True)]
    scores = teacher_forced(model, rows, tokenizer.pad_token_id, batch_size=4, examples=True)
    nll = []
    with torch.no_grad():
        for ex in rows:  # unpadded, full logits, by hand
            ids = torch.tensor([ex["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            start = ex["labels"].count(IGNORE)
            nll.append([-float(logp[j - 1, ids[0, j]]) for j in range(start, ids.shape[1])])
    per_token = [x for xs in nll for x in xs]
    assert scores["nll"] == pytest.approx(sum(per_token) / len(per_token), rel=1e-4)
    assert scores["perplexity"] == pytest.approx(math.exp(scores["nll"]), rel=1e-9)
    assert scores["example_loss"] == pytest.approx([sum(xs) for xs in nll], rel=1e-4)
    assert all(ex["input_ids"][-1] == tokenizer.eos_token_id for ex in rows)  # EOS is a scored reference token


@pytest.fixture(scope="module")
def topic_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "topic"
    proc = run_cli("train", "--model", tiny["gpt2"], "--data", "bbc-topic", "--max-steps", "3", "--max-train", "24",
                   "--r", "2", "--max-eval", "8", "--batch-size", "8", "--out", out, "--quiet", check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_train_on_bbc_topic_reports_one_forward_metrics(topic_run):
    out = topic_run
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["metric"] == "exact_match" and [row["rank"] for row in sweep["rows"]] == [1, 2]
    for row in sweep["rows"]:
        assert 0 <= row["test_exact_match"] <= 100 and row["test_perplexity"] == pytest.approx(
            math.exp(row["test_nll"]))
        assert "test_bleu" not in row
    record = json.loads((out / "run.json").read_text())
    assert record["prompt"] == {"instruction": "News:", "separator": "\nTopic:"} and record["max_new_tokens"] is None


def test_any_rank_lean_sweep_reuses_the_own_row_at_r_where_both_bases_are_one_update(topic_run, tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    spec = importlib.util.spec_from_file_location("any_rank_lean", Path(__file__).parents[1] / "benchmarks" /
                                                  "any_rank.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    full = bench.eval_job(tmp_path / "full.json", topic_run, [1, 2])
    lean = bench.eval_job(tmp_path / "lean.json", topic_run, [1, 2], lean=True)
    by = {(r["rank"], r["basis"]): r for r in full["rows"]}
    assert sorted((r["rank"], r["basis"]) for r in lean["rows"]) == sorted(by)
    for row in lean["rows"]:
        ref = by[row["rank"], row["basis"]]
        for key in ("validation_nll", "test_nll", "test_exact_match", "validation_exact_match"):
            assert row[key] == pytest.approx(ref[key], rel=1e-4), (row["rank"], row["basis"], key)
    # the SVD basis at b = r scores as the prefix (the full SVD is a rotation of the same update)
    assert by[2, "svd"]["test_nll"] == pytest.approx(by[2, "prefix"]["test_nll"], rel=1e-5)
    c = bench.curves(lean["rows"], "perplexity")
    assert set(c["picked"]["choice"]) == {1, 2} and c["picked-loss"]["choice"][2] == "prefix"
