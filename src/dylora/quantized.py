"""Quantized bases: QDyLoRA, DyLoRA on a 4-bit or 8-bit W0 (bitsandbytes `Linear4bit` / `Linear8bitLt`, or a
torchao weight-only quantized `nn.Linear`).

PEFT's LoRA layers over these call the variant's forward like `lora.Linear` does (bnb's call its merge too), so
training, every rank state, export and PEFT's own (requantizing) merge need nothing here. What this module adds
is the merge that does not requantize: each adapted layer becomes an `nn.Linear` in the compute dtype holding
dequant(W0) + c(b) B_b A_b, and every other quantized layer is dequantized too, so the merged model is a plain
model (PEFT's requantizing merge rounds the update into the 4-bit grid and loses part of it).
"""

from __future__ import annotations

import copy

import torch

BNB_PARAMS = {"Params4bit": "4bit", "Int8Params": "8bit"}  # bitsandbytes' parameter classes, by kind


def quant_kind(layer: torch.nn.Module) -> str | None:
    """"4bit" or "8bit" for a bitsandbytes linear layer (its weight is `Params4bit` / `Int8Params`), "torchao" for
    a layer whose weight is a torchao quantized tensor, else None."""
    weight = getattr(layer, "weight", None)
    if type(weight).__name__ in BNB_PARAMS:
        return BNB_PARAMS[type(weight).__name__]
    return "torchao" if type(weight).__module__.startswith("torchao.") else None


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether any layer of `model` holds a quantized weight (bitsandbytes or torchao)."""
    return any(quant_kind(m) for m in model.modules())


def compute_dtype(layer: torch.nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype a quantized layer computes in: a 4-bit layer's `compute_dtype`, a torchao weight's dtype, else
    `default`."""
    if quant_kind(layer) == "torchao":
        return layer.weight.dtype
    dtype = getattr(layer, "compute_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else default


def unpack_cpu_weights(model: torch.nn.Module) -> int:
    """Put every 4-bit weight that bitsandbytes repacked for its CPU inference kernel back in the standard
    layout (what PEFT's requantizing merge reads), and return how many it restored.

    On a CPU with AVX512-BF16, bitsandbytes repacks a `Linear4bit` weight on its first inference forward (its
    absmax rounded to bfloat16); its state-dict save undoes that, as this does, with a best-effort inverse that
    quantizes absmax again under double quantization, so W0 moves by that rounding.
    """
    inverse = _cpu_inverse()
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if quant_kind(module) == "4bit" and inverse is not None and _cpu_packed(weight):
            weight.data, weight.quant_state = inverse(weight.data, weight.quant_state)
            if getattr(module, "quant_state", None) is not None:
                module.quant_state = weight.quant_state
            count += 1
    return count


def _cpu_inverse():
    import bitsandbytes.functional as bnb_functional

    return getattr(bnb_functional, "_convert_weight_packed_for_cpu_inverse", None)


def _cpu_packed(weight: torch.Tensor) -> bool:
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def dequantized_weight(layer: torch.nn.Module) -> torch.Tensor:
    """W0 of a quantized layer as a float32 (out, in) matrix: exactly the W0 its own kernel uses, the layer
    left as it is (a 4-bit weight repacked for the CPU kernel is read in that layout, its bfloat16 absmax kept)."""
    weight = layer.weight
    if quant_kind(layer) == "torchao":
        return weight.dequantize().float()
    import bitsandbytes.functional as bnb_functional
    from peft.utils.integrations import dequantize_bnb_weight

    if quant_kind(layer) == "4bit" and _cpu_packed(weight):
        packed = copy.copy(weight.quant_state)
        packed.original_nested = False  # undo the nibble layout only; absmax stays as the kernel reads it
        qweight, state = _cpu_inverse()(weight.data, packed)
        state.absmax = weight.quant_state.absmax.T.reshape(-1).float()
        return bnb_functional.dequantize_4bit(qweight, state).float()
    state = getattr(layer, "state", None) if quant_kind(layer) == "8bit" else None
    return dequantize_bnb_weight(weight, state=state).float()


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
    """Replace every quantized linear layer of `model` by its dense `nn.Linear` (in its compute dtype, else
    `default`), drop the model's quantization config, and return how many layers were replaced."""
    names = [name for name, module in model.named_modules() if quant_kind(module)]
    for name in names:
        layer = model.get_submodule(name)
        model.set_submodule(name, dense_linear(layer, dequantized_weight(layer), compute_dtype(layer, default)))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return len(names)
