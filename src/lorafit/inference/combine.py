"""Several saved adapters combined into one new adapter (adapter arithmetic), for `lorafit merge`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.adapter_arithmetic import COMBINATIONS, SIGN_METHODS
from lorafit.errors import LorafitError
from lorafit.inference.loading import LoadedAdapter, same_base_key, check_adapter_dir, load_adapter_for_inference
from lorafit.model import DEFAULT_ADAPTER, LoraModel
from lorafit.serialization import read_adapter_config
from lorafit.inference.adapter_info import load_adapter_info
from lorafit.training.settings import check_number, check_positive_int, check_seed

_PRUNING = tuple(c for c in COMBINATIONS if c not in ("linear", "cat", "svd"))


@dataclass
class CombineSettings:
    """How `lorafit merge` combines several adapters (PEFT's add_weighted_adapter). Every field is also a flag."""

    weights: list[float] | None = None
    """One weight per --adapter, in the same order; a negative weight subtracts that adapter (default: 1 each)."""
    combination: str = "svd"
    """How the adapters are combined: cat (exact sum, ranks add up), svd (exact sum cut to --svd-rank), linear,
    ties, dare_linear, dare_ties, magnitude_prune (factor by factor: one rank for all), or ties_svd,
    dare_linear_svd, dare_ties_svd, magnitude_prune_svd."""
    density: float | None = None
    """Fraction of entries kept, in (0, 1], for ties, dare_* and magnitude_prune (and their _svd forms)."""
    majority_sign_method: str = "total"
    """How ties and dare_ties elect each entry's sign: total (the sign of the sum) or frequency (the commonest)."""
    svd_rank: int | None = None
    """Rank of an svd combination (default: the largest rank among the adapters)."""
    svd_clamp: float | None = None
    """Clamp the svd factors to this quantile of their entries, in [0, 1], e.g. 0.99 (default: no clamping)."""
    seed: int = 0
    """Random seed of DARE's drops (dare_*), so the same command gives the same adapter."""
    merge_into_base: bool = False
    """Write the combination merged into a plain transformers model instead of a new adapter folder."""

    def __post_init__(self) -> None:
        for weight in self.weights or []:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise LorafitError(f"--weights must be finite numbers (a negative one subtracts), got {weight!r}")
        if self.combination not in COMBINATIONS:
            raise LorafitError(f"--combination must be one of {', '.join(COMBINATIONS)}; got {self.combination!r}")
        if self.combination in _PRUNING:
            if self.density is None:
                raise LorafitError(f"--combination {self.combination} needs --density, the fraction of entries kept, "
                                   "in (0, 1], e.g. --density 0.5")
            check_number("density", self.density, "in (0, 1]")
        elif self.density is not None:
            raise LorafitError(f"--density prunes in ties, dare_* and magnitude_prune combinations; --combination "
                               f"{self.combination} uses none: leave --density out or pick one of those")
        if self.majority_sign_method not in SIGN_METHODS:
            raise LorafitError(f"--majority-sign-method must be total or frequency; got {self.majority_sign_method!r}")
        if self.svd_rank is not None:
            check_positive_int("svd_rank", self.svd_rank)
        if self.svd_clamp is not None and not (isinstance(self.svd_clamp, (int, float)) and 0 <= self.svd_clamp <= 1):
            raise LorafitError(f"--svd-clamp is a quantile in [0, 1] (e.g. 0.99), got {self.svd_clamp!r}")
        check_seed("seed", self.seed)


def adapter_names(count: int) -> list[str]:
    """The names the combined adapters get, in --adapter order (errors about ranks name them)."""
    return [f"adapter{i}" for i in range(1, count + 1)]


def load_combined(adapters: list[str | Path], settings: CombineSettings, model: str | None = None) -> LoadedAdapter:
    """The base model with the adapters' combination as its one adapter, ``default``; checked before loading."""
    dirs = [check_adapter_dir(adapter) for adapter in adapters]
    weights = settings.weights or [1.0] * len(dirs)
    if len(weights) != len(dirs):
        raise LorafitError(f"--weights has {len(weights)} value(s) for {len(dirs)} --adapter(s); give one weight per "
                           "adapter, in the same order")
    _check_combinable(dirs, model)
    loaded = load_adapter_for_inference(dirs[0], model)
    lora_model = LoraModel(loaded.model.unload())
    names = adapter_names(len(dirs))
    for name, directory in zip(names, dirs):
        lora_model.load_adapter(directory, name)
    torch.manual_seed(settings.seed)  # DARE's masks come from torch's global generator, as in PEFT
    lora_model.add_weighted_adapter(names, weights, DEFAULT_ADAPTER, settings.combination, settings.svd_rank,
                                    settings.svd_clamp, density=settings.density,
                                    majority_sign_method=settings.majority_sign_method)
    lora_model.set_adapter(DEFAULT_ADAPTER)
    for name in names:  # only the combination is saved or merged
        lora_model.delete_adapter(name)
    lora_model.eval()
    loaded.model = lora_model
    return loaded


def _check_combinable(dirs: list[Path], model: str | None) -> None:
    """Refuse adapters with trained module copies (heads) and adapters of different bases, before any loading."""
    bases = {}
    for directory in dirs:
        config = read_adapter_config(directory)
        if config.modules_to_save:
            raise LorafitError(f"'{directory}' trains {', '.join(config.modules_to_save)} in full (a classification "
                               "head), and such copies cannot be combined (PEFT refuses them too); combine adapters "
                               f"without them, such as causal-LM adapters, or merge it alone: `lorafit merge --adapter "
                               f"{directory} --output DIR`")
        base = load_adapter_info(directory).get("base_model") or config.base_model_name_or_path
        if base:
            bases[directory] = same_base_key(base)
    if model is None and len(set(bases.values())) > 1:
        listing = ", ".join(f"{directory}: {base}" for directory, base in bases.items())
        raise LorafitError(f"the adapters were trained on different base models ({listing}); combine adapters of "
                           "one base model, or pass --model to use one for all")
