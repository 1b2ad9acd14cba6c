"""DyLoRA as a PEFT LoRA *variant*: PEFT's own LoRA layers, with a forward and merge at rank b.

PEFT's `Linear` (which also wraps GPT-2's `Conv1D` through `fan_in_fan_out`), `Embedding` and `Conv1d/2d/3d`
layers call `lora_variant[adapter].forward/merge/unmerge` when an adapter has a variant. Attaching a
`DyLoraLinearVariant`, `DyLoraEmbeddingVariant` or `DyLoraConvVariant` to an adapter is all DyLoRA adds:
injection, saving, adapter switching and disabling stay PEFT's. All the math comes from `dylora.functional`.

The scale buffer is a (r,) vector for one rank (or the expected scale), or a (batch, r) matrix for one rank
per example. Setting a rank puts fresh tensors in the buffers rather than writing in place, so the graph of
an earlier pass of the same step (a sandwich recipe) keeps the scale it saved for its backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora import layer as lora_layer
from peft.tuners.lora.layer import LoraVariant
from peft.utils.other import transpose

from .functional import (
    broadcast_scale,
    check_rank,
    example_scale,
    expected_scale,
    grad_mask,
    keep_grad,
    rank_coefficient,
    rank_delta_weight,
    rank_scale,
    scale_table,
)

SCALE_BUFFERS = "dylora_rank_scale"
GRAD_BUFFERS = "dylora_grad_mask"


class _DyLoraVariant(LoraVariant):
    """Per (layer, adapter) DyLoRA state: the current rank, frozen mode and the rank merged in, if any."""

    def __init__(self, r: int, r_min: int, lora_alpha: float, frozen: bool, rank_scaling: str = "alpha/b") -> None:
        self.r, self.r_min, self.lora_alpha, self.frozen = r, r_min, lora_alpha, frozen
        self.rank_scaling = rank_scaling
        self.rank = r
        self.merged_scale: torch.Tensor | None = None
        self.table = scale_table(r, lora_alpha, rank_scaling)  # row b-1 is s_b

    def supports_lora_conversion(self) -> bool:
        return False

    def attach(self, module: lora_layer.LoraLayer, adapter: str, device: torch.device) -> None:
        for name in (SCALE_BUFFERS, GRAD_BUFFERS):
            if not hasattr(module, name):
                setattr(module, name, BufferDict(persistent=False))
        getattr(module, SCALE_BUFFERS)[adapter] = torch.zeros(self.r, device=device)
        getattr(module, GRAD_BUFFERS)[adapter] = torch.zeros(self.r, device=device)
        module.lora_variant[adapter] = self
        self.set_rank(module, adapter, self.r)

    def set_rank(self, module: lora_layer.LoraLayer, adapter: str, rank: int) -> None:
        check_rank(rank, self.r_min, self.r, off=True)
        scale = rank_scale(rank, self.r, self.lora_alpha, scaling=self.rank_scaling)
        self._put(module, adapter, scale, grad_mask(rank, self.r))
        self.rank = rank
        # PEFT code paths that bypass variants (e.g. mixed-adapter batches of embeddings) read `scaling`
        module.scaling[adapter] = rank_coefficient(rank, self.lora_alpha, self.rank_scaling)

    def set_example_ranks(self, module: lora_layer.LoraLayer, adapter: str, ranks: torch.Tensor) -> None:
        """Row j of the next batches at rank ranks[j] (checked by the caller), until the next `set_rank`."""
        self._put(module, adapter, example_scale(ranks, self.table))

    def set_expected_scale(self, module: lora_layer.LoraLayer, adapter: str, pmf: torch.Tensor) -> None:
        """The scale E_b[s_b] for b ~ pmf over [r_min, r] (the nested recipe), until the next `set_rank`."""
        self._put(module, adapter, expected_scale(pmf, self.r_min, self.table))

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

    # merging: the delta at the current rank is recorded, so unmerge removes exactly what merge added
    def delta_weight(self, module: lora_layer.LoraLayer, adapter: str, scale: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def merge_safe(self, module, active_adapter, orig_weight):
        scale = self.buffers(module, active_adapter)[0].detach().clone()
        self.merged_scale = scale
        return orig_weight + self.delta_weight(module, active_adapter, scale).to(orig_weight.dtype)

    def merge_unsafe(self, module, active_adapter, orig_weight):
        scale = self.buffers(module, active_adapter)[0].detach().clone()
        self.merged_scale = scale
        orig_weight.data += self.delta_weight(module, active_adapter, scale).to(orig_weight.dtype)

    def unmerge(self, module, active_adapter, orig_weight):
        if self.merged_scale is None:
            raise RuntimeError("DyLoRA adapter is not merged; nothing to unmerge")
        delta = self.delta_weight(module, active_adapter, self.merged_scale)
        self.merged_scale = None
        return orig_weight.data - delta.to(orig_weight.dtype)


class DyLoraLinearVariant(_DyLoraVariant):
    """DyLoRA on PEFT's `lora.Linear` (nn.Linear, and GPT-2 Conv1D with fan_in_fan_out)."""

    def delta_weight(self, module, adapter, scale):
        A = module.lora_A[adapter].weight
        B = module.lora_B[adapter].weight
        return transpose(rank_delta_weight(A.float(), B.float(), scale), module.fan_in_fan_out)

    def forward(self, module, active_adapter, x, result, **kwargs):
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        scale, gmask = self.buffers(module, active_adapter)
        x = module.lora_dropout[active_adapter](x)
        if not self.frozen:
            h = lora_A(x)
            return result + lora_B(h * broadcast_scale(scale, h).to(x.dtype))
        A = keep_grad(lora_A.weight, gmask[:, None])
        B = keep_grad(lora_B.weight, gmask[None, :])
        h = F.linear(x, A)
        return result + F.linear(h * broadcast_scale(scale, h).to(x.dtype), B)


class DyLoraEmbeddingVariant(_DyLoraVariant):
    """DyLoRA on PEFT's `lora.Embedding` (A is (r, num_embeddings), B is (embedding_dim, r))."""

    def delta_weight(self, module, adapter, scale):
        A = module.lora_embedding_A[adapter]
        B = module.lora_embedding_B[adapter]
        return transpose(rank_delta_weight(A.float(), B.float(), scale), True)

    def forward(self, module, active_adapter, x, result, **kwargs):
        A = module.lora_embedding_A[active_adapter]
        B = module.lora_embedding_B[active_adapter]
        scale, gmask = self.buffers(module, active_adapter)
        if self.frozen:
            A = keep_grad(A, gmask[:, None])
            B = keep_grad(B, gmask[None, :])
        after_A = module._embed(x, A.T)
        after_A = after_A * broadcast_scale(scale, after_A).to(A.dtype)
        out = after_A @ B.T
        embed_scale = module._get_embed_scale()
        if embed_scale is not None:
            out = out * embed_scale.to(out.dtype)
        return result + out


class DyLoraConvVariant(_DyLoraVariant):
    """DyLoRA on PEFT's `lora.Conv1d/2d/3d` (groups = 1).

    A is a conv with the layer's kernel, stride and padding and r out-channels, B a 1x1 conv from r channels:
    the rank mask s_b multiplies the r channels between them, so at rank b the output is
    conv(x, W0) + c(b) conv(conv(x, A[:b]), B[:, :b]), and the delta weight is c(b) B_b A_b over the channel
    dims, shaped like W0 (delta[o, i, ...] = sum_{j<b} c(b) B[o, j] A[j, i, ...]).
    """

    def delta_weight(self, module, adapter, scale):
        A = module.lora_A[adapter].weight  # (r, in, *kernel)
        B = module.lora_B[adapter].weight  # (out, r, 1, ...)
        return rank_delta_weight(A.float().flatten(1), B.float().flatten(1), scale).view(B.shape[0], *A.shape[1:])

    def forward(self, module, active_adapter, x, result, **kwargs):
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        scale, gmask = self.buffers(module, active_adapter)
        x = module.lora_dropout[active_adapter](x)
        if self.frozen:
            kernel = (1,) * (lora_A.weight.dim() - 2)
            h = lora_A._conv_forward(x, keep_grad(lora_A.weight, gmask.view(-1, 1, *kernel)), None)
        else:
            h = lora_A(x)
        h = h.movedim(1, -1)  # channels last, where `broadcast_scale` puts the rank dim
        h = (h * broadcast_scale(scale, h).to(h.dtype)).movedim(-1, 1)
        if self.frozen:
            kernel = (1,) * (lora_B.weight.dim() - 2)
            return result + lora_B._conv_forward(h, keep_grad(lora_B.weight, gmask.view(1, -1, *kernel)), None)
        return result + lora_B(h)


def variant_for(module: torch.nn.Module) -> type[_DyLoraVariant] | None:
    """The DyLoRA variant class for a PEFT LoRA layer, or None where DyLoRA has none."""
    if isinstance(module, lora_layer.Embedding):
        return DyLoraEmbeddingVariant
    if isinstance(module, lora_layer.Linear):
        return DyLoraLinearVariant
    if isinstance(module, lora_layer._ConvNd) and module.get_base_layer().groups == 1:
        return DyLoraConvVariant
    return None


def set_layer_rank(module: lora_layer.LoraLayer, adapter: str, rank: int) -> None:
    """Use rank b in one layer (its variant checks b against [r_min, r]; b = 0 switches the layer off)."""
    module.lora_variant[adapter].set_rank(module, adapter, rank)
