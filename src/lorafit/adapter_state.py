"""An adapter's tensors in a model: which are its own, and what its file holds (the same set PEFT saves).

File keys are the module path inside the base model behind PEFT's ``base_model.model.`` prefix, without the
adapter name (``...query.lora_A.weight``); trained copies of saved modules are stored under the
original module's name (``...classifier.dense.weight``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from lorafit.config import LoraConfig
from lorafit.layers import LoraLayer
from lorafit.saved_modules import ModulesToSave

KEY_PREFIX = "base_model.model."
_EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's own live tensors under their file keys: what each LoRA layer declares, and the trained
    copies of saved modules (``model`` is the wrapped transformers model)."""
    own: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if adapter_name in _adapters_held(module):
            own.update({f"{path}.{key}": tensor for key, tensor in module.adapter_tensors(adapter_name).items()})
    return own


def adapter_parameters(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """The adapter's own trainable tensors (its saved modules' buffers left out)."""
    return [t for t in adapter_tensors(model, adapter_name).values() if isinstance(t, nn.Parameter)]


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter some module of the model holds, in the order they were added."""
    names: dict[str, None] = {}
    for module in model.modules():
        names.update(dict.fromkeys(_adapters_held(module)))
    return list(names)


def _adapters_held(module: nn.Module) -> Iterable[str]:
    """The adapters a LoRA layer or saved module holds tensors for; none for any other module."""
    if isinstance(module, LoraLayer):
        return module.r
    return module.modules_to_save if isinstance(module, ModulesToSave) else ()


def set_trainable(model: nn.Module, adapter_name: str, trainable: bool, bias: str, reset_biases: bool) -> None:
    """Train adapter ``adapter_name`` (or freeze it): its own tensors and the base biases its ``bias`` mode
    trains; every other adapter's tensors frozen. ``reset_biases`` first freezes the base biases that
    another adapter's bias mode made trainable."""
    own: set[int] = set()
    for module in model.modules():
        for name in _adapters_held(module):
            for tensor in module.adapter_tensors(name).values():
                if isinstance(tensor, nn.Parameter):  # a saved module's buffers stay as they are
                    tensor.requires_grad_(trainable and name == adapter_name)
                    own.add(id(tensor))
    if reset_biases or bias == "all":
        base_biases = [(name, param) for name, param in model.named_parameters()
                       if name.endswith(".bias") and id(param) not in own]
        for name, param in base_biases:
            if reset_biases:
                param.requires_grad_(False)
            if bias == "all" and ".original_module." not in name:
                param.requires_grad_(trainable)
    if bias == "lora_only":
        for layer in model.modules():
            if isinstance(layer, LoraLayer) and getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(trainable)


def adapter_state_dict(model: nn.Module, adapter_name: str, config: LoraConfig) -> dict[str, torch.Tensor]:
    """One adapter's tensors under PEFT's key names, the same set PEFT saves (``model`` is the wrapped
    transformers model)."""
    state = adapter_tensors(model, adapter_name)
    state.update(_trainable_biases(model, adapter_name, config))
    state.update(_embedding_layers(model, config))
    out, seen = {}, set()
    for key, tensor in state.items():
        tensor = tensor.detach().contiguous()
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        # safetensors refuses aliases (a head's bias under two keys, tied embeddings): store copies
        out[KEY_PREFIX + key] = tensor.clone() if storage in seen and tensor.numel() else tensor
        seen.add(storage)
    return out


def _trainable_biases(model: nn.Module, adapter_name: str, config: LoraConfig) -> dict[str, torch.Tensor]:
    if config.bias == "none":
        return {}
    if config.bias == "lora_only":
        return {f"{path}.base_layer.bias": m.base_layer.bias for path, m in model.named_modules()
                if isinstance(m, LoraLayer) and getattr(m.base_layer, "bias", None) is not None}
    # PEFT takes every state-dict key ending in "bias" and drops the adapter name, so a saved head also gives
    # 'classifier.modules_to_save.bias' and 'classifier.original_module.bias'; its loader expects that set
    others = [name for name in adapter_names(model) if name != adapter_name]
    biases = {}
    for key, tensor in model.state_dict().items():
        if not key.endswith(".bias") or any(f".{o}." in key for o in others):
            continue
        biases[key.replace(f".modules_to_save.{adapter_name}.", ".modules_to_save.")] = tensor
    return biases


def _embedding_layers(model: nn.Module, config: LoraConfig) -> dict[str, torch.Tensor]:
    """The full input/output embeddings, which PEFT saves too (its save_embedding_layers="auto") when the
    targets name embed_tokens or lm_head (the base weight of the adapted ones), or when the vocabulary was
    resized since the base model in base_model_name_or_path (the whole layers)."""
    if not hasattr(model, "get_input_embeddings"):
        return {}
    targets = config.target_modules
    if isinstance(targets, str):
        targeted = any(re.fullmatch(targets, name) for name, _ in model.named_modules()
                       if re.match(r"(.*\.)?(embed_tokens|lm_head)$", name))
    else:
        targeted = any(name in (targets or []) for name in _EMBEDDING_LAYER_NAMES)
    if not targeted and not _vocabulary_resized(model, config):
        return {}
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    state = {}
    for path, module in model.named_modules():
        if not any(module is layer for layer in layers):
            continue
        if not targeted:
            state.update({f"{path}.{key}": value for key, value in module.state_dict().items()})
        elif isinstance(module, LoraLayer) and isinstance(module.base_layer, (nn.Linear, nn.Embedding)):
            state.update({f"{path}.base_layer.{key}": value for key, value in module.base_layer.state_dict().items()})
    return state


def _vocabulary_resized(model: nn.Module, config: LoraConfig) -> bool:
    """True when the base model's own config.json (a local folder; the hub is not asked) has another
    vocabulary size than this model."""
    source = config.base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None)
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if not source or not vocab_size or not (Path(source) / "config.json").is_file():
        return False
    try:
        saved = json.loads((Path(source) / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False
    return saved is not None and saved != vocab_size
