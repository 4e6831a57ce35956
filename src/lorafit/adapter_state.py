"""What an adapter file holds: one adapter's tensors under PEFT's key names, the same set PEFT saves.

Keys are the module path inside the base model behind PEFT's ``base_model.model.`` prefix, without the
adapter name (``...query.lora_A.weight``); trained copies of saved modules are stored under the
original module's name (``...classifier.dense.weight``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from lorafit.config import LoraConfig
from lorafit.layers import LoraEmbedding, LoraLayer, LoraLinear
from lorafit.saved_modules import ModulesToSave

KEY_PREFIX = "base_model.model."
_EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def adapter_state_dict(model: nn.Module, adapter_name: str, config: LoraConfig) -> dict[str, torch.Tensor]:
    """One adapter's tensors under PEFT's key names, the same set PEFT saves (``model`` is the wrapped
    transformers model)."""
    state: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLinear) and adapter_name in module.r:
            state[f"{path}.lora_A.weight"] = module.lora_A[adapter_name].weight
            state[f"{path}.lora_B.weight"] = module.lora_B[adapter_name].weight
        elif isinstance(module, LoraEmbedding) and adapter_name in module.r:
            state[f"{path}.lora_embedding_A"] = module.lora_embedding_A[adapter_name]
            state[f"{path}.lora_embedding_B"] = module.lora_embedding_B[adapter_name]
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for key, tensor in module.modules_to_save[adapter_name].state_dict().items():
                state[f"{path}.{key}"] = tensor
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
    others = [name for name in _adapter_names(model) if name != adapter_name]
    biases = {}
    for key, tensor in model.state_dict().items():
        if not key.endswith(".bias") or any(f".{o}." in key for o in others):
            continue
        biases[key.replace(f".modules_to_save.{adapter_name}.", ".modules_to_save.")] = tensor
    return biases


def _adapter_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for module in model.modules():
        if isinstance(module, LoraLayer):
            names.update(module.r)
        elif isinstance(module, ModulesToSave):
            names.update(module.modules_to_save)
    return names


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
