"""PiSSA and OLoRA: adapters that start as a slice of the base weight, leaving the base the residual.

Both factor the base weight W (out x in) and take r of its directions into the adapter, then subtract
them from the base, so the model's output is unchanged at the start:

    PiSSA (Meng et al., 2024, arXiv:2404.02948), from the SVD W = U S V^T:
        B = U_r sqrt(S_r / s),   A = sqrt(S_r / s) V_r^T       (s = the adapter's scaling)
      "pissa_niter_K" takes U_r, S_r, V_r from torch.svd_lowrank with K subspace iterations: faster,
      approximate, and randomised (it draws from torch's generator, as PEFT's does).
    OLoRA (Büyükakyüz, 2024, arXiv:2406.01775), from the QR decomposition W = Q R:
        B = Q[:, :r],   A = R[:r]
    then W_res = W - s B A replaces W.

An adapter trained from there is tied to W_res. ``converted_to_lora`` turns it into a plain LoRA on the
original W, as PEFT's ``save_pretrained(..., path_initial_model_for_weight_conversion=...)`` does: with A0, B0
the initial factors, W_res + s B A = W + s (B A - B0 A0) = W + s [B | -B0] [A ; A0], an adapter of rank 2r
with the same scaling (PEFT doubles lora_alpha with r, or multiplies it by sqrt(2) under rsLoRA).
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import torch
from torch import nn

from lorafit.errors import LorafitError

PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def changes_base(init: bool | str) -> bool:
    """True for the initialisations that move part of the base weight into the adapter."""
    return init in ("pissa", "olora") or bool(isinstance(init, str) and PISSA_NITER.fullmatch(init))


def initialise(layer, name: str, init: str) -> None:
    """Set adapter ``name``'s factors of a Linear/Conv1D ``layer`` from its base weight and leave the base
    weight the residual W - s B A (computed in fp32, stored back in the base weight's dtype)."""
    weight = layer.base_layer.weight
    if not weight.dtype.is_floating_point:
        raise LorafitError(f"init_lora_weights={init!r} factors the base weight, which is {weight.dtype} here "
                           "(quantized?); initialise on a floating-point base, then quantize the residual")
    r, scaling = layer.r[name], layer.scaling[name]
    with torch.no_grad():
        W = weight.to(torch.float32)
        W = W.T if layer.fan_in_fan_out else W  # (out, in)
        if init == "olora":
            Q, R = torch.linalg.qr(W)
            B, A = Q[:, :r], R[:r]
        else:
            if init == "pissa":
                U, S, Vh = torch.linalg.svd(W, full_matrices=False)
                U, S, Vh = U[:, :r], S[:r], Vh[:r]
            else:
                U, S, V = torch.svd_lowrank(W, r, niter=int(PISSA_NITER.fullmatch(init).group(1)))
                Vh = V.T
            root = torch.sqrt(S / scaling)
            B, A = U * root, root[:, None] * Vh
        layer.lora_A[name].weight.copy_(A)
        layer.lora_B[name].weight.copy_(B)
        residual = W - scaling * (B @ A)
        weight.copy_(residual.T if layer.fan_in_fan_out else residual)


def check_alone(adapter_name: str, config, others: dict) -> None:
    """Refuse to put an adapter beside one whose initialisation changed the base weights: one of the two would
    run on weights it was not trained with (PEFT only warns)."""
    every = {**others, adapter_name: config}
    sliced = next((name for name, each in every.items() if changes_base(each.init_lora_weights)), None)
    if sliced is not None and others:
        raise LorafitError(f"adapter {sliced!r} (init_lora_weights={every[sliced].init_lora_weights!r}) changed the "
                           "base weights, so it cannot share the model with other adapters; save it converted "
                           "(path_initial_model_for_weight_conversion) and load that instead")


def warn_if_rederived_at_random(config, source: str) -> None:
    """Loading an adapter saved as trained (not converted) re-derives the residual from the base weight, as PEFT
    does; after pissa_niter_K that is a new randomised SVD, so the model is not the one that was trained."""
    if isinstance(config.init_lora_weights, str) and PISSA_NITER.fullmatch(config.init_lora_weights):
        warnings.warn(f"adapter '{source}' was trained from init_lora_weights={config.init_lora_weights!r}, a "
                      "randomised SVD of the base weights that loading draws anew, so this model differs from the "
                      "trained one; save it with path_initial_model_for_weight_conversion to get a plain LoRA",
                      UserWarning, stacklevel=3)


def converted_to_lora(config, tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor],
                      initial_source: str, model: nn.Module, adapter_name: str):
    """(config, tensors) of the plain LoRA that equals, on the original base weights, an adapter trained from
    a base-changing initialisation. ``tensors`` are the trained adapter's and ``initial`` its factors at the
    start (read from ``initial_source``), both keyed as in adapter files without PEFT's prefix. Other tensors
    stay as they are, except the base weights PEFT saves beside a targeted lm_head, which get back their
    original values. ``model`` holds the adapter's layers (for their scaling and weight layout)."""
    if config.use_dora:
        raise LorafitError("a DoRA adapter cannot be converted to a plain LoRA (its magnitude rescales the whole "
                           "weight, not a low-rank part of it); save it without path_initial_model_for_weight_"
                           "conversion and load it onto the base model it was trained on")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise LorafitError("path_initial_model_for_weight_conversion cannot keep the scaling of an rsLoRA adapter "
                           "with rank_pattern or alpha_pattern (as in PEFT); train without one of them to convert")
    converted = dict(tensors)
    for key, tensor in tensors.items():
        is_a, is_b = key.endswith(_A_KEYS), key.endswith(_B_KEYS)
        if not (is_a or is_b):
            continue
        start = initial.get(key)
        if start is None or start.shape != tensor.shape:
            raise LorafitError(f"the initial adapter '{initial_source}' does not match the adapter being saved at "
                               f"'{key}'; pass the folder saved right after the adapter was created, before training")
        start = start.to(tensor.dtype)
        converted[key] = torch.cat([tensor, start], dim=0) if is_a else torch.cat([tensor, -start], dim=1)
    for path, layer in model.named_modules():
        key = f"{path}.base_layer.weight"
        if key in converted and adapter_name in getattr(layer, "lora_A", {}):  # a Linear/Conv1D this adapter sliced
            A0, B0 = (initial[f"{path}.lora_{f}.weight"].to(torch.float32) for f in "AB")
            delta = layer.scaling[adapter_name] * (B0 @ A0)
            original = converted[key].to(torch.float32) + (delta.T if layer.fan_in_fan_out else delta)
            converted[key] = original.to(converted[key].dtype)
    new_config = dataclasses.replace(
        config, init_lora_weights=True, r=2 * config.r,
        lora_alpha=config.lora_alpha * (2 ** 0.5 if config.use_rslora else 2),
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()})
    return new_config, converted


_A_KEYS = (".lora_A.weight", ".lora_embedding_A")
_B_KEYS = (".lora_B.weight", ".lora_embedding_B")
