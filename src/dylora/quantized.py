"""Quantized bases (bitsandbytes `Linear4bit` / `Linear8bitLt`): QDyLoRA, DyLoRA on a 4-bit or 8-bit W0.

PEFT's bnb LoRA layers call the variant's forward, merge_safe and unmerge like `lora.Linear` does, so training,
every rank state, export and PEFT's own (requantizing) merge need nothing here. What this module adds is the
merge that does not requantize: each adapted layer becomes an `nn.Linear` in the compute dtype holding
dequant(W0) + c(b) B_b A_b, and every other quantized layer is dequantized too, so the merged model is a plain
model (PEFT's requantizing merge rounds the update into the 4-bit grid and loses part of it).
"""

from __future__ import annotations

import torch

BITS = ("4bit", "8bit")


def bnb_kind(layer: torch.nn.Module) -> str | None:
    """"4bit" or "8bit" for a bitsandbytes linear layer (its weight is `Params4bit` / `Int8Params`), else None."""
    weight = getattr(layer, "weight", None)
    name = type(weight).__name__
    return "4bit" if name == "Params4bit" else "8bit" if name == "Int8Params" else None


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether any layer of `model` holds a bitsandbytes-quantized weight."""
    return any(bnb_kind(m) for m in model.modules())


def compute_dtype(layer: torch.nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype a bitsandbytes layer computes in: a 4-bit layer's `compute_dtype`, else `default`."""
    dtype = getattr(layer, "compute_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else default


def unpack_cpu_weights(model: torch.nn.Module) -> int:
    """Put every 4-bit weight that bitsandbytes repacked for its CPU inference kernel back in the standard
    layout, and return how many it restored.

    On a CPU with AVX512-BF16, bitsandbytes repacks a `Linear4bit` weight on its first inference forward; its
    own state-dict save undoes that, but `dequantize_4bit` (and so PEFT's merge) reads the repacked bytes as
    if they were standard and returns a wrong W0.
    """
    import bitsandbytes.functional as bnb_functional

    inverse = getattr(bnb_functional, "_convert_weight_packed_for_cpu_inverse", None)
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if bnb_kind(module) == "4bit" and inverse is not None and getattr(state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = inverse(weight.data, state)
            if getattr(module, "quant_state", None) is not None:
                module.quant_state = weight.quant_state
            count += 1
    return count


def dequantized_weight(layer: torch.nn.Module) -> torch.Tensor:
    """W0 of a bitsandbytes layer as a float32 (out, in) matrix (bitsandbytes' own dequantization)."""
    from peft.utils.integrations import dequantize_bnb_weight

    unpack_cpu_weights(layer)
    state = getattr(layer, "state", None) if bnb_kind(layer) == "8bit" else None
    return dequantize_bnb_weight(layer.weight, state=state).float()


def dense_linear(layer: torch.nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> torch.nn.Linear:
    """An `nn.Linear` with `weight` (and the layer's bias) in `dtype`, on the layer's device."""
    out_features, in_features = weight.shape
    bias = getattr(layer, "bias", None)
    dense = torch.nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(weight.to(dtype))
        if bias is not None:
            dense.bias.copy_(bias.detach().to(dtype))
    dense.requires_grad_(False)
    return dense


def dequantize_layers(model: torch.nn.Module, default: torch.dtype) -> int:
    """Replace every bitsandbytes linear layer of `model` by its dense `nn.Linear` (in its compute dtype, else
    `default`), drop the model's quantization config, and return how many layers were replaced."""
    names = [name for name, module in model.named_modules() if bnb_kind(module)]
    for name in names:
        layer = model.get_submodule(name)
        model.set_submodule(name, dense_linear(layer, dequantized_weight(layer), compute_dtype(layer, default)))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return len(names)
