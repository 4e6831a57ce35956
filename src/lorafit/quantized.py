"""LoRA around a base layer quantized by bitsandbytes (QLoRA: Dettmers et al., 2023, arXiv:2305.14314).

The base weight stays packed in 4 or 8 bits and frozen; the forward is ``base(x) + (alpha / r) * B A dropout(x)``
with A and B in fp32, so gradients reach only the adapter. Packed weights cannot take an update in place, so
merging first de-quantizes the layer into an fp32 ``nn.Linear`` (weights ``dequant(W0)``: the quantization's
rounding stays) and adds ``(alpha / r) * B A`` there, in fp32. The layer is then no longer quantized.

bitsandbytes is imported only by whoever quantizes a model; a module can be a bitsandbytes layer only once
it has been, so nothing here imports it first.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from lorafit.errors import LorafitError
from lorafit.fast.lora_update import linear_update
from lorafit.layers import LoraLinear
from lorafit.variants import dora


def quantized_linear_types() -> tuple[type, ...]:
    """bitsandbytes' 4-bit and 8-bit Linear classes, or none when bitsandbytes has not been imported."""
    bnb = sys.modules.get("bitsandbytes")
    return () if bnb is None else (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, quantized_linear_types())


def keep_standard_layout(layer: nn.Module) -> None:
    """Stop bitsandbytes repacking a 4-bit weight for its CPU kernel at the first no-grad forward (on CPUs with
    AVX512-BF16): the repacked weight has its block scales rounded to bf16, so inference would differ from the
    training forward, and it is in a layout that de-quantization (merging) no longer reads."""
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False


def describe_quantization(layer: nn.Module) -> str:
    """'4-bit nf4' or '8-bit', as a message names a quantized layer's format."""
    quant_state = getattr(layer.weight, "quant_state", None)
    return f"4-bit {quant_state.quant_type}" if quant_state is not None else "8-bit"


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The fp32 (out, in) weight a Linear4bit or Linear8bitLt multiplies with."""
    import bitsandbytes as bnb

    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            raise LorafitError("a 4-bit layer was repacked by bitsandbytes for its CPU kernel (an inference run before "
                               "the adapter was added) and cannot be de-quantized; load the model again and add the "
                               "adapter before running it")
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    # LLM.int8(): int8 rows, each scaled by its absolute maximum (SCB) over 127
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    return weight.data.float() * (scales.float().unsqueeze(1) / 127)


def dequantized_linear(layer: nn.Module) -> nn.Linear:
    """An fp32 nn.Linear with the de-quantized weight (and the bias) of a bitsandbytes layer, frozen as it was."""
    weight = dequantized_weight(layer)
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                      device=weight.device, dtype=torch.float32)
    plain.weight.data.copy_(weight)
    if layer.bias is not None:
        plain.bias.data.copy_(layer.bias.data.float())
    plain.requires_grad_(False)
    return plain.train(layer.training)


def quantized_formats(model: nn.Module) -> list[str]:
    """The formats of the bitsandbytes layers in ``model`` ('4-bit nf4', '8-bit'); empty for a plain model."""
    return sorted({describe_quantization(m) for m in model.modules() if is_quantized(m)})


def dequantize_model(model: nn.Module) -> None:
    """Replace every bitsandbytes layer of ``model`` by its fp32 de-quantized copy and drop transformers'
    quantization settings, so the model saves and loads as a plain fp32 model."""
    for name, module in list(model.named_modules()):
        if is_quantized(module):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, dequantized_linear(module))
    for holder in (model, getattr(model, "get_base_model", lambda: None)()):
        if holder is None:
            continue
        if getattr(getattr(holder, "config", None), "quantization_config", None) is not None:
            del holder.config.quantization_config
        if hasattr(holder, "hf_quantizer"):
            holder.hf_quantizer = None
            holder.is_quantized = False


class QuantizedLoraLinear(LoraLinear):
    """LoRA around bitsandbytes' ``Linear4bit`` or ``Linear8bitLt``: the adapter in fp32, the base packed."""

    def __init__(self, base_layer: nn.Module, routing, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, routing, fan_in_fan_out=False)  # a packed weight's shape is not (out, in)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        keep_standard_layout(base_layer)

    @staticmethod
    def fast_variant(layer: LoraLinear, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not result.requires_grad:
            # bitsandbytes' int8 matmul returns a view made without grad, which autograd forbids changing in place
            result = result.clone()
        return linear_update(layer, x, result)

    @classmethod
    def adapter_shapes(cls, base_layer: nn.Module, r: int, fan_in_fan_out: bool = False,
                       use_dora: bool = False) -> dict[str, tuple[int, ...]]:
        shapes = {"lora_A.weight": (r, base_layer.in_features), "lora_B.weight": (base_layer.out_features, r)}
        return {**shapes, dora.MAGNITUDE: (base_layer.out_features,)} if use_dora else shapes

    def weight_dtype(self) -> torch.dtype:
        return torch.float32

    def base_weight(self) -> torch.Tensor:
        base = self.base_layer
        return dequantized_weight(base) if is_quantized(base) else base.weight.data

    def merge(self, names: list[str] | None = None, safe_merge: bool = False) -> None:
        """De-quantize the base into fp32 (once), then merge there as every LoRA layer does."""
        pending = self._unmerged(names if names is not None else [self.active_adapter])
        if pending and is_quantized(self.base_layer):
            if safe_merge:
                self.check_merge(pending)
            self.base_layer = dequantized_linear(self.base_layer)
        super().merge(names, safe_merge)
