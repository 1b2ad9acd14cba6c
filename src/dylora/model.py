"""The public model API: make a DyLoRA model with PEFT, choose its rank, save, load, export and merge."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import SIDECAR_NAME, DyLoraConfig
from .functional import check_rank
from .layers import variant_for

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The PeftModel inside torch.compile / DDP / FSDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def dylora_adapters(model: torch.nn.Module) -> dict[str, DyLoraConfig]:
    """The DyLoRA adapters of a model, by name."""
    cfgs = getattr(unwrap(model), "peft_config", None) or {}
    return {name: c for name, c in cfgs.items() if isinstance(c, DyLoraConfig)}


def _attach(model: torch.nn.Module, adapter: str, config: DyLoraConfig) -> None:
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.r:
            continue
        cls = variant_for(module)
        if cls is None:
            raise ValueError(
                f"DyLoRA supports nn.Linear, GPT-2 Conv1D and nn.Embedding targets; {name!r} is a "
                f"{type(module.get_base_layer()).__name__}"
            )
        alpha = module.lora_alpha[adapter]
        device = next(p.device for p in module.parameters())
        cls(config.r, config.r_min, alpha, config.frozen, config.rank_scaling).attach(module, adapter, device)
        count += 1
    if count == 0:
        raise ValueError(f"adapter {adapter!r} adapted no layer")


def _target_error(base: torch.nn.Module, config: LoraConfig) -> ValueError:
    names = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules()
                    if isinstance(m, torch.nn.Linear | torch.nn.Embedding) or type(m).__name__ == "Conv1D"})
    shown = ", ".join(names[:15]) + (", ..." if len(names) > 15 else "")
    return ValueError(f"target_modules {sorted(config.target_modules or [])} match no module of "
                      f"{type(base).__name__}; some that exist: {shown}")


def get_dylora_model(base: torch.nn.Module, config: DyLoraConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap `base` with a DyLoRA adapter (a `peft.PeftModel`); its rank starts at r_max."""
    if not isinstance(config, DyLoraConfig):
        raise ValueError(f"config must be a dylora.DyLoraConfig, got {type(config).__name__}")
    try:
        model = get_peft_model(base, config, adapter_name=adapter_name)
    except ValueError as err:
        if "not found in the base model" in str(err):
            raise _target_error(base, config) from None
        raise
    _attach(model, adapter_name, config)
    return model


def add_dylora_adapter(model: PeftModel, adapter_name: str, config: DyLoraConfig) -> None:
    """Add a second DyLoRA adapter to a PeftModel (PEFT's `add_adapter`, plus the DyLoRA variant)."""
    model.add_adapter(adapter_name, config)
    _attach(model, adapter_name, config)


def _layers(model: torch.nn.Module, adapter: str) -> Iterator[LoraLayer]:
    for module in unwrap(model).modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_variant:
            yield module


def _pick(model: torch.nn.Module, adapter_name: str | None) -> dict[str, DyLoraConfig]:
    adapters = dylora_adapters(model)
    if not adapters:
        raise ValueError("model has no DyLoRA adapter: build it with dylora.get_dylora_model or dylora.load")
    if adapter_name is None:
        return adapters
    if adapter_name not in adapters:
        raise ValueError(f"unknown DyLoRA adapter {adapter_name!r}; adapters: {', '.join(adapters)}")
    return {adapter_name: adapters[adapter_name]}


def set_rank(model: torch.nn.Module, rank: int, adapter_name: str | None = None) -> None:
    """Use rank b in every layer of the DyLoRA adapter(s): W0 x + (alpha / b) B_b A_b x."""
    picked = _pick(model, adapter_name)
    for cfg in picked.values():
        check_rank(rank, cfg.r_min, cfg.r)
    for name in picked:
        for module in _layers(model, name):
            module.lora_variant[name].set_rank(module, name, rank)


def get_rank(model: torch.nn.Module, adapter_name: str | None = None) -> int:
    """The rank the DyLoRA adapter currently uses (the active one if several)."""
    picked = _pick(model, adapter_name)
    if adapter_name is None and len(picked) > 1:
        active = getattr(unwrap(model), "active_adapter", None)
        adapter_name = active if active in picked else next(iter(picked))
    name = adapter_name or next(iter(picked))
    ranks = {module.lora_variant[name].rank for module in _layers(model, name)}
    if len(ranks) != 1:
        raise RuntimeError(f"layers of adapter {name!r} disagree on the rank: {sorted(ranks)}")
    return ranks.pop()


@contextlib.contextmanager
def rank(model: torch.nn.Module, b: int, adapter_name: str | None = None) -> Iterator[None]:
    """Use rank b inside the block, then restore the previous rank."""
    previous = get_rank(model, adapter_name)
    set_rank(model, b, adapter_name)
    try:
        yield
    finally:
        set_rank(model, previous, adapter_name)


def set_example_ranks(model: torch.nn.Module, ranks: list[int] | torch.Tensor,
                      adapter_name: str | None = None) -> None:
    """Row j of each batch uses rank ranks[j] (len(ranks) must be the batch size), until the next `set_rank`.

    Row j of the output then equals the model at rank ranks[j] on row j alone, at training and inference.
    Frozen adapters are refused while the model trains (their gradient mask is per rank, not per example).
    """
    picked = _pick(model, adapter_name)
    ranks = torch.as_tensor(ranks)
    if ranks.dim() != 1 or ranks.numel() == 0 or ranks.is_floating_point():
        raise ValueError(f"ranks must be a non-empty 1-D list of integers, one per row; got shape {tuple(ranks.shape)}")
    ranks = ranks.long().cpu()
    for cfg in picked.values():
        for b in sorted(set(ranks.tolist())):
            check_rank(b, cfg.r_min, cfg.r)
        if cfg.frozen and unwrap(model).training:
            raise ValueError("per-example ranks train in full mode only; this adapter has frozen=True")
    for name in picked:
        for module in _layers(model, name):
            module.lora_variant[name].set_example_ranks(module, name, ranks)


@contextlib.contextmanager
def example_ranks(model: torch.nn.Module, ranks: list[int] | torch.Tensor,
                  adapter_name: str | None = None) -> Iterator[None]:
    """Row j uses rank ranks[j] inside the block, then the previous rank is restored."""
    previous = get_rank(model, adapter_name)
    set_example_ranks(model, ranks, adapter_name)
    try:
        yield
    finally:
        set_rank(model, previous, adapter_name)


def set_expected_scale(model: torch.nn.Module, pmf: list[float] | torch.Tensor,
                       adapter_name: str | None = None) -> None:
    """Scale every layer by E_b[s_b] for b ~ pmf over [r_min, r] (the nested recipe), until the next `set_rank`."""
    picked = _pick(model, adapter_name)
    pmf = torch.as_tensor(pmf, dtype=torch.float64)
    for name, cfg in picked.items():
        if pmf.shape != (cfg.r - cfg.r_min + 1,):
            raise ValueError(f"pmf must have r - r_min + 1 = {cfg.r - cfg.r_min + 1} entries, got {tuple(pmf.shape)}")
        for module in _layers(model, name):
            module.lora_variant[name].set_expected_scale(module, name, pmf)


# ---------------------------------------------------------------- files


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing adapter file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupted adapter file {path}: {err}") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"missing adapter file: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"corrupted adapter file {path}: {str(err).splitlines()[0]}") from None


def read_adapter_config(path: str | os.PathLike) -> DyLoraConfig:
    """The DyLoraConfig of a saved adapter directory (plain LoRA settings plus the sidecar)."""
    path = Path(path)
    lora = _read_json(path / ADAPTER_CONFIG)
    if lora.get("peft_type") != "LORA":
        raise ValueError(f"{path / ADAPTER_CONFIG} is not a LoRA adapter (peft_type={lora.get('peft_type')!r})")
    sidecar = path / SIDECAR_NAME
    dy = _read_json(sidecar) if sidecar.exists() else {"r_min": 1}
    try:
        return DyLoraConfig.from_lora_config(lora, dy)
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid DyLoRA settings in {path}: {err}") from None


def load(base: torch.nn.Module, path: str | os.PathLike, adapter_name: str = "default",
         is_trainable: bool = False) -> PeftModel:
    """Load a saved DyLoRA adapter (or any plain LoRA, taken as r_min = 1) onto `base`, at rank r_max."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {path}")
    config = read_adapter_config(path)
    config.inference_mode = not is_trainable
    weights = _read_weights(path / ADAPTER_WEIGHTS)
    model = get_dylora_model(base, config, adapter_name=adapter_name)
    _check_shapes(model, weights, adapter_name, path)
    set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    if not is_trainable:
        model.eval()
    return model


def _check_shapes(model: PeftModel, weights: dict[str, torch.Tensor], adapter: str, path: Path) -> None:
    expected = {k: v.shape for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}
    for key, tensor in weights.items():
        if key not in expected:
            raise ValueError(f"{path / ADAPTER_WEIGHTS}: key {key} matches no module of this model")
        if tuple(expected[key]) != tuple(tensor.shape):
            raise ValueError(f"{path / ADAPTER_WEIGHTS}: key {key} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(expected[key])}")
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"{path / ADAPTER_WEIGHTS}: missing key {missing[0]} ({len(missing)} missing)")


def replace_dir(src: Path, dst: Path) -> None:
    """Rename directory `src` to `dst`, replacing an existing `dst` (moved aside first, then removed)."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Write a directory under a temporary name beside `path`, then rename it into place."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(model: PeftModel, path: str | os.PathLike, **kwargs) -> Path:
    """`model.save_pretrained(path)`, written to a temporary directory and renamed into place."""
    with atomic_dir(path) as tmp:
        unwrap(model).save_pretrained(str(tmp), **kwargs)
    return Path(path)


def export_lora(model: torch.nn.Module, rank: int, path: str | os.PathLike,
                adapter_name: str | None = None) -> Path:
    """Write rank b of a DyLoRA adapter as a plain PEFT LoRA of rank b.

    Keeps A[:b], B[:, :b], and writes r = b, lora_alpha = alpha: vanilla PEFT's scale alpha / b is then
    DyLoRA's exactly. With rank_scaling "alpha/sqrt(b)" it also writes use_rslora=True, whose scale
    alpha / sqrt(r) at r = b is DyLoRA's c(b).
    """
    peft_model = unwrap(model)
    picked = _pick(peft_model, adapter_name)
    name, cfg = next(iter(picked.items())) if adapter_name is None else (adapter_name, picked[adapter_name])
    if adapter_name is None and len(picked) > 1 and peft_model.active_adapter in picked:
        name, cfg = peft_model.active_adapter, picked[peft_model.active_adapter]
    check_rank(rank, cfg.r_min, cfg.r)
    state = get_peft_model_state_dict(peft_model, adapter_name=name)
    sliced = {}
    for key, t in state.items():
        if key.endswith("lora_A.weight") or key.endswith("lora_embedding_A"):
            t = t[:rank]
        elif key.endswith("lora_B.weight") or key.endswith("lora_embedding_B"):
            t = t[:, :rank]
        sliced[key] = t.detach().contiguous().clone()
    plain = LoraConfig(**{k: v for k, v in cfg.to_dict().items()
                          if k in LoraConfig.__dataclass_fields__ and k != "peft_type"})
    plain.r = rank
    plain.lora_alpha = cfg.lora_alpha
    plain.use_rslora = cfg.rank_scaling == "alpha/sqrt(b)"
    plain.alpha_pattern = dict(cfg.alpha_pattern or {})
    plain.inference_mode = True
    with atomic_dir(path) as tmp:
        plain.save_pretrained(str(tmp))
        save_file(sliced, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return Path(path)


def merge(model: torch.nn.Module, rank: int, adapter_name: str | None = None,
          inplace: bool = False) -> torch.nn.Module:
    """The base model with (alpha / b) B_b A_b folded into W0 (a copy, unless `inplace`)."""
    peft_model = unwrap(model)
    picked = _pick(peft_model, adapter_name)
    for cfg in picked.values():
        check_rank(rank, cfg.r_min, cfg.r)
    if not inplace:
        peft_model = copy.deepcopy(peft_model)
    set_rank(peft_model, rank, adapter_name)
    return peft_model.merge_and_unload(adapter_names=list(picked) if adapter_name else None)
