"""Loading a base model quantized by bitsandbytes (``--quantize``), and how an adapter records it."""

from __future__ import annotations

import ctypes
import dataclasses
import gc

import torch
from torch import nn

from lorafit.errors import LorafitError
from lorafit.training.settings import QuantizeSettings

INFO_KEY = "quantization"
"""Where lorafit.json records the quantization an adapter was trained with."""


def quantizes(settings: QuantizeSettings | None) -> bool:
    return settings is not None and settings.quantize not in (None, "none")


def require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LorafitError("--quantize needs the bitsandbytes package: pip install lorafit[qlora]") from None


def bnb_config(settings: QuantizeSettings | None, keep: list[str] | None = None):
    """transformers' BitsAndBytesConfig for ``settings`` (None: load as is). ``keep`` names modules left unquantized
    (a classifier's head, which is trained in full); None keeps transformers' own choice (the LM head)."""
    if not quantizes(settings):
        return None
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if settings.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=settings.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=settings.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, settings.bnb_4bit_compute_dtype),
                              llm_int8_skip_modules=keep)


def check_quantized(model: nn.Module, name: str, settings: QuantizeSettings | None) -> None:
    """Refuse a model that --quantize left as it was (bitsandbytes quantizes Linear layers only); keep the
    quantized layers in the layout training uses."""
    from lorafit.quantized import is_quantized, keep_standard_layout

    quantized = [m for m in model.modules() if is_quantized(m)]
    for layer in quantized:
        keep_standard_layout(layer)
    if quantized:
        release_checkpoint(model)
    if quantizes(settings) and not quantized:
        raise LorafitError(f"model '{name}' has no linear layers bitsandbytes can quantize (its layers: "
                           f"{', '.join(sorted({type(m).__name__ for m in model.modules()})[:6])}); "
                           "train it without --quantize")


def release_checkpoint(model: nn.Module) -> None:
    """Copy the unquantized tensors (embeddings, norms, the LM head) out of the memory-mapped checkpoint they
    still point into, so the mapping, every page of which quantizing read, is closed; then give the memory
    freed by quantizing back to the OS (glibc keeps it otherwise). Measured on SmolLM2-135M in 4 bits: the
    resident set after loading drops from about 1,270 to 600 MiB."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if not is_packed(tensor):
            tensor.data = tensor.data.clone()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def is_packed(tensor: torch.Tensor) -> bool:
    return tensor.dtype in (torch.uint8, torch.int8)


def quantize_settings(settings: QuantizeSettings) -> QuantizeSettings:
    """Only the quantization fields of a config that has more (TrainConfig)."""
    return QuantizeSettings(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(QuantizeSettings)})


def adapter_quantization(settings: QuantizeSettings | None) -> dict:
    """What lorafit.json records: the settings, when the base was quantized."""
    return {INFO_KEY: dataclasses.asdict(quantize_settings(settings))} if quantizes(settings) else {}


def inference_quantization(given: QuantizeSettings | None, info: dict) -> QuantizeSettings | None:
    """The flags when --quantize was given, else the quantization the adapter was trained with."""
    if given is not None and given.quantize is not None:
        return given
    recorded = info.get(INFO_KEY)
    if not recorded:
        return None
    try:
        return QuantizeSettings(**recorded)
    except TypeError as err:
        raise LorafitError(f"the adapter's lorafit.json has a damaged '{INFO_KEY}' entry ({err}); pass --quantize "
                           "to choose the quantization") from None
