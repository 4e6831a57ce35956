"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv:2402.09353).

The adapted weight is a direction, W0 + s B A, rescaled to a trained magnitude m per output feature:

    W' = m * (W0 + s B A) / n        n = ||W0 + s B A||_c,   s = alpha / r

``||.||_c`` is the norm of each output feature's weights (the paper's column norm: its W is in x out).
m starts at n, so a fresh adapter leaves the model unchanged. As the paper advises (section 4.3) and
PEFT does, n is a constant for backpropagation (detached): m, A and B get gradients, n does not.
A Linear or Conv1D layer with input dropout (x' = dropout(x) while training, else x) outputs

    h = W0 x + b + (m / n - 1) W0 x' + (m / n) s B A x'

which without dropout is W' x + b. An embedding (no dropout) outputs (m / n) (W0 + s B A)[ids]. PEFT's
name for m, in modules and files alike, is ``lora_magnitude_vector``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAGNITUDE = "lora_magnitude_vector"
"""The per-adapter container of m, and its key in adapter files (PEFT's)."""


def feature_rows(layer, weight: torch.Tensor) -> torch.Tensor:
    """``weight``, laid out as the base weight, viewed as (output features, inputs): the rows n is taken over."""
    transposed = layer.fan_in_fan_out or isinstance(layer.base_layer, nn.Embedding)
    return weight.T if transposed else weight


def weight_norm(layer, name: str, weight: torch.Tensor) -> torch.Tensor:
    """n = ||W0 + s B A||_c for adapter ``name`` on the unmerged base weight ``weight``; no gradient."""
    with torch.no_grad():
        delta = layer.delta_weight(name)
        return torch.linalg.norm(feature_rows(layer, weight.to(delta.dtype) + delta), dim=1)


def initial_magnitude(layer, name: str, weight: torch.Tensor) -> nn.Parameter:
    """m at the start: n itself, so the adapted weight equals W0 + s B A (W0 when B is zero)."""
    return nn.Parameter(weight_norm(layer, name, weight))


def linear_update(layer, x: torch.Tensor, result: torch.Tensor, name: str, dropout: bool = True) -> torch.Tensor:
    """(m / n - 1) W0 x' + (m / n) s B A x': what adapter ``name`` adds to the base output ``result``.

    Without dropout W0 x is read off ``result`` (less its bias); with it, W0 x' is computed again.
    """
    weight_A, weight_B = layer.lora_A[name].weight, layer.lora_B[name].weight
    x = x.to(weight_A.dtype)
    drop = layer.lora_dropout[name]
    base = layer.base_layer
    weight = layer.base_weight()  # a packed (quantized) base weight, de-quantized
    if not dropout or isinstance(drop, nn.Identity) or not layer.training:
        base_out = (result if base.bias is None else result - base.bias).to(x.dtype)  # W0 x
    else:
        x = drop(x)
        base_out = F.linear(x, feature_rows(layer, weight).to(x.dtype))  # W0 x'
    scale = getattr(layer, MAGNITUDE)[name] / weight_norm(layer, name, weight)  # m / n, (out,)
    return (scale - 1) * base_out + scale * (x @ weight_A.T @ weight_B.T) * layer.scaling[name]


def embedding_output(layer, ids: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
    """(m / n) (W0[ids] + s B A[ids]), each term scaled as the base embedding scales its lookup (Gemma)."""
    scale = getattr(layer, MAGNITUDE)[name] / weight_norm(layer, name, layer.base_layer.weight)  # (dim,)
    return scale * (result.to(scale.dtype) + layer.embedding_update(ids, name))


def merge(layer, name: str, weight: torch.Tensor, base: torch.Tensor) -> None:
    """``weight`` becomes (m / n) (weight + s B A), in place; n is taken from ``base``, the weight with no
    adapter merged (what the forward sees), and kept for ``unmerge``."""
    with torch.no_grad():
        norm = layer.merged_norms[name] = weight_norm(layer, name, base)
        delta = layer.delta_weight(name)
        rows = feature_rows(layer, weight)
        factor = (getattr(layer, MAGNITUDE)[name] / norm).view(-1, 1)
        rows.copy_(factor * (rows.to(delta.dtype) + feature_rows(layer, delta)))


def unmerge(layer, name: str, weight: torch.Tensor) -> None:
    """Undo ``merge`` in place: weight / (m / n) - s B A, with the n of the merge."""
    with torch.no_grad():
        delta = layer.delta_weight(name)
        rows = feature_rows(layer, weight)
        factor = (getattr(layer, MAGNITUDE)[name] / layer.merged_norms[name]).view(-1, 1)
        rows.copy_(rows.to(delta.dtype) / factor - feature_rows(layer, delta))
