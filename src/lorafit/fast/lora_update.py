"""The fast LoRA update of a Linear layer: what LoraLinear's forward calls while fast paths are on.

The plain update in layers.py, ``result + (dropout(x) @ A.T @ B.T) * scaling``, allocates the
full-size update and then a full-size sum. Here one ``addmm`` scales the rank-r product and adds it,
in place when no graph is being recorded, which is most of what an unmerged adapter costs at
inference. A mixed batch (a different adapter per row) runs one batched matmul pair for all rows
instead of one pair per adapter, on factors stacked once and reused until one of them changes.
Layers whose adapter uses DoRA take the plain path (``lorafit.variants.dora``).

With no graph to record and many tokens, a Linear computes ``x @ (W0 + scaling * B A).T`` instead: the
rank-r products do little arithmetic but stream whole activations (x for A, the output for B) through
memory, while the merged weight costs a pass over a weight, which is smaller than the activations once
a batch has more tokens than about in * out / (in + out). The base weight is not changed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear_update(layer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``result`` plus the LoRA update of ``layer`` (a LoraLinear) for input ``x``."""
    mixed = layer.routing.adapter_names is not None
    if layer.lora_magnitude_vector and (mixed or layer.active_adapter in layer.lora_magnitude_vector):
        # DoRA rescales the base output by m / n, which no addmm of a rank-r product gives: the plain path
        return layer.add_mixed_update(x, result) if mixed else layer.add_update(x, result, layer.active_adapter)
    if mixed:
        return mixed_update(layer, x, result)
    return fused_update(layer, x, result, layer.active_adapter)


def in_place_ok(result: torch.Tensor, dtype: torch.dtype) -> bool:
    """The base layer's fresh output may take the update in place when no graph is being recorded."""
    return result.dtype == dtype and not (torch.is_grad_enabled() and result.requires_grad)


def fused_update(layer, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
    weight_A, weight_B = layer.lora_A[name].weight, layer.lora_B[name].weight
    x = layer.lora_dropout[name](x.to(weight_A.dtype))
    hidden = x.reshape(-1, layer.in_features) @ weight_A.T  # (tokens, r)
    flat = result.reshape(-1, layer.out_features)
    if in_place_ok(result, weight_A.dtype):
        return flat.addmm_(hidden, weight_B.T, alpha=layer.scaling[name]).view(result.shape)
    if result.dtype == weight_A.dtype:
        return torch.addmm(flat, hidden, weight_B.T, alpha=layer.scaling[name]).view(result.shape)
    update = (hidden * layer.scaling[name]) @ weight_B.T
    return result + update.view(result.shape).to(result.dtype)


def mixed_update(layer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """One batched matmul pair for all rows: each row gathers its own adapter's A and B.

    Ranks differ between adapters, so factors are zero-padded to the largest rank; the base row
    gets all-zero factors. The base layer has already run once for the whole batch. Like the plain
    path's loop over adapters it is meant for inference: it applies no LoRA dropout.
    """
    names = list(layer.r)
    if not names:
        return result
    stacked_A, stacked_B = stacked_factors(layer, names)
    slots = layer.routing.row_slots(names, x.shape[0], x.device)
    rows_x = x.to(stacked_A.dtype).reshape(x.shape[0], -1, layer.in_features)  # (B, T, in)
    hidden = torch.bmm(rows_x, stacked_A[slots])  # (B, T, r)
    rows_B = stacked_B[slots]  # (B, r, out)
    rows_result = result.reshape(x.shape[0], -1, layer.out_features)
    if in_place_ok(result, stacked_A.dtype):
        return rows_result.baddbmm_(hidden, rows_B).view(result.shape)
    update = torch.bmm(hidden, rows_B)
    return result + update.reshape(result.shape).to(result.dtype)


def stacked_factors(layer, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A^T (in x r) and scaled B^T (r x out) of every adapter, zero-padded to one rank, plus a zero
    slot for the base model; kept in ``layer._stack_cache`` and reused across forwards until a factor
    changes (in place or by replacement), rebuilt every time a graph is recorded so gradients reach
    the factors."""
    # plain dict access: this runs per layer per forward, and Module.__getattr__ dominated it
    modules_A, modules_B = layer.lora_A._modules, layer.lora_B._modules
    factors = [(modules_A[n]._parameters["weight"], modules_B[n]._parameters["weight"]) for n in names]
    if torch.is_grad_enabled() and any(a.requires_grad or b.requires_grad for a, b in factors):
        return _stack(layer, names, factors)
    versions = [(a._version, b._version, layer.scaling[n]) for (a, b), n in zip(factors, names)]
    cached = layer._stack_cache
    if (cached is not None and cached[1] == versions and len(cached[0]) == len(factors)
            and all(a is ca and b is cb for (a, b), (ca, cb) in zip(factors, cached[0]))):
        return cached[2]
    with torch.no_grad():
        stacks = _stack(layer, names, factors)
    layer._stack_cache = (factors, versions, stacks)
    return stacks


def _stack(layer, names: list[str], factors: list[tuple[torch.Tensor, torch.Tensor]]):
    rank = max(layer.r[n] for n in names)
    zeros_A = factors[0][0].new_zeros(layer.in_features, rank)
    zeros_B = factors[0][0].new_zeros(rank, layer.out_features)
    stacked_A = torch.stack([F.pad(a.T, (0, rank - a.shape[0])) for a, _ in factors] + [zeros_A])
    stacked_B = torch.stack([F.pad(b.T * layer.scaling[n], (0, 0, 0, rank - b.shape[1]))
                             for (_, b), n in zip(factors, names)] + [zeros_B])
    return stacked_A, stacked_B


def weight_side_forward(layer, x: torch.Tensor) -> torch.Tensor | None:
    """``layer``'s output (a LoraLinear around ``nn.Linear``) from its merged weight, or None where the update
    must be added to the base output: a graph being recorded, LoRA dropout active, a mixed batch, DoRA, a
    base layer with hooks or of another type, autocast, or too few tokens for a weight pass to pay."""
    name = layer.active_adapter
    if not _weight_side_pays(layer, x, name):
        return None
    base = layer.base_layer
    weight = torch.addmm(base.weight, layer.lora_B[name].weight, layer.lora_A[name].weight, alpha=layer.scaling[name])
    return F.linear(x, weight, base.bias)


def _weight_side_pays(layer, x: torch.Tensor, name: str | None) -> bool:
    base = layer.base_layer
    if (type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks or layer.disabled
            or layer.merged or layer.routing.adapter_names is not None or name not in layer.r
            or name in layer.lora_magnitude_vector):
        return False
    weight_A, weight_B = layer.lora_A[name].weight, layer.lora_B[name].weight
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight_A, weight_B, base.weight)):
        return False
    dropout = layer.lora_dropout[name]
    if dropout.training and getattr(dropout, "p", 0) > 0:
        return False
    if not x.dtype == weight_A.dtype == base.weight.dtype or torch.is_autocast_enabled(x.device.type):
        return False
    tokens = x.numel() // layer.in_features
    # memory streamed: the update reads x and rewrites the output, the merged weight writes and reads a weight
    return tokens * (layer.in_features + layer.out_features) >= 2 * layer.in_features * layer.out_features
