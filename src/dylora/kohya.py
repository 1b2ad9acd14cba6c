"""Export a DyLoRA rank as a kohya-ss LoRA file: what A1111, ComfyUI and diffusers' `load_lora_weights` read.

A kohya file is one safetensors file with, per adapted module, three tensors named after the module path
(dots replaced by underscores) under `lora_unet_` (the UNet) or `lora_te_` / `lora_te1_` / `lora_te2_`
(the text encoders):

    <name>.lora_down.weight   A[:b]       (b, in) or (b, in, *kernel)
    <name>.lora_up.weight     B[:, :b]    (out, b) or (out, b, 1, 1)
    <name>.alpha              a scalar;   the loaders scale by alpha / dim, dim = b

so alpha = c(b) * b (lora_alpha with "alpha/b", lora_alpha * sqrt(b) with "alpha/sqrt(b)") gives DyLoRA's
scale c(b) at rank b exactly. Module paths are diffusers' (kohya-ss itself names SD 1.x modules this way),
which diffusers, ComfyUI and A1111 all map to their own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from . import files
from .functional import check_rank, rank_coefficient
from .model import MODULE_PREFIX, named_layers, one_adapter, unwrap

# pipeline component name -> kohya key prefix (SDXL's two encoders are lora_te1 / lora_te2)
PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
UNETS = ("UNet2DConditionModel",)
TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")


def _base(model: torch.nn.Module) -> torch.nn.Module:
    inner = unwrap(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def _component(model: torch.nn.Module) -> str:
    """"unet" or "text_encoder", from the class of the adapted model."""
    name = type(_base(model)).__name__
    if name in UNETS:
        return "unet"
    if name in TEXT_ENCODERS:
        return "text_encoder"
    raise ValueError(f"export_kohya writes Stable Diffusion LoRAs: pass a DyLoRA UNet2DConditionModel or CLIP text "
                     f"encoder, or {{'unet': ..., 'text_encoder': ...}}; got a {name}, which has no kohya naming")


def kohya_name(model: torch.nn.Module, module_name: str) -> str:
    """A module's kohya name: its path with underscores, as SD checkpoints name it.

    transformers 5 flattened `CLIPTextModel` (its layers are `encoder.layers...`, where checkpoints, kohya and
    transformers 4 have `text_model.encoder.layers...`): such paths get the `text_model` back.
    """
    if type(_base(model)).__name__ == "CLIPTextModel" and not module_name.startswith("text_model."):
        module_name = "text_model." + module_name
    return module_name.replace(".", "_")


def kohya_state_dict(models: torch.nn.Module | Mapping[str, torch.nn.Module], rank: int,
                     adapter_name: str | None = None, basis: str = "prefix"
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The kohya tensors of every adapted module at rank b, and the ss_/dylora_ metadata they imply.

    `models` is one DyLoRA model (a UNet or a CLIP text encoder) or {pipeline component name: model}, with
    component names "unet", "text_encoder" and "text_encoder_2".
    """
    if not isinstance(models, Mapping):
        models = {_component(models): models}
    unknown = sorted(set(models) - set(PREFIXES))
    if unknown:
        raise ValueError(f"unknown pipeline component {unknown[0]!r}: choose among {', '.join(PREFIXES)}")
    prefixes = dict(PREFIXES, text_encoder="lora_te1") if "text_encoder_2" in models else PREFIXES
    state: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}  # kohya key -> the module it came from
    alphas, meta = set(), {}
    for component, model in models.items():
        name, cfg = one_adapter(model, adapter_name)
        check_rank(rank, cfg.r_min, cfg.r)
        meta.update(dylora_r_max=str(cfg.r), dylora_r_min=str(cfg.r_min), dylora_rank_scaling=cfg.rank_scaling)
        for module_name, layer in named_layers(model, name).items():
            if name not in layer.lora_A:
                raise ValueError(f"kohya files hold LoRA on Linear and Conv layers only, not on {module_name!r} "
                                 f"({type(layer.get_base_layer()).__name__})")
            variant = layer.lora_variant[name]
            key = prefixes[component] + "_" + kohya_name(model, module_name.removeprefix(MODULE_PREFIX))
            here = f"{component}:{module_name.removeprefix(MODULE_PREFIX)}"
            if key in owner:
                raise ValueError(f"modules {owner[key]!r} and {here!r} both get the kohya name {key} (kohya turns "
                                 "dots into underscores): a kohya file cannot hold both; nothing written")
            owner[key] = here
            alpha = rank_coefficient(rank, variant.lora_alpha, variant.rank_scaling) * rank
            alphas.add(alpha)
            down, up = variant.rank_factors(layer, name, rank, basis)
            state[key + ".lora_down.weight"] = down.clone()
            state[key + ".lora_up.weight"] = up.clone()
            state[key + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
    meta.update(ss_network_module="networks.lora", ss_network_dim=str(rank), dylora_rank=str(rank),
                ss_network_alpha=f"{alphas.pop():g}" if len(alphas) == 1 else "per-module")
    return state, meta


def export_kohya(models: torch.nn.Module | Mapping[str, torch.nn.Module], rank: int, path: str | os.PathLike,
                 *, adapter_name: str | None = None, base_model: str | None = None,
                 dtype: torch.dtype | None = None, card: bool = True, command: str | None = None,
                 overwrite: bool = True, basis: str = "prefix") -> Path:
    """Write rank b of a DyLoRA UNet and/or text encoder(s) as one kohya-ss LoRA `.safetensors` file.

    A1111, ComfyUI and diffusers (`pipe.load_lora_weights`) load it as a plain rank-b LoRA whose output is
    DyLoRA's at rank b. The metadata has kohya's ss_network_dim (= b) and ss_network_alpha, the base model
    (ss_sd_model_name) and dylora_r_max / dylora_rank. `dtype` casts the weights (e.g. torch.float16);
    `card` writes a model card beside the file, `<name>.md` (an existing one is replaced only with `overwrite`,
    and only if dylora wrote it). Both are complete before either is renamed into place; without `overwrite`
    neither replaces a file that exists, even one that appeared meanwhile. `basis="svd"`: the best rank-b
    approximation of each module's update instead of its first b components.
    """
    state, meta = kohya_state_dict(models, rank, adapter_name, basis)
    if dtype is not None:
        state = {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in state.items()}
    first = next(iter(models.values())) if isinstance(models, Mapping) else models
    name, cfg = one_adapter(first, adapter_name)
    base_model = base_model or cfg.base_model_name_or_path
    if base_model:
        meta["ss_sd_model_name"] = str(base_model)
    path = Path(path)
    card_path = path.with_suffix(".md")
    targets = [path, card_path] if card else [path]
    if card and card_path == path:
        raise ValueError(f"{path}: a kohya file named .md would be its own model card; name it .safetensors")
    for target in targets:
        if not overwrite and (target.exists() or target.is_symlink()):
            raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
        if target.is_dir():
            raise FileExistsError(f"{target} is a directory; choose another path")
    if card and card_path.exists() and not _is_dylora_card(card_path):
        raise FileExistsError(f"{card_path} exists and is not a model card dylora wrote; the card of {path.name} would "
                              "replace it: choose another name, or pass card=False")
    with _staging(path) as stage:  # every file complete before the first is published
        files.save_weights(state, stage / path.name, metadata={"format": "pt", **meta})
        if card:
            from .cards import write_card

            if card_path.is_file():  # overwrite: the existing card's front matter is kept, as write_card does
                shutil.copyfile(card_path, stage / card_path.name)
            write_card(stage, cfg, rank=rank, command=command, base_model=base_model, filename=card_path.name,
                       files=[path.name], kohya=True)
        published: list[Path] = []
        try:
            for target in reversed(targets):  # the card first: the weights appear only with their card beside
                files.publish(stage / target.name, target, overwrite)
                published.append(target)
        except BaseException:
            if not overwrite:  # what this call published did not exist before it
                for target in published:
                    target.unlink(missing_ok=True)
            raise
    return path


def _is_dylora_card(path: Path) -> bool:
    """Whether `path` is a model card dylora wrote (its front matter tags it `dylora`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    head = text.split("\n---", 2)[0] if text.startswith("---") else ""
    return "- dylora" in head.splitlines()


@contextlib.contextmanager
def _staging(path: Path) -> Iterator[Path]:
    """A hidden temporary directory beside `path` (`.NAME.tmp-PID-*`, removed after; a killed run's is removed by
    the next write), where the file and its card are written before being renamed into place."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot write {path}: {err.strerror or err}") from None
    files.clean_stale(path)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
