"""DyLoRA as a PEFT LoRA *variant*: PEFT's own LoRA layers, with a forward and merge at rank b.

PEFT's `Linear` (which also wraps GPT-2's `Conv1D` through `fan_in_fan_out`), `Embedding` and `Conv1d/2d/3d`
layers call `lora_variant[adapter].forward/merge/unmerge` when an adapter has a variant. Attaching a
`DyLoraLinearVariant`, `DyLoraEmbeddingVariant` or `DyLoraConvVariant` to an adapter is all DyLoRA adds:
injection, saving, adapter switching and disabling stay PEFT's. All the math comes from `dylora.functional`.

Each variant owns its layer's rank state (`RankState`: one rank, a rank per example, or the expected scale;
in the prefix or the SVD basis) and answers for it: its factors as matrices (`factors`), its parameters per
rank component (`cost`), its update at a rank and basis (`update`, `delta_weight`), and the factors of a
plain rank-b LoRA that reproduce it (`rank_factors`). Everything else asks the variant.

The scale buffer is a (r,) vector for one rank (or the expected scale), or a (batch, r) matrix for one rank
per example. Setting a rank puts fresh tensors in the buffers rather than writing in place, so the graph of
an earlier pass of the same step (a sandwich recipe) keeps the scale it saved for its backward.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora import layer as lora_layer
from peft.tuners.lora.layer import LoraVariant
from peft.utils.other import transpose

from .functional import (
    broadcast_scale,
    check_rank,
    component_cost,
    example_scale,
    expected_scale,
    grad_mask,
    keep_grad,
    prefix_mask,
    rank_coefficient,
    rank_delta_weight,
    rank_scale,
    scale_table,
    svd_mixers,
)

SCALE_BUFFERS = "dylora_rank_scale"
GRAD_BUFFERS = "dylora_grad_mask"
BASES = ("prefix", "svd")


def check_basis(basis: str) -> str:
    """Return `basis` if it is one of BASES, else raise a ValueError naming them."""
    if basis not in BASES:
        raise ValueError(f"basis must be one of {', '.join(BASES)}, got {basis!r}")
    return basis


@dataclass(frozen=True)
class RankState:
    """What a layer's forward uses: one rank `rank` (0 = off), a rank per row `rows`, or the expected scale
    of `pmf` (over [r_min, r]); in the `basis` "prefix" (the first b components as trained) or "svd" (the best
    rank-b approximation of the full update)."""

    rank: int | None = None
    rows: tuple[int, ...] | None = None
    pmf: tuple[float, ...] | None = None
    basis: str = "prefix"

    @property
    def kind(self) -> str:
        return "rows" if self.rows is not None else "expected" if self.pmf is not None else "rank"


class DyLoraVariant(LoraVariant):
    """Per (layer, adapter) DyLoRA state: the rank state, frozen mode, and what is merged in, if anything."""

    def __init__(self, r: int, r_min: int, lora_alpha: float, frozen: bool, rank_scaling: str = "alpha/b") -> None:
        self.r, self.r_min, self.lora_alpha, self.frozen = r, r_min, lora_alpha, frozen
        self.rank_scaling = rank_scaling
        self.state = RankState(rank=r)
        self.merged: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None] | None = None
        self.table = scale_table(r, lora_alpha, rank_scaling)  # row b-1 is s_b
        self.masks = torch.tril(torch.ones(r, r))  # row b-1 is m_b, the SVD basis's mask
        self._svd_key: tuple | None = None
        self._svd_of: tuple[torch.Tensor, torch.Tensor] | None = None  # copies of the A, B the cache was made from
        self._svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._cast: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def rank(self) -> int | None:
        """The one rank every row uses, or None for per-example ranks / the expected scale."""
        return self.state.rank

    def supports_lora_conversion(self) -> bool:
        return False

    def attach(self, module: lora_layer.LoraLayer, adapter: str, device: torch.device) -> None:
        for name in (SCALE_BUFFERS, GRAD_BUFFERS):
            if not hasattr(module, name):
                setattr(module, name, BufferDict(persistent=False))
        # PEFT's delete_adapter drops an adapter's key from every container named here
        names = module.other_param_names
        module.other_param_names = (*names, *(n for n in (SCALE_BUFFERS, GRAD_BUFFERS) if n not in names))
        module.get_delta_weight = types.MethodType(_get_delta_weight, module)
        getattr(module, SCALE_BUFFERS)[adapter] = torch.zeros(self.r, device=device)
        getattr(module, GRAD_BUFFERS)[adapter] = torch.zeros(self.r, device=device)
        module.lora_variant[adapter] = self
        self.set_state(module, adapter, RankState(rank=self.r))

    # ------------------------------------------------------------ the rank state

    def set_state(self, module: lora_layer.LoraLayer, adapter: str, state: RankState) -> None:
        """Use `state` in the next forwards (ranks checked against [r_min, r]; 0 = off for one rank)."""
        check_basis(state.basis)
        svd = state.basis == "svd"
        if state.kind == "rank":
            check_rank(state.rank, self.r_min, self.r, off=True)
            scale = prefix_mask(state.rank, self.r) if svd else rank_scale(state.rank, self.r, self.lora_alpha,
                                                                            scaling=self.rank_scaling)
            self._put(module, adapter, scale, grad_mask(state.rank, self.r))
            # PEFT code paths that bypass variants read `scaling`
            module.scaling[adapter] = rank_coefficient(state.rank, self.lora_alpha, self.rank_scaling)
        elif state.kind == "rows":
            self._put(module, adapter, example_scale(torch.tensor(state.rows), self.masks if svd else self.table))
        else:
            if svd:
                raise ValueError("the expected scale (the nested recipe) is defined in the prefix basis only")
            self._put(module, adapter, expected_scale(torch.tensor(state.pmf), self.r_min, self.table))
        self.state = state

    def set_rank(self, module: lora_layer.LoraLayer, adapter: str, rank: int, basis: str = "prefix") -> None:
        self.set_state(module, adapter, RankState(rank=rank, basis=basis))

    @staticmethod
    def _put(module: lora_layer.LoraLayer, adapter: str, scale: torch.Tensor,
             gmask: torch.Tensor | None = None) -> None:
        old = getattr(module, SCALE_BUFFERS)[adapter]
        getattr(module, SCALE_BUFFERS)[adapter] = scale.to(device=old.device, dtype=old.dtype)
        if gmask is not None:
            old = getattr(module, GRAD_BUFFERS)[adapter]
            getattr(module, GRAD_BUFFERS)[adapter] = gmask.to(device=old.device, dtype=old.dtype)

    @staticmethod
    def buffers(module: lora_layer.LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(module, SCALE_BUFFERS)[adapter], getattr(module, GRAD_BUFFERS)[adapter]

    # ------------------------------------------------------------ the contract: factors, cost, update

    def params(self, module: lora_layer.LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's A and B parameters, in their own shapes."""
        return module.lora_A[adapter].weight, module.lora_B[adapter].weight

    def factors(self, module: lora_layer.LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A as an (r, in) matrix and B as an (out, r) matrix (views of the parameters): the update is B A."""
        A, B = self.params(module, adapter)
        return A.flatten(1), B.flatten(1)

    def cost(self, module: lora_layer.LoraLayer, adapter: str) -> int:
        """Adapter parameters per rank component, in + out: the layer at rank b holds b times this."""
        return component_cost(*self.params(module, adapter))

    def svd(self, module: lora_layer.LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(M_in, M_out, S) of the SVD cut of c(r) B A (`functional.svd_mixers`), float64, computed once and
        again only when A or B changed: their storage, or any value (compared with a copy kept of them, since
        a write through `.data` or `load_state_dict` into a `.data` view bumps no version counter A shows)."""
        A, B = self.factors(module, adapter)
        key = (A.data_ptr(), B.data_ptr(), A.device, A.dtype, B.dtype, A.shape, B.shape, self.lora_alpha)
        seen = self._svd_of
        if key != self._svd_key or seen is None or not (torch.equal(A, seen[0]) and torch.equal(B, seen[1])):
            self._svd = svd_mixers(A, B, rank_coefficient(self.r, self.lora_alpha, self.rank_scaling))
            self._svd_key, self._svd_of, self._cast = key, (A.detach().clone(), B.detach().clone()), {}
        return self._svd

    def mixers(self, module: lora_layer.LoraLayer, adapter: str, like: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(M_in, M_out) cast like `like` in the SVD basis, None in the prefix basis (no mixing)."""
        if self.state.basis != "svd":
            return None
        m_in, m_out, _ = self.svd(module, adapter)
        key = (like.dtype, like.device)
        if key not in self._cast:
            self._cast[key] = (m_in.to(like), m_out.to(like))
        return self._cast[key]

    def forward_inputs(self, module: lora_layer.LoraLayer, adapter: str, x: torch.Tensor) -> tuple:
        """What a forward of PEFT's lora_A / lora_B modules needs: (lora_A, lora_B, scale, gradient mask, mixers,
        x after LoRA dropout)."""
        lora_A = module.lora_A[adapter]
        scale, gmask = self.buffers(module, adapter)
        return (lora_A, module.lora_B[adapter], scale, gmask, self.mixers(module, adapter, lora_A.weight),
                module.lora_dropout[adapter](x))

    def update(self, module: lora_layer.LoraLayer, adapter: str, snapshot: tuple | None = None) -> torch.Tensor:
        """The layer's update as an (out, in) float32 matrix, B M_out diag(scale) M_in A, at the current rank
        state or at a `_snapshot` of one (what merge recorded)."""
        A, B = (t.detach().float() for t in self.factors(module, adapter))
        scale, mixers = snapshot or (self.buffers(module, adapter)[0], self.mixers(module, adapter, A))
        if mixers is not None:
            A, B = mixers[0].float() @ A, B @ mixers[1].float()
        return rank_delta_weight(A, B, scale.detach().float().to(A.device))

    def delta_weight(self, module: lora_layer.LoraLayer, adapter: str, snapshot: tuple | None = None
                     ) -> torch.Tensor:
        """`update`, shaped like the base layer's weight (the identity for nn.Linear)."""
        return self.update(module, adapter, snapshot)

    def rank_factors(self, module: lora_layer.LoraLayer, adapter: str, rank: int, basis: str = "prefix"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_b, B_b) shaped like the layer's own A and B with b components, such that c(b) B_b A_b is the
        update at rank b in `basis`: what a plain PEFT LoRA of rank b (scale c(b)) holds."""
        A, B = self.factors(module, adapter)
        if check_basis(basis) == "prefix":
            A_b, B_b = A[:rank], B[:, :rank]
        else:
            m_in, m_out, _ = self.svd(module, adapter)
            coefficient = rank_coefficient(rank, self.lora_alpha, self.rank_scaling)
            A_b = (m_in[:rank] @ A.detach().double()).to(A.dtype)
            B_b = (B.detach().double() @ m_out[:, :rank] / coefficient).to(B.dtype)
        return self._native(module, adapter, A_b.detach().contiguous(), B_b.detach().contiguous())

    def _native(self, module: lora_layer.LoraLayer, adapter: str, A_b: torch.Tensor, B_b: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Matrices (b, in) and (out, b) back in the layer's own shapes (the identity for Linear, Embedding)."""
        return A_b, B_b

    # ------------------------------------------------------------ merging: what merge added, unmerge removes

    def _snapshot(self, module: lora_layer.LoraLayer, adapter: str, like: torch.Tensor) -> tuple:
        """(scale, mixers or None) of the current rank state, copied: what `update` needs to redo it."""
        scale = self.buffers(module, adapter)[0].detach().clone()
        mixers = self.mixers(module, adapter, like.float())
        return scale, None if mixers is None else (mixers[0].clone(), mixers[1].clone())

    def merge_safe(self, module, active_adapter, orig_weight):
        self.merged = self._snapshot(module, active_adapter, orig_weight)
        return orig_weight + self.delta_weight(module, active_adapter, self.merged).to(orig_weight.dtype)

    def merge_unsafe(self, module, active_adapter, orig_weight):
        self.merged = self._snapshot(module, active_adapter, orig_weight)
        orig_weight.data += self.delta_weight(module, active_adapter, self.merged).to(orig_weight.dtype)

    def unmerge(self, module, active_adapter, orig_weight):
        if self.merged is None:
            raise RuntimeError("DyLoRA adapter is not merged; nothing to unmerge")
        delta = self.delta_weight(module, active_adapter, self.merged)
        self.merged = None
        return orig_weight.data - delta.to(orig_weight.dtype)

    # ------------------------------------------------------------ forward helpers

    def _mix(self, h: torch.Tensor, scale: torch.Tensor, mixers: tuple[torch.Tensor, torch.Tensor] | None
             ) -> torch.Tensor:
        """The rank activation h (..., r) -> M_out (scale * (M_in h)) (just scale * h in the prefix basis)."""
        if mixers is None:
            return h * broadcast_scale(scale, h).to(h.dtype)
        h = F.linear(h, mixers[0].to(h.dtype))
        h = h * broadcast_scale(scale, h).to(h.dtype)
        return F.linear(h, mixers[1].to(h.dtype))


def _get_delta_weight(self: lora_layer.LoraLayer, adapter: str) -> torch.Tensor:
    """PEFT's `get_delta_weight`, at the current rank and basis for a DyLoRA adapter (PEFT's own ignores the
    rank: add_weighted_adapter and other callers would get the r_max update)."""
    variant = self.lora_variant.get(adapter)
    if isinstance(variant, DyLoraVariant):
        return variant.delta_weight(self, adapter).to(variant.params(self, adapter)[1].dtype)
    return type(self).get_delta_weight(self, adapter)


class DyLoraLinearVariant(DyLoraVariant):
    """DyLoRA on PEFT's `lora.Linear` (nn.Linear, and GPT-2 Conv1D with fan_in_fan_out)."""

    def delta_weight(self, module, adapter, snapshot=None):
        return transpose(self.update(module, adapter, snapshot), module.fan_in_fan_out)

    def forward(self, module, active_adapter, x, result, **kwargs):
        lora_A, lora_B, scale, gmask, mixers, x = self.forward_inputs(module, active_adapter, x)
        if not self.frozen:
            return result + lora_B(self._mix(lora_A(x), scale, mixers))
        A = keep_grad(lora_A.weight, gmask[:, None])
        B = keep_grad(lora_B.weight, gmask[None, :])
        return result + F.linear(self._mix(F.linear(x, A), scale, mixers), B)


class DyLoraEmbeddingVariant(DyLoraVariant):
    """DyLoRA on PEFT's `lora.Embedding` (A is (r, num_embeddings), B is (embedding_dim, r))."""

    def attach(self, module, adapter, device):
        super().attach(module, adapter, device)
        module._mixed_batch_forward = types.MethodType(_embedding_mixed_batch_forward, module)

    def params(self, module, adapter):
        return module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]

    def delta_weight(self, module, adapter, snapshot=None):
        return transpose(self.update(module, adapter, snapshot), True)

    def forward(self, module, active_adapter, x, result, **kwargs):
        A = module.lora_embedding_A[active_adapter]
        B = module.lora_embedding_B[active_adapter]
        scale, gmask = self.buffers(module, active_adapter)
        mixers = self.mixers(module, active_adapter, A)
        if self.frozen:
            A = keep_grad(A, gmask[:, None])
            B = keep_grad(B, gmask[None, :])
        out = self._mix(module._embed(x, A.T), scale, mixers) @ B.T
        embed_scale = module._get_embed_scale()
        if embed_scale is not None:
            out = out * embed_scale.to(out.dtype)
        return result + out


def _embedding_mixed_batch_forward(self: lora_layer.Embedding, x: torch.Tensor, *args, adapter_names: list[str],
                                   **kwargs) -> torch.Tensor:
    """PEFT's mixed-batch forward of an Embedding, through the variant for DyLoRA adapters (PEFT's own
    bypasses variants, so it would use all r components at any rank)."""
    result = self.base_layer(x, *args, **kwargs)
    embed_scale = self._get_embed_scale()
    for adapter in sorted(set(adapter_names)):
        if adapter == "__base__" or adapter not in self.lora_embedding_A:
            continue
        rows = [i for i, name in enumerate(adapter_names) if name == adapter]
        variant = self.lora_variant.get(adapter)
        if variant is not None:
            result[rows] = variant.forward(self, adapter, x[rows], result[rows])
            continue
        out = (self._embed(x[rows], self.lora_embedding_A[adapter].T) @ self.lora_embedding_B[adapter].T) \
            * self.scaling[adapter]
        if embed_scale is not None:
            out = out * embed_scale.to(out.dtype)
        result[rows] += out
    return result


class DyLoraConvVariant(DyLoraVariant):
    """DyLoRA on PEFT's `lora.Conv1d/2d/3d` (groups = 1).

    A is a conv with the layer's kernel, stride and padding and r out-channels, B a 1x1 conv from r channels:
    the rank mask s_b multiplies the r channels between them, so at rank b the output is
    conv(x, W0) + c(b) conv(conv(x, A[:b]), B[:, :b]), and the delta weight is c(b) B_b A_b over the channel
    dims, shaped like W0 (delta[o, i, ...] = sum_{j<b} c(b) B[o, j] A[j, i, ...]).
    """

    def delta_weight(self, module, adapter, snapshot=None):
        A, B = self.params(module, adapter)  # (r, in, *kernel), (out, r, 1, ...)
        return self.update(module, adapter, snapshot).view(B.shape[0], *A.shape[1:])

    def _native(self, module, adapter, A_b, B_b):
        A, B = self.params(module, adapter)
        return A_b.view(A_b.shape[0], *A.shape[1:]), B_b.view(B.shape[0], B_b.shape[1], *B.shape[2:])

    def forward(self, module, active_adapter, x, result, **kwargs):
        lora_A, lora_B, scale, gmask, mixers, x = self.forward_inputs(module, active_adapter, x)
        if self.frozen:
            kernel = (1,) * (lora_A.weight.dim() - 2)
            h = lora_A._conv_forward(x, keep_grad(lora_A.weight, gmask.view(-1, 1, *kernel)), None)
        else:
            h = lora_A(x)
        h = self._mix(h.movedim(1, -1), scale, mixers).movedim(-1, 1)  # channels last, where the rank dim goes
        if self.frozen:
            kernel = (1,) * (lora_B.weight.dim() - 2)
            return result + lora_B._conv_forward(h, keep_grad(lora_B.weight, gmask.view(1, -1, *kernel)), None)
        return result + lora_B(h)


def quantized_linear_layers() -> tuple[type, ...]:
    """PEFT's LoRA layers over bitsandbytes' `Linear4bit` / `Linear8bitLt` (empty without bitsandbytes).

    They call the variant's forward / merge_safe / unmerge exactly like `lora.Linear` (fan_in_fan_out False),
    dequantizing W0 for a merge, so DyLoRA's Linear variant serves them unchanged.
    """
    from peft.import_utils import is_bnb_4bit_available, is_bnb_available

    if not is_bnb_available():
        return ()
    from peft.tuners.lora import bnb as lora_bnb

    return (lora_bnb.Linear8bitLt, *((lora_bnb.Linear4bit,) if is_bnb_4bit_available() else ()))


def variant_for(module: torch.nn.Module) -> type[DyLoraVariant] | None:
    """The DyLoRA variant class for a PEFT LoRA layer, or None where DyLoRA has none."""
    if isinstance(module, lora_layer.Embedding):
        return DyLoraEmbeddingVariant
    if isinstance(module, (lora_layer.Linear, *quantized_linear_layers())):
        return DyLoraLinearVariant
    if isinstance(module, lora_layer._ConvNd) and module.get_base_layer().groups == 1:
        return DyLoraConvVariant
    return None


def set_layer_rank(module: lora_layer.LoraLayer, adapter: str, rank: int, basis: str = "prefix") -> None:
    """Use rank b in one layer (its variant checks b against [r_min, r]; b = 0 switches the layer off)."""
    module.lora_variant[adapter].set_rank(module, adapter, rank, basis)
