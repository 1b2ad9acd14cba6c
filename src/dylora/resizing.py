"""Shrink any PEFT LoRA adapter by the SVD cut: a pure function over its state dict, no base model loaded.

Each layer l of a LoRA adapter holds A (r_l x in) and B (out x r_l); its update is

    dW_l = c_l B A,    c_l = alpha_l / r_l  (or alpha_l / sqrt(r_l) with use_rslora),

with r_l and alpha_l from `r` / `lora_alpha` and PEFT's `rank_pattern` / `alpha_pattern` (conv: A is
(r, in, *k), flattened to (r, in * prod(k)); embedding: lora_embedding_A (r, num_embeddings), lora_embedding_B
(dim, r)). At rank b_l the resized layer holds the SVD cut dW_l(b_l) = U_b S_b V_b^T, the best rank-b_l
approximation (Eckart-Young), from `functional.svd_factors` (O((in + out) r^2), no SVD of dW). It is written
with the input's lora_alpha, alpha_pattern and rsLoRA setting, the scale c'_l = alpha_l / b_l (or / sqrt(b_l))
split evenly into both factors: A' = A_s[:b] / sqrt(c'), B' = B_s[:, :b] / sqrt(c'), so PEFT's c' B' A' is the cut.

The rank of each layer:
- `rank=b`: b in every layer (at most r_l: a layer of smaller r_l keeps r_l, its whole update);
- `sv_fro=F`: the smallest b_l with sqrt(sum_{i<b} S_i^2 / sum_i S_i^2) >= F (the kept Frobenius fraction);
- `sv_ratio=X`: every S_i >= S_0 / X;
- `params=N`: rank 1 everywhere, then components in order of their gain per parameter S_i^2 / (in_l + out_l)
  (the squared Frobenius error they remove, as `allocation`'s "norm"), across layers, until the next one does
  not fit: one global threshold on the gain, and sum_l b_l (in_l + out_l) <= N.
A layer whose update is all zero gets b_l = 1 (zero weights) under sv_fro, sv_ratio and params.

A DyLoRA run's adapter (with its `dylora_config.json` sidecar) is read at r_max with the sidecar's rank_scaling,
so c = lora_alpha / sqrt(r) under "alpha/sqrt(b)" (written with use_rslora). For a DyLoRA adapter `dylora export
--rank b` writes the trained rank-b prefix instead; `resize` cuts the r_max update by its singular values.
(This module is not named `resize.py`: a submodule named like the function `dylora.resize` would replace it on
the package once anything imported the submodule.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch

from .config import SIDECAR_NAME
from .files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, atomic_dir, read_json, read_weights, save_weights, write_json
from .functional import RANK_SCALINGS, check_rank, component_cost, svd_factors
from .model import MODULE_PREFIX, pattern_key

PAIRS = {"A.weight": "B.weight", "embedding_A": "embedding_B"}  # the lora_* tensors of Linear/Conv, Embedding
CUT_RULES = ("rank", "sv_fro", "sv_ratio", "params")
# init_lora_weights that change the base weights when PEFT loads the adapter: the update is not c B A alone
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
# LoraConfig fields that make an adapter more than plain LoRA, besides those PEFT tags as variants
NOT_PLAIN = ("use_dora", "use_qalora", "lora_bias", "target_parameters", "megatron_config")


class Layer(NamedTuple):
    """One layer's SVD cut: A_s (k x in), B_s (out x k), S (k) in float64 with k = r_l, and how to store it
    (each factor in its own dtype)."""

    a_key: str
    b_key: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    a_dtype: torch.dtype
    b_dtype: torch.dtype
    r: int
    alpha: float
    A_s: torch.Tensor
    B_s: torch.Tensor
    S: torch.Tensor

    @property
    def cost(self) -> int:
        """Adapter parameters per rank component: in + out (in = in_channels * prod(kernel) for a conv)."""
        return component_cost(self.A_s, self.B_s)


def _variant(config: Mapping[str, Any]) -> str | None:
    """The name of the first setting of `config` that makes it more than a plain LoRA, else None."""
    from peft import LoraConfig

    tagged = [f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("is_lora_variant")]
    for name in (*NOT_PLAIN, *tagged):
        if config.get(name):
            return f"{name}={config[name]!r}"
    init = config.get("init_lora_weights")
    inits = next((f.metadata.get("lora_variants", []) for f in dataclasses.fields(LoraConfig)
                  if f.name == "init_lora_weights"), [])
    if isinstance(init, str) and (init in inits or init.startswith(BASE_CHANGING_INITS)):
        return f"init_lora_weights={init!r}"
    return None


def check_config(config: Any, where: str = "adapter_config.json") -> None:
    """Refuse a config that is not a plain PEFT LoRA (another peft_type, DoRA or another variant, bad r/alpha)."""
    if not isinstance(config, Mapping):
        raise ValueError(f"corrupted {where}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where} has peft_type {config.get('peft_type')!r}: dylora resize reads LoRA adapters "
                         "(peft_type LORA) only")
    variant = _variant(config)
    if variant:
        raise ValueError(f"{where} is not a plain LoRA ({variant}): dylora resize cuts plain LoRA updates c B A "
                         "only (no DoRA, LoRA bias or other variant)")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"corrupted {where}: r must be an integer >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise ValueError(f"corrupted {where}: lora_alpha must be a finite number, got {alpha!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(name) or {}
        if not isinstance(pattern, Mapping):
            raise ValueError(f"corrupted {where}: {name} must be an object, got {config.get(name)!r}")
        for key, value in pattern.items():
            _check_pattern_entry(where, name, key, value)


def _check_pattern_entry(where: str, name: str, key: Any, value: Any) -> None:
    """Refuse a rank_pattern / alpha_pattern entry PEFT cannot use: a key that is not a regular expression
    (PEFT matches `(.*\\.)?(KEY)$`), a rank that is not an integer >= 1, an alpha that is not a finite number."""
    try:
        re.compile(rf"(.*\.)?({key})$")
    except (re.error, TypeError) as err:
        raise ValueError(f"corrupted {where}: {name} key {key!r} is not a valid regular expression ({err})") from None
    if name == "rank_pattern" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"corrupted {where}: rank_pattern[{key!r}] must be an integer >= 1, got {value!r}")
    if name == "alpha_pattern" and (isinstance(value, bool) or not isinstance(value, int | float)
                                    or not math.isfinite(value)):
        raise ValueError(f"corrupted {where}: alpha_pattern[{key!r}] must be a finite number, got {value!r}")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one torch thread: the r x r LAPACK calls of the cut are too small to share, and on a
    busy machine the threads' synchronisation made them 250x slower (2 threads on a loaded 2-core CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's value for `module` in a rank_pattern / alpha_pattern (peft.utils.other.get_pattern_key)."""
    from peft.utils.other import get_pattern_key

    return pattern.get(get_pattern_key(list(pattern), module), default)


def layer_cuts(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], *,
               rank_scaling: str | None = None) -> dict[str, Layer]:
    """{module name: its SVD cut} for every LoRA layer of `state`, checked against `config`.

    `rank_scaling` "alpha/sqrt(b)" (a DyLoRA sidecar's) reads c = alpha / sqrt(r) as use_rslora does.
    """
    check_config(config)
    if rank_scaling is not None and rank_scaling not in RANK_SCALINGS:
        raise ValueError(f"rank_scaling must be one of {', '.join(RANK_SCALINGS)}, got {rank_scaling!r}")
    rslora = bool(config.get("use_rslora")) or rank_scaling == "alpha/sqrt(b)"
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    out: dict[str, Layer] = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"corrupted adapter: {key} is not a tensor")
        if "lora_magnitude_vector" in key:
            raise ValueError(f"{key}: a DoRA adapter (lora_magnitude_vector); dylora resize cuts plain LoRA only")
        module, dot, part = key.rpartition(".lora_")
        if not dot:
            continue  # modules_to_save, trainable tokens: copied as they are
        if part in PAIRS.values():
            if f"{module}.lora_{next(a for a, b in PAIRS.items() if b == part)}" not in state:
                raise ValueError(f"corrupted adapter: {key} has no matching lora_A")
            continue
        if part not in PAIRS:
            raise ValueError(f"{key}: an unknown LoRA tensor (lora_{part}); dylora resize cuts plain LoRA "
                             f"(lora_A/lora_B, lora_embedding_A/B) only")
        b_key = f"{module}.lora_{PAIRS[part]}"
        A, B = t, state.get(b_key)
        if B is None:
            raise ValueError(f"corrupted adapter: {key} has no matching {b_key.rpartition('.lora_')[2]}")
        name = module.removeprefix(MODULE_PREFIX)
        _check_pair(name, A, B, part == "A.weight")
        r = _pattern_value(ranks, name, config["r"])
        alpha = _pattern_value(alphas, name, config["lora_alpha"])
        if A.shape[0] != r:
            raise ValueError(f"corrupted adapter: {name} has rank {A.shape[0]} in its weights but {r} in "
                             f"adapter_config.json (r / rank_pattern)")
        coefficient = alpha / (math.sqrt(r) if rslora else r)
        with one_thread():
            A_s, B_s, S = svd_factors(A.reshape(r, -1), B.reshape(B.shape[0], r), coefficient)
        out[module] = Layer(key, b_key, tuple(A.shape), tuple(B.shape), A.dtype, B.dtype, r, float(alpha), A_s, B_s,
                            S)
    if not out:
        raise ValueError("the adapter holds no LoRA weights (no lora_A / lora_embedding_A tensors)")
    return out


def _check_pair(name: str, A: torch.Tensor, B: torch.Tensor, weight: bool) -> None:
    """Refuse a lora_A / lora_B pair whose shapes do not make a LoRA update, or whose values are not finite."""
    for which, t in (("lora_A", A), ("lora_B", B)):
        if not t.is_floating_point():
            raise ValueError(f"corrupted adapter: {name}.{which} has dtype {t.dtype}, not a floating point type")
        if not torch.isfinite(t).all():
            raise ValueError(f"corrupted adapter: {name}.{which} holds non-finite values (NaN or inf)")
    fits = A.dim() >= 2 and B.dim() == (A.dim() if weight else 2) and B.shape[1] == A.shape[0] \
        and all(d == 1 for d in B.shape[2:]) and A.shape[0] >= 1
    if not fits:
        grouped = " (a grouped convolution, which resize does not support)" if (
            A.dim() > 2 and B.dim() == A.dim() and 0 < B.shape[1] < A.shape[0]) else ""
        raise ValueError(f"corrupted adapter: the shapes of {name}'s lora_A {tuple(A.shape)} and lora_B "
                         f"{tuple(B.shape)} do not fit (A is (r, in, ...), B is (out, r, 1, ...)){grouped}")


def _one_method(rank: Any, sv_fro: Any, sv_ratio: Any, params: Any) -> tuple[str, Any]:
    """(method, value) of the one given, checked: F in (0, 1], X >= 1, N an integer >= 1 (the rank later, against r)."""
    given = [(m, v) for m, v in zip(CUT_RULES, (rank, sv_fro, sv_ratio, params), strict=True) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(CUT_RULES)}; got {', '.join(m for m, _ in given) or 'none'}")
    method, value = given[0]
    number = not isinstance(value, bool) and isinstance(value, int | float)
    if method == "params" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{method} must be an integer >= 1, got {value!r}")
    if method == "sv_fro" and not (number and 0 < value <= 1):
        raise ValueError(f"sv_fro must lie in (0, 1] (the fraction of each layer's Frobenius norm kept), got "
                         f"{value!r}")
    if method == "sv_ratio" and not (number and value >= 1):
        raise ValueError(f"sv_ratio must be a number >= 1 (keep S_i >= S_0 / sv_ratio), got {value!r}")
    return method, value


def choose_ranks(cuts: Mapping[str, Layer], method: str, value: Any) -> dict[str, int]:
    """b_l for every layer, from its singular values (see the module docstring for each method)."""
    if method == "rank":
        check_rank(value, 1, max(layer.r for layer in cuts.values()))
        return {m: min(value, layer.r) for m, layer in cuts.items()}
    if method == "params":
        return _params_ranks(cuts, value)
    ranks = {}
    for m, layer in cuts.items():
        S = layer.S
        if S[0] == 0:
            ranks[m] = 1  # an all-zero update: the smallest rank, zero weights
        elif method == "sv_fro":
            energy = torch.cumsum(S**2, 0)
            ranks[m] = int(torch.nonzero(torch.sqrt(energy / energy[-1]) >= value)[0]) + 1
        else:
            ranks[m] = int((S >= S[0] / value).sum())
    return ranks


def _params_ranks(cuts: Mapping[str, Layer], params: int) -> dict[str, int]:
    """Rank 1 everywhere, then components by gain S_i^2 / cost, largest first, until the next does not fit."""
    floor = sum(layer.cost for layer in cuts.values())
    if params < floor:
        raise ValueError(f"params {params} is too small: rank 1 in every layer takes {floor} parameters; give "
                         f"params >= {floor}")
    ranks = dict.fromkeys(cuts, 1)
    candidates = sorted(((-float(s) ** 2 / layer.cost, n, i, m) for n, (m, layer) in enumerate(cuts.items())
                         for i, s in enumerate(layer.S.tolist()) if i >= 1 and s > 0))
    left = params - floor
    for _, _, _, m in candidates:
        if cuts[m].cost > left:
            break
        ranks[m] += 1
        left -= cuts[m].cost
    return ranks


def kept_fraction(cuts: Mapping[str, Layer], ranks: Mapping[str, int]) -> tuple[float, dict[str, float]]:
    """(overall, per layer) ||dW(b)||_F / ||dW||_F: the Frobenius fraction the cut keeps (1 for a zero update)."""
    per, kept, total = {}, 0.0, 0.0
    for m, layer in cuts.items():
        energy = (layer.S**2).sum().item()
        k = (layer.S[:ranks[m]] ** 2).sum().item()
        per[m] = math.sqrt(k / energy) if energy > 0 else 1.0
        kept, total = kept + k, total + energy
    return (math.sqrt(kept / total) if total > 0 else 1.0), per


class Resized(NamedTuple):
    """A resized adapter: its config and tensors, {module: b_l}, the kept Frobenius fraction (overall and the
    least of any layer) and its parameters."""

    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    ranks: dict[str, int]
    kept: float
    kept_min: float
    params: int


def _resize(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], method: str, value: Any,
            rank_scaling: str | None) -> Resized:
    """`resize_state_dict`, with what the model card says."""
    cuts = layer_cuts(config, state, rank_scaling=rank_scaling)
    ranks = choose_ranks(cuts, method, value)
    rslora = bool(config.get("use_rslora")) or rank_scaling == "alpha/sqrt(b)"
    written = {key for cut in cuts.values() for key in (cut.a_key, cut.b_key)}
    new_state = {k: t for k, t in state.items() if k not in written}
    for m, cut in cuts.items():
        b = ranks[m]
        root = math.sqrt(abs(cut.alpha) / (math.sqrt(b) if rslora else b)) or 1.0  # alpha 0: PEFT's scale is 0
        sign = -1.0 if cut.alpha < 0 else 1.0
        A = (cut.A_s[:b] / root).reshape(b, *cut.a_shape[1:])
        B = (cut.B_s[:, :b] * (sign / root)).reshape(cut.b_shape[0], b, *cut.b_shape[2:])
        new_state[cut.a_key], new_state[cut.b_key] = _in_dtypes(m.removeprefix(MODULE_PREFIX), A, B, cut.a_dtype,
                                                                cut.b_dtype)
    r_out = max(ranks.values())
    out = dict(config)
    out.update(r=r_out, use_rslora=rslora, alpha_pattern=dict(config.get("alpha_pattern") or {}),
               rank_pattern={pattern_key(m): b for m, b in ranks.items() if b != r_out})
    kept, per_layer = kept_fraction(cuts, ranks)
    return Resized(out, new_state, {m.removeprefix(MODULE_PREFIX): b for m, b in ranks.items()}, kept,
                   min(per_layer.values()), sum(b * cuts[m].cost for m, b in ranks.items()))


def _in_dtypes(name: str, A: torch.Tensor, B: torch.Tensor, a_dtype: torch.dtype, b_dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 factors A, B of a cut in their own dtypes (lora_A's, lora_B's). Where one would not fit its
    dtype (fp16 tops out at 65504), the scale is split otherwise between them (A k, B / k: the same update B A)
    so that both use the same fraction of their range; a cut that fits no split is refused, never written inf."""
    def cast(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        a, b = a.to(a_dtype).contiguous(), b.to(b_dtype).contiguous()
        return (a, b) if bool(torch.isfinite(a).all() and torch.isfinite(b).all()) else None

    done = cast(A, B)
    a_max, b_max = A.abs().max().item(), B.abs().max().item()
    if done is None and a_max > 0 and b_max > 0:
        fa, fb = torch.finfo(a_dtype).max, torch.finfo(b_dtype).max
        k = math.sqrt((b_max / fb) / (a_max / fa))
        done = cast(A * k, B / k)
    if done is None:
        raise ValueError(f"{name}: the cut does not fit the adapter's dtypes (lora_A {a_dtype}, lora_B {b_dtype}; its "
                         f"largest values {a_max:.3g} and {b_max:.3g}): nothing written; convert the adapter to "
                         "float32 first")
    return done


def resize_state_dict(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], *, rank: int | None = None,
                      sv_fro: float | None = None, sv_ratio: float | None = None, params: int | None = None,
                      rank_scaling: str | None = None
                      ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, int]]:
    """(adapter config, state dict, {module: b_l}) of the SVD cut of a PEFT LoRA at the ranks one method gives.

    `config` is an adapter_config.json dict, `state` its adapter_model.safetensors tensors; give exactly one of
    `rank`, `sv_fro`, `sv_ratio`, `params`. The result is a plain PEFT LoRA (`rank_pattern` where ranks
    differ) whose output in every layer is the best rank-b_l approximation of the input's update.
    """
    method, value = _one_method(rank, sv_fro, sv_ratio, params)
    done = _resize(config, state, method, value, rank_scaling)
    return done.config, done.state, done.ranks


def read_adapter(adapter_dir: str | os.PathLike
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor], str | None]:
    """(config, tensors, DyLoRA rank_scaling or None) of a PEFT LoRA adapter directory, with one-line errors."""
    path = Path(adapter_dir)
    if not (path / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{path} is not a PEFT adapter directory: it has no {ADAPTER_CONFIG}")
    config = read_json(path / ADAPTER_CONFIG)
    check_config(config, str(path / ADAPTER_CONFIG))
    try:
        state = read_weights(path / ADAPTER_WEIGHTS)
    except FileNotFoundError:
        raise ValueError(f"{path} has no {ADAPTER_WEIGHTS}: dylora resize reads safetensors adapters only") from None
    scaling = None
    if (path / SIDECAR_NAME).is_file():
        sidecar = read_json(path / SIDECAR_NAME)
        scaling = sidecar.get("rank_scaling", "alpha/b") if isinstance(sidecar, Mapping) else None
        if scaling not in RANK_SCALINGS:
            raise ValueError(f"corrupted adapter file {path / SIDECAR_NAME}: rank_scaling must be one of "
                             f"{', '.join(RANK_SCALINGS)}")
    return config, state, scaling


def _summary(ranks: Mapping[str, int]) -> str:
    values = sorted(ranks.values())
    return (f"{len(values)} layers, b_l from {values[0]} to {values[-1]} (mean {sum(values) / len(values):.2f}, "
            f"median {values[len(values) // 2]})")


def _check_out(source: Path, out: Path) -> None:
    """Refuse an `out` that is the adapter directory read, lies inside it or holds it: resize never writes over
    its own input, even with overwrite."""
    src, dst = source.resolve(), out.resolve()
    where = ("is the adapter directory it reads" if dst == src else "lies inside the adapter directory it reads"
             if src in dst.parents else "holds the adapter directory it reads" if dst in src.parents else None)
    if where:
        raise ValueError(f"out {out} {where} ({source}): resize never writes over its own input; choose another "
                         "output directory")


def resize(adapter_dir: str | os.PathLike, out: str | os.PathLike, *, rank: int | None = None,
           sv_fro: float | None = None, sv_ratio: float | None = None, params: int | None = None,
           overwrite: bool = False, command: str | list[str] | None = None) -> Path:
    """Write the SVD cut of the PEFT LoRA in `adapter_dir` to `out` as a plain PEFT LoRA with a model card.

    One of `rank` (b in every layer), `sv_fro`, `sv_ratio` or `params` (per-layer ranks); see
    `resize_state_dict`. Nothing is written unless it all succeeds; `out` must not exist unless `overwrite`.
    """
    from .cards import write_card

    method, value = _one_method(rank, sv_fro, sv_ratio, params)
    out = Path(out)
    _check_out(Path(adapter_dir), out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass overwrite=True to replace it")
    config, state, scaling = read_adapter(adapter_dir)
    done = _resize(config, state, method, value, scaling)
    new_config, ranks = done.config, done.ranks
    cuts_r = max(_pattern_value(config.get("rank_pattern") or {}, m, config["r"]) for m in ranks)
    card_config = SimpleNamespace(r=cuts_r, lora_alpha=new_config["lora_alpha"],
                                  rank_scaling="alpha/sqrt(b)" if new_config["use_rslora"] else "alpha/b",
                                  target_modules=new_config.get("target_modules"),
                                  base_model_name_or_path=new_config.get("base_model_name_or_path"))
    one = len(set(ranks.values())) == 1 and method == "rank"
    option = method.replace("_", "-")
    facts = {"source": f"`{Path(adapter_dir)}`" + (" (a DyLoRA adapter at r_max)" if scaling else ""),
             "method": f"SVD cut (best rank-b_l approximation of each layer's update), --{option} {value}",
             "ranks": _summary(ranks),
             "kept": f"{done.kept:.4f} of the update's Frobenius norm (sqrt of kept / total squared singular values; "
                     f"at least {done.kept_min:.4f} in every layer)",
             "params": f"{done.params:,} (sum of b_l (in_l + out_l))"}
    with atomic_dir(out, overwrite=overwrite) as tmp:  # published last, never over a directory that appeared
        write_json(tmp / ADAPTER_CONFIG, new_config, sort_keys=True)
        save_weights(done.state, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        write_card(tmp, card_config, rank=next(iter(ranks.values())) if one else ranks, command=command,
                   resize=facts)
    return out
