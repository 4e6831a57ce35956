"""Adapter arithmetic: one new adapter from a weighted combination of others (PEFT's ``add_weighted_adapter``).

Semantics are PEFT 0.21's (``LoraModel.add_weighted_adapter`` and ``peft.utils.merge_utils``), so the same
adapters, weights and seed give the same tensors. Per adapted layer, with ``s_i`` adapter i's scaling:

- ``cat``: stacks the factors, ``A = [w_i s_i A_i]``, ``B = [B_i]``: exactly ``sum_i w_i s_i B_i A_i``, at a
  rank that is the sum of the ranks.
- ``svd`` and the ``*_svd`` kinds combine the full updates ``s_i B_i A_i`` and keep the top ``svd_rank``
  singular directions of the result (the factorisation, not the product, is what may differ between SVDs).
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` combine the A's and the B's each on
  their own, A_i weighted by ``sign(w_i) sqrt(|w_i s_i|)`` and B_i by ``sqrt(|w_i s_i|)``: cheap, only roughly
  the weighted sum of the updates, and every adapter needs the same rank.

TIES (Yadav et al., 2023) keeps the ``density`` fraction of largest entries of each tensor, elects a sign per
entry and averages the entries that agree with it; DARE (Yu et al., 2023) drops entries at random and rescales
the rest by ``1 / density`` (the global torch generator draws the masks, in PEFT's order); magnitude_prune keeps
the largest entries and adds. The new adapter has ``lora_alpha = r``, so its scaling is 1.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from lorafit.config import LoraConfig
from lorafit.errors import LorafitError
from lorafit.layers import LoraEmbedding, LoraLayer
from lorafit.saved_modules import ModulesToSave

ON_FACTORS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
ON_UPDATES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = (*ON_FACTORS, "cat", *ON_UPDATES)
SIGN_METHODS = ("total", "frequency")
_FACTOR_KEYS = {"lora_A.weight": "lora_B.weight", "lora_embedding_A": "lora_embedding_B"}


@dataclass
class WeightedPlan:
    """What add_weighted_adapter was asked for, checked: the config of the new adapter and how to fill it."""

    adapters: list[str]
    weights: list[float]
    combination: str
    config: LoraConfig
    density: float | None = None
    majority_sign_method: str = "total"
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None


def plan_weighted_adapter(configs: dict[str, LoraConfig], adapters: list[str], weights: list[float],
                          combination_type: str, svd_rank: int | None = None, svd_clamp: float | None = None,
                          svd_full_matrices: bool = True, svd_driver: str | None = None,
                          density: float | None = None, majority_sign_method: str = "total") -> WeightedPlan:
    """Check the arguments against the loaded adapters (``configs``) before the model changes at all."""
    adapters, weights = list(adapters), list(weights)
    if not adapters:
        raise LorafitError("add_weighted_adapter needs at least one adapter name to combine")
    unknown = [name for name in adapters if name not in configs]
    if unknown:
        raise LorafitError(f"no adapter named {', '.join(map(repr, unknown))}; loaded: {', '.join(configs) or 'none'}")
    dora = next((name for name in adapters if configs[name].use_dora), None)
    if dora is not None:  # PEFT drops the trained magnitudes, or gives the new adapter fresh ones
        raise LorafitError(f"adapter {dora!r} is a DoRA adapter: its trained magnitudes cannot be combined, only B A "
                           "updates; merge it into its base model alone (merge_and_unload, `lorafit merge` with one "
                           "--adapter) instead")
    if len(weights) != len(adapters):
        raise LorafitError(f"{len(weights)} weight(s) for {len(adapters)} adapter(s); give one weight per adapter")
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise LorafitError(f"adapter weights must be finite numbers (negative ones subtract), got {weight!r}")
    if combination_type not in COMBINATIONS:
        raise LorafitError(f"unknown combination_type {combination_type!r}; choose one of {', '.join(COMBINATIONS)}")
    _check_density(combination_type, density)
    if majority_sign_method not in SIGN_METHODS:
        raise LorafitError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise LorafitError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    if svd_clamp is not None and not (isinstance(svd_clamp, (int, float)) and 0 <= svd_clamp <= 1):
        raise LorafitError(f"svd_clamp is a quantile in [0, 1] (e.g. 0.99), got {svd_clamp!r}")

    # PEFT: one adapter can only be rescaled, whatever combination was asked for
    combination = "linear" if len(adapters) == 1 else combination_type
    ranks = {name: max([configs[name].r, *configs[name].rank_pattern.values()]) for name in adapters}
    if combination in ON_FACTORS:
        if len(set(ranks.values())) > 1:
            listed = ", ".join(f"{name}: {rank}" for name, rank in ranks.items())
            raise LorafitError(f"combination_type {combination!r} adds the LoRA factors entry by entry, so every "
                               f"adapter needs the same r (got {listed}); use 'cat' or 'svd' for different ranks")
        new_rank = next(iter(ranks.values()))
    elif combination == "cat":
        new_rank = sum(ranks.values())
    else:
        new_rank = svd_rank or max(ranks.values())
    config = dataclasses.replace(configs[adapters[0]], r=new_rank, lora_alpha=new_rank, rank_pattern={},
                                 alpha_pattern={}, target_modules=_union_targets(configs, adapters),
                                 # PEFT keeps use_rslora here, which scales the new adapter by sqrt(r)
                                 # instead of 1 and so changes its output; the factors assume 1
                                 use_rslora=False)
    return WeightedPlan(adapters, [float(w) for w in weights], combination, config, density, majority_sign_method,
                        svd_clamp, svd_full_matrices, svd_driver)


def _check_density(combination: str, density: float | None) -> None:
    prunes = combination not in ("linear", "cat", "svd")
    if not prunes:
        if density is not None:
            raise LorafitError(f"density prunes entries in ties, dare_* and magnitude_prune combinations; "
                               f"{combination!r} uses none: leave density out or pick one of those")
        return
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise LorafitError(f"combination_type {combination!r} needs density, the fraction of entries kept, in (0, 1] "
                           f"(e.g. 0.5), got {density!r}")


def _union_targets(configs: dict[str, LoraConfig], adapters: list[str]) -> list[str] | str:
    """Every module any of the adapters adapts (PEFT's rule: union of lists, alternation of regexes)."""
    targets = [configs[name].target_modules for name in adapters]
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    if all(isinstance(t, list) for t in targets):
        return sorted(set().union(*targets))
    kinds = ", ".join(f"{name}: {'a regex' if isinstance(t, str) else 'a list'}" for name, t in zip(adapters, targets))
    raise LorafitError(f"the adapters give target_modules in different forms ({kinds}), so their union cannot be "
                       "written; combine adapters whose target_modules are all lists or all regexes")


@torch.no_grad()
def fill_weighted_adapter(model: nn.Module, plan: WeightedPlan, adapter_name: str) -> None:
    """Write the combination into ``adapter_name``'s factors in every layer that has it.

    Layers go in module order and, inside one, A before B and adapters in the order given, as in PEFT:
    DARE's random masks then come from the generator in the same order.
    """
    left_out = []
    for module_name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        present = [(name, w) for name, w in zip(plan.adapters, plan.weights) if name in layer.r]
        if adapter_name not in layer.r:
            left_out += [module_name] if present else []
            continue
        if not present:
            raise LorafitError(f"'{module_name}' is adapted by the new adapter but by none of "
                               f"{', '.join(plan.adapters)}; combine adapters with the same layers_to_transform "
                               "and exclude_modules")
        if plan.combination == "cat":
            new_A, new_B = _concatenated(layer, present)
        elif plan.combination in ON_UPDATES:
            new_A, new_B = _svd_of_combined_update(layer, present, plan)
        else:
            new_A, new_B = _combined_factors(layer, present, plan)
        target_A, target_B = factors(layer, adapter_name)
        rank = new_A.shape[0]  # at most the new adapter's r; the rows and columns beyond it stay zero
        target_A.zero_()[:rank] = new_A
        target_B.zero_()[:, :rank] = new_B
    if left_out:
        warnings.warn(f"{', '.join(left_out)} are left out of the combination: the new adapter takes "
                      f"layers_to_transform and exclude_modules from {plan.adapters[0]!r} (as in PEFT), which "
                      "leave them out", UserWarning, stacklevel=3)


def factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of adapter ``name`` in ``layer``: A is (r x in), B (out x r); an embedding's "in" is its vocabulary."""
    tensors = layer.adapter_tensors(name)
    key_A = next((key for key in _FACTOR_KEYS if key in tensors), None)
    if key_A is None or len(tensors) != 2:
        raise LorafitError(f"adapter {name!r} has tensors beyond LoRA's two factors ({', '.join(tensors)}) "
                           "in a LoRA variant add_weighted_adapter cannot combine")
    return tensors[key_A], tensors[_FACTOR_KEYS[key_A]]


def _concatenated(layer: LoraLayer, present: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [factors(layer, name) for name, _ in present]
    new_A = torch.cat([A * weight * layer.scaling[name] for (name, weight), (A, _) in zip(present, pairs)], dim=0)
    return new_A, torch.cat([B for _, B in pairs], dim=1)


def _combined_factors(layer: LoraLayer, present: list[tuple[str, float]], plan: WeightedPlan):
    """The A's and the B's combined separately; the weight's sign goes on A only, so B A keeps it."""
    roots = [math.sqrt(abs(weight * layer.scaling[name])) for name, weight in present]
    signs = [1.0 if weight * layer.scaling[name] >= 0 else -1.0 for name, weight in present]
    pairs = [factors(layer, name) for name, _ in present]
    dtype = pairs[0][0].dtype
    new_A = combine([A for A, _ in pairs], torch.tensor([r * s for r, s in zip(roots, signs)]), plan)
    new_B = combine([B for _, B in pairs], torch.tensor(roots), plan)
    return new_A.to(dtype), new_B.to(dtype)


def _svd_of_combined_update(layer: LoraLayer, present: list[tuple[str, float]], plan: WeightedPlan):
    # delta_weight is laid out like the base weight (as PEFT's get_delta_weight): DARE's masks are drawn
    # in that layout, and only then is it turned to (out x in) for B A
    deltas = [layer.delta_weight(name) for name, _ in present]
    weights = torch.tensor([weight for _, weight in present])
    delta = combine(deltas, weights, plan, plan.combination.removesuffix("_svd"))
    if layer.fan_in_fan_out or isinstance(layer, LoraEmbedding):
        delta = delta.T
    U, S, Vh = torch.linalg.svd(delta, full_matrices=plan.svd_full_matrices, driver=plan.svd_driver)
    rank = min(plan.config.r, S.shape[0])
    new_B, new_A = U[:, :rank] @ torch.diag(S[:rank]), Vh[:rank, :]
    if plan.svd_clamp is not None:
        bound = torch.quantile(torch.cat([new_B.flatten(), new_A.flatten()]), plan.svd_clamp)
        new_B, new_A = new_B.clamp(-bound, bound), new_A.clamp(-bound, bound)
    return new_A, new_B


def combine(tensors: list[torch.Tensor], weights: torch.Tensor, plan: WeightedPlan,
            method: str | None = None) -> torch.Tensor:
    """One tensor from several of one shape, by ``method`` (default: the plan's combination)."""
    method = method or plan.combination
    if method in ("linear", "svd"):
        return task_arithmetic(tensors, weights)
    if method == "magnitude_prune":
        return task_arithmetic([prune(t, plan.density, "magnitude") for t in tensors], weights)
    if method == "dare_linear":
        return task_arithmetic([prune(t, plan.density, "random") for t in tensors], weights)
    if method == "ties":
        return ties([prune(t, plan.density, "magnitude") for t in tensors], weights, plan.majority_sign_method)
    if method == "dare_ties":
        return ties([prune(t, plan.density, "random") for t in tensors], weights, plan.majority_sign_method)
    raise AssertionError(f"no combination method {method!r}")


def _weighted(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Stacked along a new first dimension, each scaled by its weight."""
    stacked = torch.stack(tensors)
    return stacked * weights.to(stacked.device).view(-1, *[1] * (stacked.dim() - 1))


def task_arithmetic(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """The weighted sum (Ilharco et al., 2023)."""
    return _weighted(tensors, weights).sum(dim=0)


def prune(tensor: torch.Tensor, density: float, method: str) -> torch.Tensor:
    """Keep about ``density`` of the entries: the largest ones ("magnitude"), or a random draw rescaled by
    1 / density so its expectation is the tensor ("random", DARE). Density 1 keeps everything, drawing nothing."""
    if density >= 1:
        return tensor
    if method == "magnitude":
        keep = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        keep[tensor.abs().reshape(-1).topk(int(density * tensor.numel())).indices] = 1
        return tensor * keep.reshape(tensor.shape)
    # full_like keeps the tensor's strides, and the draws follow them, as in PEFT
    kept = torch.bernoulli(torch.full_like(tensor, density))
    return tensor * kept / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Per entry, which of the stacked tensors agree with the elected sign: that of the sum ("total") or of
    the most common sign ("frequency"); a tie elects +."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    return signs == torch.where(votes >= 0, 1.0, -1.0)


def ties(tensors: list[torch.Tensor], weights: torch.Tensor, majority_sign_method: str = "total") -> torch.Tensor:
    """TIES' elect-and-average on already pruned tensors: each entry is the mean of the weighted entries whose
    sign agrees with the one elected from the unweighted ones."""
    agree = majority_sign_mask(torch.stack(tensors), majority_sign_method)
    summed = (_weighted(tensors, weights) * agree).sum(dim=0)
    return summed / agree.sum(dim=0).clamp(min=1)


def check_saved_modules(model: nn.Module, adapters: list[str]) -> None:
    """Trained module copies (a head) are not combined: two adapters that both train one are refused, as in PEFT,
    and one adapter's copy is dropped with a warning (the new adapter uses the base module there, as in PEFT)."""
    trained = {name: sum(adapter in module.modules_to_save for adapter in adapters)
               for name, module in model.named_modules() if isinstance(module, ModulesToSave)}
    shared = [name for name, count in trained.items() if count > 1]
    if shared:
        raise LorafitError(f"more than one of the adapters trains {', '.join(shared)} in full (modules_to_save, "
                           "e.g. a classification head), and such copies cannot be combined; combine adapters that "
                           "train no module in full (such as causal-LM adapters)")
    dropped = [name for name, count in trained.items() if count]
    if dropped:
        warnings.warn(f"the adapters' trained copies of {', '.join(dropped)} (modules_to_save) are not combined: "
                      "the new adapter starts from the base module's weights there, as in PEFT", UserWarning,
                      stacklevel=3)
