"""Speed tricks, switched on and off in one place. Each keeps the plain path's results (tests/test_fast.py).

The plain path is what a reader of the code expects: a LoRA Linear adds
``(dropout(x) @ A.T @ B.T) * scaling`` (layers.py), the causal-LM loss calls the model's forward, a
classifier runs its whole last layer. ``use_fast_paths(model)`` turns on, for that model:

- the fused, in-place ``addmm`` update, the merged weight for large batches without a graph, and the
  stacked factors of mixed batches (lora_update.py),
- LoRA and, within training loops, base-model dropout with cheaper masks (dropout.py),
- the last layer of a first-token classifier computing its first position alone (first_token.py),
- the LM head at scored positions only, a shared prompt prefix run once (causal_loss.py),
- and, within ``fast_section``, oneDNN off for fp32 CPU models not under bf16/fp16 autocast (cpu_kernels.py).

``LORAFIT_FAST=0`` in the environment, or ``use_fast_paths(model, False)`` (``lorafit train
--no-fast``), runs the plain path instead.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Iterator

import torch
from torch import nn

from lorafit.fast.cpu_kernels import shape_free_kernels
from lorafit.fast.dropout import FastDropout, fast_dropouts
from lorafit.fast.first_token import first_token_last_layer, full_last_layer

ENV_SWITCH = "LORAFIT_FAST"
"""The environment variable that turns every fast path off when it is 0."""

_PLAIN_MODELS: weakref.WeakSet = weakref.WeakSet()
"""Models switched to the plain path by ``use_fast_paths(model, False)``."""


def allowed() -> bool:
    """False when the environment turns fast paths off (``LORAFIT_FAST=0``)."""
    return os.environ.get(ENV_SWITCH, "1").strip() != "0"


def use_fast_paths(model: nn.Module, on: bool = True) -> bool:
    """Switch every fast path of ``model`` on (unless the environment forbids it) or off; returns which."""
    on = on and allowed()
    base = unwrapped_base(model)
    (_PLAIN_MODELS.discard if on else _PLAIN_MODELS.add)(base)
    for module in model.modules():
        if hasattr(module, "fast_variant"):  # a LoRA layer; importing layers here would be a cycle
            module.fast_update = module.fast_variant if on else None
            _swap_lora_dropouts(module, module.fast_update is not None)
    if on:
        first_token_last_layer(model)
    else:
        full_last_layer(model)
    return on


def is_on(model: nn.Module) -> bool:
    """Whether ``model`` runs its fast paths (the default unless switched off)."""
    return allowed() and unwrapped_base(model) not in _PLAIN_MODELS


@contextlib.contextmanager
def fast_section(model: nn.Module, compute_dtype: torch.dtype | None = None) -> Iterator[None]:
    """Within the block: oneDNN off for an fp32 CPU model, and cheaper masks for its base-model dropouts.

    ``compute_dtype``: the precision autocast computes in within the block (bf16 keeps oneDNN on)."""
    if not is_on(model):
        yield
        return
    with shape_free_kernels(model, compute_dtype), fast_dropouts(model):
        yield


def lora_dropout(p: float, fast: bool) -> nn.Module:
    """A LoRA layer's input dropout: none at p=0, else torch's or the cheaper-mask one."""
    if p <= 0:
        return nn.Identity()
    return FastDropout(p) if fast else nn.Dropout(p)


def _swap_lora_dropouts(layer: nn.Module, fast: bool) -> None:
    dropouts = getattr(layer, "lora_dropout", {})
    for name, module in list(dropouts.items()):
        if isinstance(module, nn.Dropout) and (type(module) is FastDropout) != fast:
            dropouts[name] = lora_dropout(module.p, fast).train(module.training)


def unwrapped_base(model: nn.Module) -> nn.Module:
    """The transformers model inside a LoraModel, or inside a DistributedDataParallel wrapper of one."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model
