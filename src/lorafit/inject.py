"""Finding the modules a LoraConfig targets, wrapping them in LoRA layers, and unwrapping them again."""

from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from lorafit.config import ALL_LINEAR, LoraConfig
from lorafit.errors import LorafitError
from lorafit.layers import BatchRouting, LoraLayer, layer_kind, wrap_layer
from lorafit.saved_modules import ModulesToSave

CLASSIFIER_HEAD_NAMES = ("classifier", "score")
_QV = ["q_proj", "v_proj"]
# Used when target_modules is None: the attention projections LoRA's paper adapts (query and value).
# PEFT 0.21's table for every model type it knows, plus distilbert, which PEFT lacks.
DEFAULT_TARGETS = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": _QV, "gpt2": ["c_attn"], "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"], "opt": _QV, "gptj": _QV, "gpt_neox": ["query_key_value"],
    "gpt_neo": _QV, "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    "layoutlm": ["query", "value"], "llama": _QV, "llama4": _QV, "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"], "mpt": ["Wqkv"], "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"], "falcon": ["query_key_value"], "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"], "mistral": _QV, "mixtral": _QV, "stablelm": _QV, "phi": [*_QV, "fc1", "fc2"],
    "gemma": _QV, "gemma2": _QV, "gemma3_text": _QV, "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": _QV, "qwen3": _QV, "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"], "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
    "distilbert": ["q_lin", "v_lin"],
}
_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")
# PEFT 0.21 condenses a target list this long to the shortest name suffixes that pick out the same modules, and
# writes those into adapter_config.json (its MIN_TARGET_MODULES_FOR_OPTIMIZATION)
SHORTEN_TARGETS_FROM = 20


def name_matches(name: str, patterns: list[str] | str) -> bool:
    """PEFT's rule: a list entry matches the full name or its last dotted part(s); a string is a regex fullmatch."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith(f".{p}") for p in patterns)


def in_transformed_layer(name: str, config: LoraConfig) -> bool:
    """True unless layers_to_transform is set and the module sits in a layer not listed."""
    if not config.layers_to_transform:
        return True
    if config.layers_pattern:
        patterns = [config.layers_pattern] if isinstance(config.layers_pattern, str) else config.layers_pattern
        match = next(filter(None, (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name) for p in patterns)), None)
    else:
        match = _LAYER_INDEX.match(name)
    return match is not None and int(match["idx"]) in config.layers_to_transform


def resolve_target_modules(model: nn.Module, config: LoraConfig) -> list[str] | str:
    """The config's targets, with None and "all-linear" turned into concrete module names."""
    if config.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise LorafitError(f"no default LoRA targets for model type {model_type!r}; pass target_modules "
                               f"(modules here include: {sample_module_names(model)})")
        targets = DEFAULT_TARGETS[model_type]
        return targets if isinstance(targets, str) else list(targets)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        saved = modules_to_save_for(model, config)
        # a layer already wrapped by an earlier adapter (or before load_weights) is still a linear target; as in
        # PEFT the names of layers inside a head (classifier.dense) stay listed (find_targets skips them), but a
        # linear layer that is itself a saved module (DistilBERT's pre_classifier) is left out
        return sorted(name for name, module in model.named_modules()
                      if isinstance(module.base_layer if isinstance(module, LoraLayer) else module, (nn.Linear, Conv1D))
                      and module is not output_head and not _inside_wrapper(model, name)
                      and name.split(".")[-1] not in CLASSIFIER_HEAD_NAMES and not is_saved_module(name, saved))
    return config.target_modules


def is_saved_module(name: str, saved: list[str]) -> bool:
    """PEFT's rule for modules_to_save: a plain suffix match, so "classifier" also takes DistilBERT's
    "pre_classifier" (PEFT trains and saves it for SEQ_CLS; files only load if we do the same)."""
    return bool(name) and any(name.endswith(s) for s in saved)


def _in_saved_module(name: str, saved: list[str]) -> bool:
    parts = name.split(".")
    return any(is_saved_module(".".join(parts[:depth]), saved) for depth in range(1, len(parts) + 1))


def modules_to_save_for(model: nn.Module, config: LoraConfig) -> list[str]:
    """modules_to_save plus, for classification tasks, the head, which a new task must train anyway."""
    names = list(config.modules_to_save or [])
    if config.task_type in ("SEQ_CLS", "TOKEN_CLS"):
        names += [head for head in CLASSIFIER_HEAD_NAMES if head not in names]
    return names


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules the config adapts, checked: an unmatched target is an error, not a no-op."""
    targets = resolve_target_modules(model, config)
    saved = modules_to_save_for(model, config)
    found = []
    for name, module in model.named_modules():
        # an existing LoRA layer is a target again (a second adapter); what sits inside wrappers is not
        if not name or isinstance(module, ModulesToSave) or _inside_wrapper(model, name):
            continue
        if not name_matches(name, targets) or not in_transformed_layer(name, config):
            continue
        if config.exclude_modules and name_matches(name, config.exclude_modules):
            continue
        if _in_saved_module(name, saved):
            continue
        if not isinstance(module, LoraLayer) and layer_kind(module) is None:
            raise LorafitError(f"target module '{name}' is a {type(module).__name__}; lorafit adapts Linear, "
                               "Conv1D and Embedding layers only: target those inside it instead")
        found.append(name)
    if not found:
        shown = targets if isinstance(targets, str) else ", ".join(targets)
        raise LorafitError(f"target modules '{shown}' matched nothing; modules here include: "
                           f"{sample_module_names(model)}")
    return found


def _inside_wrapper(model: nn.Module, name: str) -> bool:
    """True for modules that live inside a LoRA layer or a saved-module copy (never adapt those)."""
    parts = name.split(".")
    for depth in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:depth])), (LoraLayer, ModulesToSave)):
            return True
    return False


def sample_module_names(model: nn.Module, limit: int = 12) -> str:
    """A short, de-duplicated list of leaf module names such as 'query, key, value, dense'."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if name and isinstance(module, (nn.Linear, Conv1D, nn.Embedding, LoraLayer)) and not _inside_wrapper(model, name):
            seen.setdefault(name.split(".")[-1], None)
    names = list(seen)
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def inject_adapter(model: nn.Module, config: LoraConfig, adapter_name: str, routing: BatchRouting) -> list[str]:
    """Add adapter ``adapter_name`` to every targeted module, wrapping modules on first use."""
    names = find_targets(model, config)
    if config.target_modules is None or (isinstance(config.target_modules, str)
                                         and config.target_modules.lower() == ALL_LINEAR):
        # PEFT writes the concrete names into adapter_config.json, and so do we
        config.target_modules = resolve_target_modules(model, config)
    if isinstance(config.target_modules, list) and len(config.target_modules) >= SHORTEN_TARGETS_FROM:
        config.target_modules = shortest_target_names(config.target_modules,
                                                       [name for name, _ in model.named_modules()])
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, LoraLayer):
            layer = wrap_layer(layer, routing, config.fan_in_fan_out)
            _replace(model, name, layer)
        layer.add_adapter(adapter_name, config.rank_for(name), config.alpha_for(name), config.lora_dropout,
                          config.init_lora_weights, config.use_rslora, use_dora=config.use_dora)
    for name in _saved_module_names(model, config):
        wrapper = model.get_submodule(name)
        if not isinstance(wrapper, ModulesToSave):
            wrapper = ModulesToSave(wrapper, routing)
            _replace(model, name, wrapper)
        wrapper.add_adapter(adapter_name)
    return names


def shortest_target_names(targets: list[str], module_names: list[str]) -> list[str]:
    """PEFT's condensed target list: the shortest dotted suffixes that match every target and no other module.

    Targets go in the order of their suffix lists, each taking its shortest suffix that names no other
    module, unless a suffix already taken covers it; the result is sorted (PEFT writes a set)."""
    targets = list(dict.fromkeys(targets))
    ends = tuple("." + t for t in targets)
    taken_elsewhere = {suffix for name in module_names if name not in targets and not name.endswith(ends)
                       for suffix in _suffixes(name)}
    chosen: set[str] = set()
    for name in sorted(targets, key=_suffixes):
        if any(name.endswith("." + suffix) for suffix in chosen):
            continue
        suffix = next((s for s in _suffixes(name) if s not in chosen and s not in taken_elsewhere), None)
        if suffix is not None:
            chosen.add(suffix)
    return sorted(chosen) if chosen and len(chosen) < len(targets) else targets


def _suffixes(name: str) -> list[str]:
    """"a.b.c" -> ["c", "b.c", "a.b.c"]."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]


def _saved_module_names(model: nn.Module, config: LoraConfig) -> list[str]:
    wanted = modules_to_save_for(model, config)
    names = []
    for name, module in model.named_modules():
        if is_saved_module(name, wanted) and not _inside_wrapper(model, name):
            names.append(name)
    # classification configs (ours and PEFT's) list both head names, classifier and score; a model has one
    optional = CLASSIFIER_HEAD_NAMES if config.task_type in ("SEQ_CLS", "TOKEN_CLS") else ()
    missing = [w for w in config.modules_to_save or []
               if w not in optional and not any(n.endswith(w) for n in names)]
    if missing:
        raise LorafitError(f"modules_to_save '{', '.join(missing)}' matched nothing; modules here include: "
                           f"{sample_module_names(model)}")
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def saved_module_wrappers(model: nn.Module) -> list[ModulesToSave]:
    return [m for m in model.modules() if isinstance(m, ModulesToSave)]


def unwrap_all(model: nn.Module, keep_adapter: str | None = None) -> None:
    """Put the base modules back in place of every wrapper.

    With ``keep_adapter`` a saved module keeps that adapter's trained copy (what merging wants);
    otherwise the original module returns.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            _replace(model, name, module.base_layer)
        elif isinstance(module, ModulesToSave):
            keep = module.modules_to_save[keep_adapter] if keep_adapter in module.modules_to_save else module.original_module
            _replace(model, name, keep)


def check_each_target_matches(model: nn.Module, targets: list[str] | str | None) -> None:
    """Stricter than PEFT, for the command line: every name in a target list must match some module.

    PEFT (and get_lora_model) refuse a list only when no name matches, so a misspelt name beside a
    right one silently trains less than was asked for."""
    if not isinstance(targets, list):
        return
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in targets if not any(name_matches(name, [t]) for name in names)]
    if not missing:
        return
    if any(t.lower() == ALL_LINEAR for t in missing):
        raise LorafitError(f"target modules {', '.join(targets)}: '{ALL_LINEAR}' adapts every linear layer and "
                           "stands alone; pass it by itself or list module names only")
    shown = ", ".join(f"'{t}'" for t in missing)
    raise LorafitError(f"target module{'s' if len(missing) > 1 else ''} {shown} matched nothing; "
                       f"modules here include: {sample_module_names(model)}")
