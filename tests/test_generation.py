"""The generation pipeline (causal LM, bbc-headlines) on tiny random GPT-2 and Llama models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomise_lora
from tiny import make_tiny_model, run_cli

from dylora import DyLoraConfig, at_rank, get_dylora_model, get_rank
from dylora.app import zoo
from dylora.app.cli import main
from dylora.app.run import load_run
from dylora.app.tasks.generation import (
    IGNORE,
    CausalCollator,
    encode_example,
    encode_prompt,
    generate,
    load_causal_lm,
    text_scores,
)

torch.set_num_threads(1)  # tiny matrices: threads only add contention on a shared machine

SOURCES = ["Shares in the company rose sharply on Monday after it reported record profits.",
           "Rain is expected.",
           "The football club has signed a new striker from a rival team for an undisclosed fee, its manager said.",
           "Ministers will meet tomorrow to discuss the budget."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {kind: str(make_tiny_model(kind, root / f"tiny-{kind}")) for kind in ("gpt2", "llama", "bert")}


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "gen"
    proc = run_cli("train", "--model", tiny["gpt2"], "--data", "bbc-headlines", "--max-steps", "5", "--max-train",
                   "40", "--r", "4", "--max-eval", "6", "--batch-size", "8", "--out", out, "--quiet", check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def dylora_lm(path: str, r: int = 4, seed: int = 1):
    model, tokenizer = load_causal_lm(path, path)
    targets = zoo.default_target_modules(model.config)
    peft_model = get_dylora_model(model, DyLoraConfig(r=r, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    randomise_lora(peft_model, seed=seed, std=0.2)
    return peft_model.eval(), tokenizer


def test_train_writes_a_generation_run(trained):
    out, proc = trained
    for name in ("adapter", "sweep.json", "sweep.csv", "sweep.png", "run.json", "samples.json"):
        assert (out / name).exists(), name
    assert not out.with_name(out.name + ".partial").exists()
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["metric"] == "bleu" and [row["rank"] for row in sweep["rows"]] == [1, 2, 3, 4]
    for key in ("validation_bleu", "validation_rougeL", "validation_perplexity", "test_bleu", "test_rougeL",
                "test_perplexity"):
        assert all(key in row for row in sweep["rows"]), key
    assert all(row["validation_perplexity"] > 1 for row in sweep["rows"])
    samples = json.loads((out / "samples.json").read_text())
    assert sorted(samples["ranks"]) == ["1", "2", "3", "4"]
    assert all(len(rows) == 5 and set(rows[0]) == {"source", "reference", "prediction"}
               for rows in samples["ranks"].values())
    record = json.loads((out / "run.json").read_text())
    assert record["settings"]["max_length"] == 128  # 160 (generation default), capped by the model's positions
    assert record["eval_examples"] == {"validation": 6, "test": 6}
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["task_type"] == "CAUSAL_LM" and adapter_cfg["target_modules"] == ["c_attn"]
    assert "val bleu" in proc.stdout and "best rank" in proc.stdout


def test_prompt_tokens_and_padding_are_masked(tiny):
    model, tokenizer = load_causal_lm(tiny["llama"], tiny["llama"])
    model.eval()
    pairs = [(SOURCES[0], "Shares soar on record profits"), (SOURCES[1], "Rain")]
    examples = [encode_example(tokenizer, x, y, 64) for x, y in pairs]
    for (x, _), ex in zip(pairs, examples, strict=True):
        prompt = encode_prompt(tokenizer, x, 64 - (len(ex["input_ids"]) - ex["labels"].count(IGNORE)))
        assert ex["input_ids"][:len(prompt)] == prompt
        assert ex["labels"] == [IGNORE] * len(prompt) + ex["input_ids"][len(prompt):]
        assert ex["input_ids"][-1] == tokenizer.eos_token_id
    batch = CausalCollator(tokenizer.pad_token_id)(examples)
    n_prompt = [ex["labels"].count(IGNORE) for ex in examples]
    for i, ex in enumerate(examples):
        k = len(ex["input_ids"])
        assert (batch["labels"][i, :n_prompt[i]] == IGNORE).all() and (batch["labels"][i, k:] == IGNORE).all()
        assert (batch["labels"][i, n_prompt[i]:k] != IGNORE).all()
        assert batch["attention_mask"][i].sum() == k
    with torch.no_grad():
        loss = model(**batch).loss
        nll = []
        for i, ex in enumerate(examples):  # by hand, each example alone, target tokens only
            ids = torch.tensor([ex["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            nll += [-logp[j - 1, ids[0, j]] for j in range(n_prompt[i], ids.shape[1])]
    torch.testing.assert_close(loss, torch.stack(nll).mean(), rtol=1e-4, atol=1e-4)


def test_long_source_is_truncated_to_fit(tiny):
    tokenizer = zoo.load_tokenizer(tiny["gpt2"])
    ex = encode_example(tokenizer, "word " * 500, "A headline", 48)
    assert len(ex["input_ids"]) <= 48 and ex["labels"][-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_rank_is_fixed_for_the_whole_generation(tiny, kind):
    model, tokenizer = dylora_lm(tiny[kind])
    seen = []
    handle = model.get_base_model().register_forward_pre_hook(lambda module, args: seen.append(get_rank(model)))
    try:
        generate(model, tokenizer, SOURCES[:2], rank_b=2, max_new_tokens=6, max_length=96, batch_size=2)
    finally:
        handle.remove()
    assert len(seen) >= 2 and set(seen) == {2}
    assert get_rank(model) == 4  # restored


def test_identical_predictions_score_100():
    refs = ["Shares soar on record profits", "Club signs new striker from rival", "Ministers to meet on budget"]
    scores = text_scores(refs, refs)
    assert scores["bleu"] == pytest.approx(100.0) and scores["rougeL"] == pytest.approx(100.0)
    assert text_scores(["completely different words here"] * 3, refs)["bleu"] < 5


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_left_padded_batches_generate_like_single_prompts(tiny, kind):
    model, tokenizer = dylora_lm(tiny[kind])
    batched = generate(model, tokenizer, SOURCES, rank_b=3, max_new_tokens=8, max_length=96, batch_size=4)
    single = [generate(model, tokenizer, [x], rank_b=3, max_new_tokens=8, max_length=96)[0] for x in SOURCES]
    assert batched == single
    assert any(batched)


def test_generate_command_prints_a_headline(trained, capsys):
    out, _ = trained
    assert main(["generate", str(out), "--rank", "2", SOURCES[0], SOURCES[2]]) == 0
    lines = capsys.readouterr().out.strip("\n").split("\n")
    assert len(lines) == 2 and all(line.strip() for line in lines)


def test_sweep_of_a_saved_generation_run_scores_by_generating(trained, capsys):
    out, _ = trained
    capsys.readouterr()
    assert main(["sweep", str(out), "--ranks", "2,4", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "bleu" in table and "rougeL" in table and "perplexity" in table
    saved = {row["rank"]: row for row in json.loads((out / "sweep.json").read_text())["rows"]}
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in table.splitlines() if line.count("│") > 2]
    shown = {(int(row[0]), row[1]): row[3:] for row in cells if row[0].isdigit()}
    assert sorted(shown) == [(2, "prefix"), (2, "svd"), (4, "prefix"), (4, "svd")]
    for (b, basis), values in shown.items():  # the same numbers as the sweep right after training
        assert values == [f"{saved[b][f'{basis}_test_{key}']:.2f}" for key in ("bleu", "rougeL", "perplexity")]
    assert main(["sweep", str(out), "--ranks", "7"]) == 2
    assert "outside" in capsys.readouterr().err


def test_export_of_a_causal_run_loads_with_vanilla_peft(trained, tmp_path, tiny, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = trained
    assert main(["export", str(out), "--rank", "2", "--out", str(tmp_path / "lora")]) == 0
    assert main(["export", str(out), "--rank", "2", "--merge", "--out", str(tmp_path / "merged")]) == 0
    dy, tokenizer, saved, _ = load_run(out)
    best = saved.sweep["best_rank"]
    assert best in (1, 2, 3, 4)
    ids = torch.tensor([encode_prompt(tokenizer, SOURCES[0], 64)])
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["gpt2"]), str(tmp_path / "lora"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    with torch.no_grad():
        with at_rank(dy, 2):
            expected = dy(input_ids=ids).logits
        torch.testing.assert_close(plain.eval()(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(merged.eval()(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_one_line_errors(tiny, tmp_path, capsys, trained):
    model, tokenizer = dylora_lm(tiny["gpt2"])
    with pytest.raises(ValueError, match="no prompts"):
        generate(model, tokenizer, [])
    capsys.readouterr()
    out = tmp_path / "bert-run"
    assert main(["train", "--model", tiny["bert"], "--data", "bbc-headlines", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "causal-LM" in err and "bert" in err
    assert not out.exists() and not out.with_name("bert-run.partial").exists()
    assert main(["generate", str(trained[0]), "  "]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "empty prompt" in err
    assert main(["generate", str(trained[0]), "--rank", "9", "text"]) == 2
    assert "outside" in capsys.readouterr().err


def test_allocate_works_on_a_generation_run(trained, tmp_path, capsys):
    """Per-layer ranks on a causal-LM run (issue #20 item 10, #21 item 7): evaluate scores them, no uniform rank."""
    import shutil

    out = tmp_path / "gen"
    shutil.copytree(trained[0], out)
    capsys.readouterr()
    assert main(["allocate", str(out), "--budget", "2.5", "--method", "greedy", "--calibration", "4", "--quiet"]) == 0
    record = json.loads((out / "allocation.json").read_text())
    assert len(set(record["ranks"].values())) > 1  # a real per-layer allocation, scored by generating
    assert set(record["allocated"]["test"]) == {"bleu", "rougeL", "perplexity"}
    assert record["uniform"]["rank"] == 2 and "per layer" in capsys.readouterr().out


def test_generate_bounds_max_new_tokens_and_reads_prompts_from_files(trained, tmp_path, capsys, monkeypatch):
    import io

    out = str(trained[0])
    capsys.readouterr()
    assert main(["generate", out, "--rank", "2", "--max-new-tokens", str(10**9), "text"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "max_new_tokens=1000000000" in err and "context of 128 tokens" in err
    assert main(["generate", out, "--rank", "2", SOURCES[0], SOURCES[2]]) == 0
    expected = capsys.readouterr().out
    (tmp_path / "p.txt").write_text(SOURCES[0])
    monkeypatch.setattr("sys.stdin", io.StringIO(SOURCES[2]))
    assert main(["generate", out, "--rank", "2", "--input", str(tmp_path / "p.txt"), "--input", "-"]) == 0
    assert capsys.readouterr().out == expected
    (tmp_path / "long.txt").write_text("word " * 200_000)  # far beyond any command line; cut to fit the context
    assert main(["generate", out, "--rank", "2", "--max-new-tokens", "113", "--input", str(tmp_path / "long.txt")]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) <= 1
    for args, needle in ((["--input", str(tmp_path / "none.txt")], "cannot read --input"), ([], "no paragraph")):
        assert main(["generate", out, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and needle in err, err
