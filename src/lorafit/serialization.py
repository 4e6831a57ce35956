"""Adapter files in PEFT's format: adapter_config.json plus adapter_model.safetensors, written atomically.

Tensor keys are the module path inside the base model behind PEFT's ``base_model.model.`` prefix,
without the adapter name (``...query.lora_A.weight``); trained copies of saved modules are stored
under the original module's name (``...classifier.dense.weight``). Only safetensors are read.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorafit.config import LoraConfig
from lorafit.errors import LorafitError
from lorafit.inject import find_targets, modules_to_save_for, name_matches
from lorafit.layers import LoraEmbedding, LoraLayer, LoraLinear, linear_features
from lorafit.saved_modules import ModulesToSave

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` and rename it over ``path`` only once writing succeeded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, usual_mode())  # mkstemp makes it 0600
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def usual_mode(directory: bool = False) -> int:
    """The mode open() or mkdir() would give under the user's umask (temporary ones are 0600 / 0700)."""
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    try:  # read without setting: os.umask can only be read by changing it, for every thread at once
        status = Path("/proc/self/status").read_text(encoding="ascii")
        return int(next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def adapter_state_dict(model: nn.Module, adapter_name: str, config: LoraConfig) -> dict[str, torch.Tensor]:
    """One adapter's tensors under PEFT's key names (``model`` is the wrapped transformers model)."""
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
    state.update(_trainable_biases(model, config))
    return {KEY_PREFIX + key: tensor.detach().contiguous() for key, tensor in state.items()}


def _trainable_biases(model: nn.Module, config: LoraConfig) -> dict[str, torch.Tensor]:
    if config.bias == "none":
        return {}
    if config.bias == "lora_only":
        return {f"{path}.base_layer.bias": m.base_layer.bias for path, m in model.named_modules()
                if isinstance(m, LoraLayer) and getattr(m.base_layer, "bias", None) is not None}
    return {name: p for name, p in model.named_parameters()
            if name.endswith(".bias") and ".modules_to_save." not in name and ".original_module." not in name}


def save_adapter(model: nn.Module, adapter_name: str, config: LoraConfig, directory: str | os.PathLike) -> Path:
    """Write one adapter; weights first, so a config file never points at missing weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(adapter_state_dict(model, adapter_name, config), str(tmp), metadata={"format": "pt"})
    saved = LoraConfig(**{**config.to_dict(), "inference_mode": True,
                          "modules_to_save": modules_to_save_for(model, config) or None})
    if saved.base_model_name_or_path is None:
        saved.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    write_json(directory / CONFIG_NAME, saved.to_peft_dict())
    return directory


def read_adapter(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and tensors of an adapter directory; refuses pickled weights outright."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        hint = "; it holds a pickled adapter_model.bin, which lorafit never loads" if (directory / "adapter_model.bin").exists() else ""
        raise LorafitError(f"'{directory}' is not an adapter directory (no {CONFIG_NAME}){hint}; "
                           "pass the folder that save_pretrained or `lorafit train` wrote")
    if not (directory / WEIGHTS_NAME).is_file():
        raise LorafitError(f"adapter '{directory}' has no {WEIGHTS_NAME}; lorafit loads safetensors only "
                           "(convert a pickled adapter_model.bin with PEFT's save_pretrained)")
    try:
        config = LoraConfig.from_peft_dict(json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8")))
    except (ValueError, TypeError) as err:
        raise LorafitError(f"adapter '{directory}': {err}") from None
    tensors = {key.removeprefix(KEY_PREFIX): value for key, value in load_file(str(directory / WEIGHTS_NAME)).items()}
    return config, tensors


def expected_adapter_shapes(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """The tensors (and their shapes) an adapter with this config must provide for this model."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in find_targets(model, config):
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        r = config.rank_for(path)
        # PEFT also saves the full base weight of a targeted embed_tokens / lm_head (save_embedding_layers)
        shapes[f"{path}.base_layer.weight"] = tuple(base.weight.shape)
        if isinstance(base, nn.Embedding):
            shapes[f"{path}.lora_embedding_A"] = (r, base.num_embeddings)
            shapes[f"{path}.lora_embedding_B"] = (base.embedding_dim, r)
        else:
            in_f, out_f = linear_features(base, config.fan_in_fan_out)
            shapes[f"{path}.lora_A.weight"] = (r, in_f)
            shapes[f"{path}.lora_B.weight"] = (out_f, r)
    for path, module in model.named_modules():
        if path and any(name_matches(path, [w]) for w in modules_to_save_for(model, config)):
            original = module.original_module if isinstance(module, ModulesToSave) else module
            for key, tensor in original.state_dict().items():
                shapes[f"{path}.{key}"] = tuple(tensor.shape)
    return shapes


def check_adapter_fits(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise one error naming the first tensor that does not fit this model, before anything changes."""
    try:
        expected = expected_adapter_shapes(model, config)
    except LorafitError as err:
        raise LorafitError(f"adapter '{source}' does not fit this model: {err}") from None
    biases = {k for k in tensors if k.endswith(".bias") and k not in expected}
    for key, tensor in tensors.items():
        if key in biases:
            continue
        if key not in expected:
            module = key.rsplit(".lora_", 1)[0] if ".lora_" in key else key.rsplit(".", 1)[0]
            raise LorafitError(f"adapter '{source}' does not fit this model: it has weights for module '{module}', "
                               "which this model lacks; load it onto the base model it was trained on")
        if tuple(tensor.shape) != expected[key]:
            raise LorafitError(f"adapter '{source}' does not fit this model: '{key}' has shape "
                               f"{tuple(tensor.shape)} in the adapter but {expected[key]} here; load it onto the "
                               "base model it was trained on")
    missing = [k for k in expected if k not in tensors and ".lora_" in k]
    if missing:
        raise LorafitError(f"adapter '{source}' is incomplete: no tensor '{missing[0]}' "
                           f"({len(missing)} missing); the file is damaged or was written for another model")
