"""The public model API: make a DyLoRA model with PEFT, choose its rank, save, load, export and merge."""

from __future__ import annotations

import contextlib
import copy
import os
import re
import types
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import layer as lora_layer
from peft.tuners.lora.layer import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from . import quantized
from .cards import write_card
from .config import SIDECAR_NAME, DyLoraConfig, check_config
from .files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, atomic_dir, read_json, read_weights, save_weights
from .functional import check_rank, rank_coefficient
from .layers import DyLoraVariant, RankState, check_basis, set_layer_rank, variant_for

MODULE_PREFIX = "base_model.model."  # a PeftModel's module names are its base model's, under this prefix


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The PeftModel inside torch.compile / DDP / FSDP wrappers."""
    return extract_model_from_parallel(model, keep_torch_compile=False)


def dylora_adapters(model: torch.nn.Module) -> dict[str, DyLoraConfig]:
    """The DyLoRA adapters of a model, by name."""
    cfgs = getattr(unwrap(model), "peft_config", None) or {}
    return {name: c for name, c in cfgs.items() if isinstance(c, DyLoraConfig)}


def _attach(model: torch.nn.Module, adapter: str, config: DyLoraConfig) -> None:
    check_config(config)  # again: an option set on the config after it was made (config.use_dora = True)
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.r:
            continue
        other = module.lora_variant.get(adapter)
        if other is not None and not isinstance(other, DyLoraVariant):
            raise ValueError(f"{name!r} already carries PEFT's {type(other).__name__} for adapter {adapter!r}: a LoRA "
                             "variant DyLoRA does not combine with; build the model from a DyLoraConfig alone")
        cls = variant_for(module)
        if cls is None:
            raise ValueError(
                f"DyLoRA supports nn.Linear, GPT-2 Conv1D, nn.Embedding and nn.Conv1d/2d/3d (groups=1) targets; "
                f"{name!r} is {_describe(module)}"
            )
        alpha = module.lora_alpha[adapter]
        device = next(p.device for p in module.parameters())
        cls(config.r, config.r_min, alpha, config.frozen, config.rank_scaling).attach(module, adapter, device)
        count += 1
    if count == 0:
        raise ValueError(f"adapter {adapter!r} adapted no layer: target_modules {config.target_modules!r} matched "
                         f"{_matched(model, adapter)}; DyLoRA takes PEFT's LoRA layers on nn.Linear, GPT-2 Conv1D, "
                         "nn.Embedding and nn.Conv1d/2d/3d")
    lora_model = getattr(model, "base_model", None)
    if lora_model is not None and hasattr(lora_model, "add_weighted_adapter"):
        lora_model.add_weighted_adapter = types.MethodType(_add_weighted_adapter, lora_model)


def _matched(model: torch.nn.Module, adapter: str) -> str:
    """What PEFT made of the targets of `adapter`: its tuner layers that are not LoRA layers, named."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = [f"{name} ({type(m).__name__}, not a LoRA layer)" for name, m in model.named_modules()
             if isinstance(m, BaseTunerLayer) and not isinstance(m, LoraLayer)
             and any(adapter in (getattr(m, attr, None) or {}) for attr in m.adapter_layer_names)]
    return ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "") if found else "no module"


def plain_config(config: LoraConfig) -> LoraConfig:
    """The plain PEFT LoraConfig part of a (DyLoRA) config."""
    return LoraConfig(**{k: v for k, v in config.to_dict().items()
                         if k in LoraConfig.__dataclass_fields__ and k != "peft_type"})


def _add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, *args, **kwargs):
    """PEFT's `add_weighted_adapter`, with each DyLoRA adapter taken at its current rank and basis.

    PEFT reads every layer's full r_max factors (and `get_delta_weight`): for the call, each DyLoRA layer holds
    its rank-b factors zero-padded to r (in the prefix basis, which then gives exactly its rank-b update), and
    the new adapter is a plain LoRA (its config a LoraConfig, not a DyLoraConfig).
    """
    dy = [a for a in adapters if isinstance(self.peft_config.get(a), DyLoraConfig)]
    if not dy:
        return type(self).add_weighted_adapter(self, adapters, weights, adapter_name, *args, **kwargs)
    states = rank_states(self, dy)
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
    first = self.peft_config[adapters[0]]
    try:
        with torch.no_grad():
            for module, name, state in states:
                variant = module.lora_variant[name]
                b = _uniform(variant, name)
                A_b, B_b = variant.rank_factors(module, name, b, state.basis)
                A, B = variant.params(module, name)
                for param, part in ((A, A_b), (B, B_b)):
                    padded = torch.zeros_like(param)
                    (padded[:b] if param is A else padded[:, :b]).copy_(part)
                    swapped.append((param, param.data))
                    param.data = padded
                variant.set_rank(module, name, b, "prefix")
        self.peft_config[adapters[0]] = plain_config(first)
        return type(self).add_weighted_adapter(self, adapters, weights, adapter_name, *args, **kwargs)
    finally:
        self.peft_config[adapters[0]] = first
        for param, data in swapped:
            param.data = data
        restore_rank_states(states)


def _describe(module: LoraLayer) -> str:
    """What an unsupported target is: PEFT's layer is named where it, not the base layer, lacks the variant hook."""
    if isinstance(module, lora_layer.ParamWrapper):
        return (f"an nn.Parameter target ({module.parameter_name!r}, target_parameters): PEFT's ParamWrapper takes "
                "no LoRA variant")
    if isinstance(module, lora_layer.MultiheadAttention):
        return "an nn.MultiheadAttention: PEFT's LoRA layer for it merges its weights in each forward, with no variant"
    layer = module.get_base_layer()
    groups = getattr(layer, "groups", 1)
    return "a " + type(layer).__name__ + (f" with groups={groups}" if groups != 1 else "")


def is_target_miss(err: Exception) -> bool:
    """PEFT's error (in either of its wordings) for target modules that match no module."""
    return "not found in the base model" in str(err) or "No modules were targeted" in str(err)


def target_error(base: torch.nn.Module, config: LoraConfig) -> ValueError:
    names = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules()
                    if isinstance(m, torch.nn.Linear | torch.nn.Embedding | torch.nn.modules.conv._ConvNd)
                    or type(m).__name__ == "Conv1D"})
    shown = ", ".join(names[:15]) + (", ..." if len(names) > 15 else "")
    return ValueError(f"target_modules {sorted(config.target_modules or [])} match no module of "
                      f"{type(base).__name__}; some that exist: {shown}")


def peft_model(base: torch.nn.Module, config: LoraConfig, adapter_name: str = "default") -> PeftModel:
    """PEFT's `get_peft_model`, with target modules that match nothing refused in one line naming some that exist."""
    try:
        return get_peft_model(base, config, adapter_name=adapter_name)
    except ValueError as err:
        if is_target_miss(err):
            raise target_error(base, config) from None
        raise


def get_dylora_model(base: torch.nn.Module, config: DyLoraConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap `base` with a DyLoRA adapter (a `peft.PeftModel`); its rank starts at r_max."""
    if not isinstance(config, DyLoraConfig):
        raise ValueError(f"config must be a dylora.DyLoraConfig, got {type(config).__name__}")
    check_config(config)  # before PEFT changes the base: options set after the config was made are checked too
    _refuse_adapted_base(base)
    model = peft_model(base, config, adapter_name)
    _attach(model, adapter_name, config)
    return model


def _refuse_adapted_base(base: torch.nn.Module) -> None:
    """PEFT adapts a base in place: a second adapter on it goes through its PeftModel, never the bare base."""
    if not isinstance(base, PeftModel) and any(isinstance(m, LoraLayer) for m in base.modules()):
        raise ValueError(f"this {type(base).__name__} already holds LoRA layers (get_peft_model and dylora.load "
                         "adapt a base model in place): load a fresh base model, or add an adapter to its "
                         "PeftModel with dylora.add_dylora_adapter")


def attach_dylora_layers(model: torch.nn.Module) -> list[str]:
    """Give the DyLoRA variant to the layers of every DyLoRA adapter that has none yet, and return their names.

    For a model PEFT built from a DyLoraConfig by itself (`get_peft_model`, a trainer's `peft_config=`): its
    LoRA layers are plain until then, and would train as a LoRA at r_max.
    """
    inner = unwrap(model)
    bare = [name for name in dylora_adapters(inner) if next(_layers(inner, name), None) is None]
    for name in bare:
        _attach(inner, name, dylora_adapters(inner)[name])
    return bare


def add_dylora_adapter(model: PeftModel, adapter_name: str, config: DyLoraConfig) -> None:
    """Add a second DyLoRA adapter to a PeftModel (PEFT's `add_adapter`, plus the DyLoRA variant)."""
    check_config(config)
    model.add_adapter(adapter_name, config)
    _attach(model, adapter_name, config)


def _layers(model: torch.nn.Module, adapter: str) -> Iterator[LoraLayer]:
    for module in unwrap(model).modules():
        if isinstance(module, LoraLayer) and isinstance(module.lora_variant.get(adapter), DyLoraVariant):
            yield module


def select_adapters(model: torch.nn.Module, adapter_name: str | None) -> dict[str, DyLoraConfig]:
    adapters = dylora_adapters(model)
    if not adapters:
        raise ValueError("model has no DyLoRA adapter: build it with dylora.get_dylora_model or dylora.load")
    if adapter_name is None:
        return adapters
    if adapter_name not in adapters:
        raise ValueError(f"unknown DyLoRA adapter {adapter_name!r}; adapters: {', '.join(adapters)}")
    return {adapter_name: adapters[adapter_name]}


def refuse_if_merged(model: torch.nn.Module, names: Iterable[str], rank: int | Mapping[str, int] | None = None,
                     basis: str | None = None) -> None:
    """A merged adapter's output is fixed at the merged rank: refuse to change it (to `rank` in `basis`, to
    per-layer ranks {module name: b_l} in the layers named, or at all). PEFT's `merged_adapters` counts too: its
    torchao layer merges through `get_delta_weight`, not the variant, and unmerges at the rank of the moment."""
    for name in names:
        for key, module in named_layers(model, name).items():
            variant = module.lora_variant[name]
            wanted = rank.get(key, variant.rank) if isinstance(rank, Mapping) else rank
            merged = variant.merged is not None or name in getattr(module, "merged_adapters", ())
            if merged and (variant.rank != wanted or (basis or variant.state.basis) != variant.state.basis):
                raise ValueError(f"DyLoRA adapter {name!r} is merged into the base weights ({key}), so its rank "
                                 "cannot change; call unmerge_adapter() first")


def set_rank(model: torch.nn.Module, rank: int, adapter_name: str | None = None, *, basis: str = "prefix") -> None:
    """Use rank b in every layer of the DyLoRA adapter(s): W0 x + (alpha / b) B_b A_b x in the "prefix" basis,
    W0 x + U_b S_b V_b^T x (the best rank-b approximation of the layer's full update) in the "svd" basis."""
    picked = select_adapters(model, adapter_name)
    check_basis(basis)
    for cfg in picked.values():
        check_rank(rank, cfg.r_min, cfg.r)
    refuse_if_merged(model, picked, rank, basis)
    for name in picked:
        count = 0
        for module in _layers(model, name):
            module.lora_variant[name].set_rank(module, name, rank, basis)
            count += 1
        if count == 0:
            raise ValueError(f"DyLoRA adapter {name!r} has plain LoRA layers (PEFT built it from the DyLoraConfig "
                             "alone): build the model with dylora.get_dylora_model, or call "
                             "dylora.model.attach_dylora_layers(model)")


def one_adapter(model: torch.nn.Module, adapter_name: str | None) -> tuple[str, DyLoraConfig]:
    """The named DyLoRA adapter, or the active one (the first if none is active) when `adapter_name` is None."""
    picked = select_adapters(model, adapter_name)
    name = adapter_name
    if name is None:
        active = getattr(unwrap(model), "active_adapter", None)
        name = active if active in picked else next(iter(picked))
    return name, picked[name]


def _uniform(variant, adapter: str) -> int:
    """The one rank a layer uses; a RuntimeError when it uses a rank per example or the expected scale."""
    if variant.rank is None:
        what = "a rank per example" if variant.state.kind == "rows" else "the expected scale"
        raise RuntimeError(f"DyLoRA adapter {adapter!r} uses {what} now, not one rank; call dylora.set_rank first")
    return variant.rank


def get_rank(model: torch.nn.Module, adapter_name: str | None = None) -> int:
    """The rank the DyLoRA adapter currently uses (the active one if several)."""
    name, _ = one_adapter(model, adapter_name)
    ranks = {_uniform(module.lora_variant[name], name) for module in _layers(model, name)}
    if len(ranks) != 1:
        raise RuntimeError(f"layers of adapter {name!r} disagree on the rank: {sorted(ranks)}; "
                           "use dylora.get_layer_ranks for the rank of each layer")
    return ranks.pop()


def get_basis(model: torch.nn.Module, adapter_name: str | None = None) -> str:
    """The basis ("prefix" or "svd") the DyLoRA adapter's ranks currently use (the active one if several)."""
    name, _ = one_adapter(model, adapter_name)
    bases = {module.lora_variant[name].state.basis for module in _layers(model, name)}
    if len(bases) != 1:
        raise RuntimeError(f"layers of adapter {name!r} disagree on the basis: {sorted(bases)}")
    return bases.pop()


def rank_states(model: torch.nn.Module, names: Iterable[str]) -> list[tuple[LoraLayer, str, RankState]]:
    """Every layer's rank state, to put back with `restore_rank_states`."""
    return [(module, name, module.lora_variant[name].state) for name in names for module in _layers(model, name)]


def restore_rank_states(states: list[tuple[LoraLayer, str, RankState]]) -> None:
    """Put back the rank states `rank_states` took (rank, per-layer ranks, basis, of every layer)."""
    for module, name, state in states:
        module.lora_variant[name].set_state(module, name, state)


def named_layers(model: torch.nn.Module, adapter: str) -> dict[str, LoraLayer]:
    """The LoRA layers that carry DyLoRA adapter `adapter`, by full module name (`MODULE_PREFIX` + the base's)."""
    return {name: module for name, module in unwrap(model).named_modules()
            if isinstance(module, LoraLayer) and adapter in module.lora_variant}


def _rank_map(model: torch.nn.Module, adapter: str, ranks: Mapping[str, int]) -> dict[str, int]:
    """`ranks` checked (known layer, b in [r_min, r] or 0 = off) and keyed by full module name."""
    layers = named_layers(model, adapter)
    out = {}
    for key, b in ranks.items():
        name = key if key in layers else MODULE_PREFIX + key
        if name not in layers:
            shown = ", ".join(list(layers)[:3])
            raise ValueError(f"unknown module {key!r}: not a layer of DyLoRA adapter {adapter!r}; its layers are "
                             f"named like {shown} ({len(layers)} in all, see dylora.get_layer_ranks)")
        variant = layers[name].lora_variant[adapter]
        try:
            out[name] = check_rank(b, variant.r_min, variant.r, off=True)
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None
    return out


def get_layer_ranks(model: torch.nn.Module, adapter_name: str | None = None) -> dict[str, int]:
    """The rank b_l each layer of the DyLoRA adapter uses (the active one if several), by module name."""
    name, _ = one_adapter(model, adapter_name)
    return {key: _uniform(module.lora_variant[name], name) for key, module in named_layers(model, name).items()}


def set_layer_ranks(model: torch.nn.Module, ranks: Mapping[str, int], adapter_name: str | None = None, *,
                    basis: str = "prefix") -> None:
    """Use rank b_l in layer l: W0 x + (alpha / b_l) B[:, :b_l] A[:b_l] x (b_l = 0: W0 x, the layer switched
    off), or its best rank-b_l approximation with `basis="svd"`. Unlisted layers keep their rank and basis.

    Keys are module names as in `model.named_modules()`, with or without the `base_model.model.` prefix.
    Acts on the named adapter, or the active one; every name and rank is checked before any is set.
    """
    name, _ = one_adapter(model, adapter_name)
    layers = named_layers(model, name)
    wanted = _rank_map(model, name, ranks)
    check_basis(basis)
    refuse_if_merged(model, [name], wanted, basis)
    for key, b in wanted.items():
        set_layer_rank(layers[key], name, b, basis)


@contextlib.contextmanager
def at_rank(model: torch.nn.Module, b: int, adapter_name: str | None = None, *,
            basis: str = "prefix") -> Iterator[None]:
    """Use rank b (in `basis`) inside the block, then restore every layer's previous rank state."""
    with _restoring(model, adapter_name):
        set_rank(model, b, adapter_name, basis=basis)
        yield


def rank(model: torch.nn.Module, b: int, adapter_name: str | None = None) -> contextlib.AbstractContextManager[None]:
    """Deprecated alias of `at_rank`: it warns on every use and goes in dylora 1.0."""
    warnings.warn("dylora.model.rank is deprecated; use dylora.at_rank", DeprecationWarning, stacklevel=2)
    return at_rank(model, b, adapter_name)


def set_example_ranks(model: torch.nn.Module, ranks: list[int] | torch.Tensor,
                      adapter_name: str | None = None, *, basis: str = "prefix") -> None:
    """Row j of each batch uses rank ranks[j] (len(ranks) must be the batch size), until the next `set_rank`.

    Row j of the output then equals the model at rank ranks[j] on row j alone, at training and inference.
    Frozen adapters are refused while the model trains (their gradient mask is per rank, not per example).
    """
    picked = select_adapters(model, adapter_name)
    ranks = torch.as_tensor(ranks)
    if ranks.dim() != 1 or ranks.numel() == 0 or ranks.is_floating_point():
        raise ValueError(f"ranks must be a non-empty 1-D list of integers, one per row; got shape {tuple(ranks.shape)}")
    ranks = ranks.long().cpu()
    check_basis(basis)
    for cfg in picked.values():
        for b in sorted(set(ranks.tolist())):
            check_rank(b, cfg.r_min, cfg.r)
        if cfg.frozen and unwrap(model).training:
            raise ValueError("per-example ranks train in full mode only; this adapter has frozen=True")
    refuse_if_merged(model, picked)
    state = RankState(rows=tuple(ranks.tolist()), basis=basis)
    for name in picked:
        for module in _layers(model, name):
            module.lora_variant[name].set_state(module, name, state)


@contextlib.contextmanager
def example_ranks(model: torch.nn.Module, ranks: list[int] | torch.Tensor,
                  adapter_name: str | None = None, *, basis: str = "prefix") -> Iterator[None]:
    """Row j uses rank ranks[j] inside the block, then every layer's previous rank state is restored."""
    with _restoring(model, adapter_name):
        set_example_ranks(model, ranks, adapter_name, basis=basis)
        yield


@contextlib.contextmanager
def _restoring(model: torch.nn.Module, adapter_name: str | None) -> Iterator[None]:
    """Put every layer's rank state back as it was when the block began."""
    previous = rank_states(model, select_adapters(model, adapter_name))
    try:
        yield
    finally:
        restore_rank_states(previous)


def set_expected_scale(model: torch.nn.Module, pmf: list[float] | torch.Tensor,
                       adapter_name: str | None = None) -> None:
    """Scale every layer by E_b[s_b] for b ~ pmf over [r_min, r] (the nested recipe), until the next `set_rank`."""
    picked = select_adapters(model, adapter_name)
    pmf = torch.as_tensor(pmf, dtype=torch.float64)
    refuse_if_merged(model, picked)
    for name, cfg in picked.items():
        if pmf.shape != (cfg.r - cfg.r_min + 1,):
            raise ValueError(f"pmf must have r - r_min + 1 = {cfg.r - cfg.r_min + 1} entries, got {tuple(pmf.shape)}")
        state = RankState(pmf=tuple(pmf.tolist()))
        for module in _layers(model, name):
            module.lora_variant[name].set_state(module, name, state)


def read_adapter_config(path: str | os.PathLike) -> DyLoraConfig:
    """The DyLoraConfig of a saved adapter directory (plain LoRA settings plus the sidecar)."""
    path = Path(path)
    lora = read_json(path / ADAPTER_CONFIG)
    if not isinstance(lora, dict):
        raise ValueError(f"corrupted adapter file {path / ADAPTER_CONFIG}: a JSON object was expected, "
                         f"got a {type(lora).__name__}")
    if lora.get("peft_type") != "LORA":
        raise ValueError(f"{path / ADAPTER_CONFIG} is not a LoRA adapter (peft_type={lora.get('peft_type')!r})")
    sidecar = path / SIDECAR_NAME
    dy = read_json(sidecar) if sidecar.exists() else {"r_min": 1}
    if not isinstance(dy, dict):
        raise ValueError(f"corrupted adapter file {sidecar}: a JSON object was expected, got a {type(dy).__name__}")
    try:
        return DyLoraConfig.from_lora_config(lora, dy)
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"invalid DyLoRA settings in {path}: {err}") from None


def load(base: torch.nn.Module, path: str | os.PathLike, adapter_name: str = "default",
         is_trainable: bool = False) -> PeftModel:
    """Load a saved DyLoRA adapter (or any plain LoRA, taken as r_min = 1) onto `base`, at rank r_max."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {path}")
    config = read_adapter_config(path)
    config.inference_mode = not is_trainable
    weights = read_weights(path / ADAPTER_WEIGHTS)
    bad = [key for key, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{path / ADAPTER_WEIGHTS} holds non-finite weights (NaN or inf) in {len(bad)} tensor(s), "
                         f"e.g. {bad[0]}: the run that wrote it diverged; retrain it with a lower lr")
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


def save(model: PeftModel, path: str | os.PathLike, *, card: bool = True, **kwargs) -> Path:
    """`model.save_pretrained(path)`, written to a temporary directory and renamed into place.

    With `card`, PEFT's README.md becomes a DyLoRA model card (`dylora.cards.write_card`).
    """
    with atomic_dir(path) as tmp:
        unwrap(model).save_pretrained(str(tmp), **kwargs)
        if card and dylora_adapters(model):
            _, cfg = one_adapter(model, None)
            write_card(tmp, cfg)
    return Path(path)


def _one_of(rank: int | None, ranks: Mapping[str, int] | None) -> None:
    if (rank is None) == (ranks is None):
        raise ValueError("pass either rank (one b for every layer) or ranks ({module name: b}), not both or neither")


def pattern_key(module_name: str) -> str:
    """A `rank_pattern` / `alpha_pattern` key that PEFT matches to this one module only.

    PEFT 0.21 takes the first key k with `re.match(rf"(.*\\.)?({k})$", name)`, so a plain path would also
    match any module whose name ends with it (and its dots match any character): the path is escaped and
    anchored with `^`.
    """
    return "^" + re.escape(module_name.removeprefix(MODULE_PREFIX))


def export_lora(model: torch.nn.Module, rank: int | None = None, path: str | os.PathLike | None = None,
                adapter_name: str | None = None, *, ranks: Mapping[str, int] | None = None,
                bake_scale: bool = False, overwrite: bool = False, card: bool | Mapping = True,
                basis: str = "prefix") -> Path:
    """Write a DyLoRA adapter cut to rank b (or to rank b_l in each layer) as a plain PEFT LoRA.

    Keeps A[:b_l], B[:, :b_l] of each layer (`basis="svd"`: the factors of its best rank-b_l approximation).
    With one rank: r = b, lora_alpha = alpha, so vanilla PEFT's scale alpha / b is DyLoRA's exactly.
    With `ranks` ({module name: b_l}; unlisted layers keep their current rank): r = max b_l and
    `rank_pattern` gives every other layer its b_l, so PEFT's scale alpha_l / b_l is again DyLoRA's; layers
    at b_l = 0 are left out (`exclude_modules`). `bake_scale=True` folds alpha_l / b_l into B and writes
    lora_alpha = r, alpha_pattern = rank_pattern (PEFT's scale 1), for consumers that ignore `alpha_pattern`.
    With rank_scaling "alpha/sqrt(b)" it writes use_rslora=True: PEFT's alpha / sqrt(b_l) is then DyLoRA's c(b_l).
    With `card`, a README.md model card is written in it (`card` a mapping: more `dylora.cards.write_card`
    arguments, e.g. the sweep and the command); the directory is published whole, card included, or not at all.
    """
    peft_model = unwrap(model)
    name, cfg = one_adapter(peft_model, adapter_name)
    _one_of(rank, ranks)
    if path is None:
        raise ValueError("export_lora needs a path to write the adapter to")
    layers = named_layers(peft_model, name)
    check_basis(basis)
    if ranks is None:
        check_rank(rank, cfg.r_min, cfg.r)
        b_of = dict.fromkeys(layers, rank)
    else:
        b_of = {**get_layer_ranks(peft_model, name), **_rank_map(peft_model, name, ranks)}
    off = sorted(module for module, b in b_of.items() if b == 0)
    if len(off) == len(b_of):
        raise ValueError("every layer is at rank 0 (switched off): there is no adapter to export")
    state = get_peft_model_state_dict(peft_model, adapter_name=name)
    sliced = {}
    for key, t in state.items():
        module, _, part = key.rpartition(".lora_")
        if b_of.get(module) == 0:
            continue
        if part in ("A.weight", "embedding_A", "B.weight", "embedding_B"):
            b, variant = b_of[module], layers[module].lora_variant[name]
            A_b, B_b = variant.rank_factors(layers[module], name, b, basis)
            if bake_scale:
                B_b = B_b * rank_coefficient(b, variant.lora_alpha, variant.rank_scaling)
            t = A_b if part in ("A.weight", "embedding_A") else B_b
        sliced[key] = t.detach().contiguous().clone()
    plain = plain_config(cfg)
    plain.r = max(b_of.values())
    plain.rank_pattern = {pattern_key(module): b for module, b in b_of.items() if b not in (0, plain.r)}
    plain.exclude_modules = [module.removeprefix(MODULE_PREFIX) for module in off] or None
    plain.lora_alpha = plain.r if bake_scale else cfg.lora_alpha
    plain.alpha_pattern = dict(plain.rank_pattern) if bake_scale else dict(cfg.alpha_pattern or {})
    plain.use_rslora = cfg.rank_scaling == "alpha/sqrt(b)" and not bake_scale
    plain.inference_mode = True
    with atomic_dir(path, overwrite=overwrite) as tmp:
        plain.save_pretrained(str(tmp))
        save_weights(sliced, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        if card:
            write_card(tmp, cfg, rank=rank if ranks is None else b_of, **(card if isinstance(card, Mapping) else {}))
    return Path(path)


def merge(model: torch.nn.Module, rank: int | None = None, adapter_name: str | None = None,
          inplace: bool = False, *, ranks: Mapping[str, int] | None = None, basis: str = "prefix",
          requantize: bool = False) -> torch.nn.Module:
    """The base model with (alpha / b) B_b A_b folded into W0 (a copy, unless `inplace`).

    With `ranks` ({module name: b_l}, unlisted layers keep their current rank) each layer folds in its own
    (alpha / b_l) B[:, :b_l] A[:b_l]; with `basis="svd"` the best rank-b (b_l) approximation of its update.
    On a bitsandbytes (4-bit / 8-bit) base the result is dequantized: every layer is a plain `nn.Linear` in its
    compute dtype holding dequant(W0) + the update. `requantize=True` keeps PEFT's merge instead, which puts
    the sum back into the quantized format (smaller, but the rounding loses part of the update).
    """
    check_basis(basis)
    peft_model = unwrap(model)
    picked = select_adapters(peft_model, adapter_name)
    _one_of(rank, ranks)
    if ranks is None:
        for cfg in picked.values():
            check_rank(rank, cfg.r_min, cfg.r)
    else:
        name, _ = one_adapter(peft_model, adapter_name)
        ranks = _rank_map(peft_model, name, ranks)
    if not inplace:
        peft_model = copy.deepcopy(peft_model)
    if ranks is None:
        set_rank(peft_model, rank, adapter_name, basis=basis)
    else:
        set_layer_ranks(peft_model, ranks, name, basis=basis)
    adapters = list(picked) if adapter_name else None
    if not quantized.is_quantized(peft_model):
        return peft_model.merge_and_unload(adapter_names=adapters)
    if requantize:
        quantized.unpack_cpu_weights(peft_model)  # PEFT's merge reads the standard 4-bit layout
        return peft_model.merge_and_unload(adapter_names=adapters)
    default = _dense_dtype(peft_model)
    for key, module in [(k, m) for k, m in peft_model.named_modules() if isinstance(m, LoraLayer)]:
        layer = module.get_base_layer()
        if not quantized.quant_kind(layer):
            continue
        names = [a for a in adapters or module.active_adapters if a in module.lora_A]
        if any(module.lora_bias.get(a) for a in names):
            raise ValueError(f"{key}: a LoRA bias (lora_bias=True) on a quantized layer is merged by PEFT only; "
                             "use requantize=True")
        weight = quantized.dequantized_weight(layer)
        for adapter in names:
            weight = weight + module.get_delta_weight(adapter).float()
        peft_model.set_submodule(key, quantized.dense_linear(layer, weight, quantized.compute_dtype(layer, default)))
    base = peft_model.merge_and_unload(adapter_names=adapters)
    quantized.dequantize_layers(base, default)
    return base


def _dense_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first floating, unquantized parameter (its embeddings, usually): what the
    layers of a dequantized merge hold when they have no compute dtype of their own."""
    for p in model.parameters():
        if p.is_floating_point() and type(p).__name__ not in quantized.BNB_PARAMS:
            return p.dtype
    return torch.float32
