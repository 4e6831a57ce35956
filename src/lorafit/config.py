"""LoraConfig: what to adapt and how, with PEFT's field names and meanings."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from lorafit.variants.residual_init import PISSA_NITER

TASK_TYPES = ("SEQ_CLS", "CAUSAL_LM", "TOKEN_CLS", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")
BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian", "pissa", "olora")
"""The values of init_lora_weights, besides "pissa_niter_<K>"."""
ALL_LINEAR = "all-linear"

# PEFT writes these into adapter_config.json; we read them but have no use for their values.
_PEFT_ONLY_FIELDS_WE_IGNORE = {
    "peft_type", "auto_mapping", "peft_version", "revision", "megatron_config", "megatron_core",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size",
    "runtime_config", "ensure_weight_tying", "use_bdlora", "arrow_config", "kasa_config",
    "velora_config", "monteclora_config", "alora_invocation_tokens",
}
# What PEFT 0.21 writes for the fields we leave at its defaults, so our adapter_config.json has its fields.
_PEFT_DEFAULTS = {
    "alora_invocation_tokens": None, "arrow_config": None, "auto_mapping": None, "corda_config": None,
    "ensure_weight_tying": False, "eva_config": None, "kasa_config": None, "layer_replication": None,
    "loftq_config": {}, "lora_bias": False, "lora_ga_config": None, "megatron_config": None,
    "megatron_core": "megatron.core", "monteclora_config": None, "qalora_group_size": 16, "revision": None,
    "target_parameters": None, "trainable_token_indices": None, "use_bdlora": None,
    "use_qalora": False, "velora_config": None,
}
# Fields that change the method itself: an adapter that sets them is not plain LoRA.
_UNSUPPORTED_FEATURES = {
    "lora_bias": "LoRA bias vectors", "use_qalora": "QALoRA",
    "layer_replication": "layer replication", "target_parameters": "parameter targeting",
    "trainable_token_indices": "trainable tokens",
}


@dataclass
class LoraConfig:
    """Which modules get a LoRA update (the equation is in ``lorafit.layers``), its rank and its scale.

    Field names and meanings follow PEFT's ``LoraConfig`` so configurations and adapter files move
    between the two libraries unchanged.
    """

    task_type: str | None = None
    """SEQ_CLS, CAUSAL_LM, TOKEN_CLS, FEATURE_EXTRACTION or None. SEQ_CLS and TOKEN_CLS make the
    classification head trainable and saved with the adapter: as in PEFT, every module whose name ends in
    `classifier` or `score` (DistilBERT's `pre_classifier` too)."""
    r: int = 8
    """Rank of the update: A is (r x in_features), B is (out_features x r)."""
    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by lora_alpha / r (or / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout probability on the LoRA branch's input, in [0, 1)."""
    target_modules: list[str] | str | None = None
    """Modules to adapt. A list: each entry matches a module's full name or its last dotted
    component(s). A string: a regex that must fullmatch the full name. "all-linear": every linear
    layer except the output head. None: the attention projections usual for the architecture. The
    last two become the module names they resolve to once the adapter is injected (as in PEFT)."""
    exclude_modules: list[str] | str | None = None
    """Modules never to adapt, matched like target_modules."""
    bias: str = "none"
    """Which biases train and are saved: none, all, or lora_only (those of adapted layers)."""
    modules_to_save: list[str] | None = None
    """Further modules trained in full and saved with the adapter (e.g. a new head); an entry matches every
    module whose name ends in it, as in PEFT."""
    init_lora_weights: bool | str = True
    """True: A kaiming-uniform, B zero. "gaussian": A normal with std 1/r, B zero. False: both
    random, so the adapter is not a no-op (for tests). "pissa" (the weight's principal singular directions),
    "pissa_niter_<K>" (the same by a randomised SVD with K subspace iterations: fast, approximate) or "olora"
    (its QR decomposition): the adapter starts as a slice of the base weight, which keeps the residual, so
    the base model's weights change (see ``lorafit.variants.residual_init``)."""
    use_rslora: bool = False
    """Rank-stabilised scaling lora_alpha / sqrt(r) (Kalajdzievski, 2023) instead of lora_alpha / r."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank: regex (matched against the end of the module name) -> r."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha: regex (matched against the end of the module name) -> lora_alpha."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt modules inside these layer indices (e.g. [0, 1] for the first two blocks)."""
    layers_pattern: list[str] | str | None = None
    """The name of the layer list that layers_to_transform indexes (layers, h, block, ...); a string or a list of
    names, kept as given (PEFT writes it as given)."""
    use_dora: bool = False
    """DoRA (Liu et al., 2024): a trained magnitude per output feature scales the direction of W0 + B A (the
    equation is in ``lorafit.variants.dora``); Linear, Conv1D and Embedding layers."""
    fan_in_fan_out: bool = False
    """True when the base weight is stored (in, out), as in GPT-2's Conv1D; set automatically for Conv1D."""
    base_model_name_or_path: str | None = None
    """Where the base model came from; written to adapter_config.json for PEFT and for `lorafit` commands."""
    inference_mode: bool = False
    """True when the adapter is loaded for inference only (its weights are frozen)."""

    def __post_init__(self) -> None:
        if self.task_type is not None:
            self.task_type = str(getattr(self.task_type, "value", self.task_type))
        _check_choice("task_type", self.task_type, TASK_TYPES + (None,))
        _check_choice("bias", self.bias, BIAS_MODES)
        if not (isinstance(self.init_lora_weights, str) and PISSA_NITER.fullmatch(self.init_lora_weights)):
            _check_choice("init_lora_weights", self.init_lora_weights, INIT_MODES + ("pissa_niter_<K>",))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig.r must be a positive integer (1, 4, 8, ...), got {self.r!r}")
        if not _is_positive_number(self.lora_alpha):
            raise ValueError(f"LoraConfig.lora_alpha must be a number > 0, got {self.lora_alpha!r}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoraConfig.use_dora must be True or False, got {self.use_dora!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        self.target_modules = _as_names_or_regex(self.target_modules)
        self.exclude_modules = _as_names_or_regex(self.exclude_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        for pattern, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"LoraConfig.rank_pattern[{pattern!r}] must be a positive integer, got {rank!r}")
        for pattern, alpha in self.alpha_pattern.items():
            if not _is_positive_number(alpha):
                raise ValueError(f"LoraConfig.alpha_pattern[{pattern!r}] must be a number > 0, got {alpha!r}")

    def rank_for(self, module_name: str) -> int:
        return self.rank_pattern[key] if (key := _pattern_key(self.rank_pattern, module_name)) else self.r

    def alpha_for(self, module_name: str) -> float:
        return self.alpha_pattern[key] if (key := _pattern_key(self.alpha_pattern, module_name)) else self.lora_alpha

    def scaling_for(self, module_name: str) -> float:
        return lora_scaling(self.alpha_for(module_name), self.rank_for(module_name), self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def peft_type(self) -> str:
        """PEFT's name for the method; read by PEFT's helpers."""
        return "LORA"

    @property
    def is_prompt_learning(self) -> bool:
        """Always False: LoRA is not a prompt-learning method (PEFT's helpers ask)."""
        return False

    def to_peft_dict(self, auto_mapping: dict[str, str] | None = None) -> dict[str, Any]:
        """The adapter_config.json that PEFT writes for this config: every field PEFT 0.21 writes.

        ``auto_mapping`` (the base model's class and module) is what PEFT's ``AutoPeftModel`` needs to
        rebuild a base model of an adapter without a task_type; PEFT writes it only then.
        """
        return {**_PEFT_DEFAULTS, "peft_type": "LORA", **self.to_dict(), "auto_mapping": auto_mapping}

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Read an adapter_config.json written by lorafit or PEFT; refuses LoRA variants we do not run."""
        if data.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"adapter is of type {data['peft_type']!r}; lorafit loads LoRA adapters only")
        for key, feature in _UNSUPPORTED_FEATURES.items():
            if data.get(key):
                raise ValueError(f"adapter uses {feature} ({key}={data[key]!r}), which lorafit does not support")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known - _PEFT_ONLY_FIELDS_WE_IGNORE - set(_UNSUPPORTED_FEATURES)
        if unknown:
            raise ValueError(f"adapter_config.json has fields lorafit does not know: {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in data.items() if k in known})


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    """The factor on the low-rank update: lora_alpha / r, or lora_alpha / sqrt(r) with rank-stabilised LoRA."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    # `True in (1,)` is true in Python, so compare types as well as values.
    if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
        shown = ", ".join("None" if a is None else repr(a) for a in allowed)
        raise ValueError(f"LoraConfig.{name} must be one of {shown}; got {value!r}")


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _as_names_or_regex(value: Any) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    return sorted(set(value)) if isinstance(value, (set, frozenset)) else list(value)


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """The first pattern that matches the end of a module name at a dot boundary, as PEFT matches."""
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", module_name)), None)
