"""Adapter files in PEFT's format: adapter_config.json plus adapter_model.safetensors, written atomically.

Tensor keys are the module path inside the base model behind PEFT's ``base_model.model.`` prefix,
without the adapter name (``...query.lora_A.weight``); trained copies of saved modules are stored
under the original module's name (``...classifier.dense.weight``). Only safetensors are read.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lorafit.adapter_state import KEY_PREFIX, adapter_state_dict, adapter_tensors
from lorafit.config import LoraConfig
from lorafit.errors import LorafitError, first_line
from lorafit.files import atomic_path, write_json
from lorafit.inject import _saved_module_names as saved_module_names
from lorafit.inject import find_targets, is_saved_module, modules_to_save_for
from lorafit.layers import ADAPTER_PREFIX, LoraLayer, layer_kind
from lorafit.saved_modules import ModulesToSave
from lorafit.variants.residual_init import converted_to_lora

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


Shapes = dict[str, tuple[int, ...]]


def save_adapter(model: nn.Module, adapter_name: str, config: LoraConfig, directory: str | os.PathLike,
                 initial_adapter: str | os.PathLike | None = None, expected: Shapes | None = None) -> Path:
    """Write one adapter; weights first, so a config file never points at missing weights.

    ``initial_adapter``: the adapter's folder saved at its start; the adapter is then written as the plain
    LoRA it equals on the original base weights (``residual_init.converted_to_lora``), and ``expected`` no
    longer applies (the rank doubles).

    The written file is read back and checked against ``expected`` (file key -> full shape; by default
    the shapes of the tensors saved) before it replaces anything (check_adapter_file).
    """
    tensors = adapter_state_dict(model, adapter_name, config)
    if initial_adapter is not None:
        _, initial = read_adapter(initial_adapter)
        plain = {key.removeprefix(KEY_PREFIX): tensor for key, tensor in tensors.items()}
        config, plain = converted_to_lora(config, plain, initial, str(initial_adapter), model, adapter_name)
        tensors = {KEY_PREFIX + key: tensor for key, tensor in plain.items()}
        expected = None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        check_adapter_file(tmp, expected or tensor_shapes(tensors), directory / WEIGHTS_NAME)
    saved = LoraConfig(**{**config.to_dict(), "inference_mode": True,
                          "modules_to_save": modules_to_save_for(model, config) or None})
    if saved.base_model_name_or_path is None:
        saved.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    # without a task_type PEFT's AutoPeftModel finds the base model's class here
    auto_mapping = None if saved.task_type else {"base_model_class": type(model).__name__,
                                                 "parent_library": type(model).__module__}
    write_json(directory / CONFIG_NAME, saved.to_peft_dict(auto_mapping))
    return directory


def tensor_shapes(state: dict[str, torch.Tensor]) -> Shapes:
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def check_adapter_file(path: Path, expected: Shapes, name: Path) -> None:
    """Refuse a written weights file (``name`` once in place) that lacks an expected key, holds a tensor at
    another shape than its full one, or holds an empty tensor: what a sharded model (FSDP, ZeRO-3) saved
    without gathering its parameters gives."""
    with safe_open(str(path), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    problems = [f"{key} missing" for key in expected if key not in shapes]
    problems += [f"{key} has shape {list(shapes[key])}, expected {list(shape)}" for key, shape in expected.items()
                 if key in shapes and shapes[key] != shape]
    problems += [f"{key} is empty" for key, shape in shapes.items() if math.prod(shape) == 0 and expected.get(key, shape) == shape]
    if not shapes:
        problems.append("it holds no tensor")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise LorafitError(f"adapter weights for '{name}' failed the check after writing, so nothing was saved: "
                           f"{'; '.join(problems[:3])}{more}; a sharded model (FSDP) must be saved with its "
                           "parameters gathered (lorafit train does this)")


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
    config = read_adapter_config(directory)
    try:
        tensors = load_file(str(directory / WEIGHTS_NAME))
    except (SafetensorError, OSError) as err:
        raise damaged_weights_error(directory / WEIGHTS_NAME, err) from None
    return config, {key.removeprefix(KEY_PREFIX): value for key, value in tensors.items()}


def damaged_weights_error(path: Path, err: Exception) -> LorafitError:
    reason = first_line(err)
    return LorafitError(f"'{path}' is damaged ({reason}): save the adapter again, or copy it again from the run "
                        "that trained it")


def read_config_json(directory: str | os.PathLike) -> dict:
    """adapter_config.json as a dict; a file that is not a JSON object is one error naming it."""
    path = Path(directory) / CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged_config(path, f"not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise _damaged_config(path, f"a JSON {type(data).__name__}, not a JSON object")
    return data


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    """The LoraConfig of an adapter directory, every field's type checked first (PEFT writes all of these)."""
    path = Path(directory) / CONFIG_NAME
    data = read_config_json(directory)
    for key in _REQUIRED_FIELDS:
        if key not in data:
            raise _damaged_config(path, f"it has no '{key}'")
    for key, (types, items, expected) in _FIELDS.items():
        if key in data and not (_is_a(data[key], types) and all(_is_a(item, items) for item in _entries(data[key]))):
            raise _damaged_config(path, f"'{key}' is {data[key]!r}, where PEFT writes {expected}")
    try:
        return LoraConfig.from_peft_dict(data)
    except (ValueError, TypeError) as err:
        raise LorafitError(f"adapter '{Path(directory)}': {err}") from None


def _damaged_config(path: Path, problem: str) -> LorafitError:
    return LorafitError(f"'{path}' is damaged ({problem}): save the adapter again, or copy it again from the run "
                        "that trained it")


# adapter_config.json fields whose wrong type would otherwise surface later as a traceback or a wrong model:
# field -> (types it may have, types of its entries, what PEFT writes there)
_REQUIRED_FIELDS = ("r", "lora_alpha", "target_modules")
_NAMES = (list, str, type(None))
_FIELDS = {
    "r": ((int,), (), "a positive integer"), "lora_alpha": ((int, float), (), "a number"),
    "lora_dropout": ((int, float), (), "a number"), "bias": ((str,), (), "a string"),
    "target_modules": (_NAMES, (str,), "a list of module names, a regex or null"),
    "exclude_modules": (_NAMES, (str,), "a list of module names, a regex or null"),
    "modules_to_save": ((list, type(None)), (str,), "a list of module names or null"),
    "layers_to_transform": ((list, int, type(None)), (int,), "a layer index, a list of them or null"),
    "layers_pattern": (_NAMES, (str,), "a name, a list of names or null"),
    "rank_pattern": ((dict,), (int,), "an object of integer ranks"),
    "alpha_pattern": ((dict,), (int, float), "an object of numbers"),
    "init_lora_weights": ((bool, str), (), "true, false or a method name"),
    "use_rslora": ((bool,), (), "true or false"), "use_dora": ((bool,), (), "true or false"),
    "fan_in_fan_out": ((bool,), (), "true or false"), "inference_mode": ((bool,), (), "true or false"),
    "base_model_name_or_path": ((str, type(None)), (), "a string or null"),
    "task_type": ((str, type(None)), (), "a task name or null"),
}


def _is_a(value, types: tuple) -> bool:
    # JSON true/false are Python bools, which are ints too: an integer field must not take them
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def _entries(value) -> list:
    return list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else []


def expected_adapter_shapes(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """The tensors (and their shapes) an adapter with this config must provide for this model."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in find_targets(model, config):
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        kind = type(module) if isinstance(module, LoraLayer) else layer_kind(module)
        # PEFT also saves the full base weight of a targeted embed_tokens / lm_head (save_embedding_layers)
        shapes[f"{path}.base_layer.weight"] = tuple(base.weight.shape)
        for key, shape in kind.adapter_shapes(base, config.rank_for(path), config.fan_in_fan_out,
                                              use_dora=config.use_dora).items():
            shapes[f"{path}.{key}"] = shape
    for path, module in model.named_modules():
        if is_saved_module(path, modules_to_save_for(model, config)):
            original = module.original_module if isinstance(module, ModulesToSave) else module
            for key, tensor in original.state_dict().items():
                shapes[f"{path}.{key}"] = tuple(tensor.shape)
    return shapes


def check_adapter_fits(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise one error naming the first tensor that does not fit this model, before anything changes.

    Every tensor must land somewhere: LoRA factors and saved-module copies where the config puts them,
    anything else (biases of ``bias="all"``, PEFT's copy of a base embedding) on a base parameter.
    """
    try:
        expected = expected_adapter_shapes(model, config)
        saved_module_names(model, config)  # raises on modules_to_save the model lacks
    except LorafitError as err:
        raise LorafitError(f"adapter '{source}' does not fit this model: {err}") from None
    base = {plain_name(name): tuple(param.shape) for name, param in model.named_parameters(remove_duplicate=False)
            if not is_adapter_tensor(name)}
    for key, tensor in tensors.items():
        plain = plain_name(key)
        shape = expected.get(key, expected.get(plain, None if is_adapter_tensor(key) else base.get(plain)))
        _check_shape(key, tensor, shape, source)
    provided = set(tensors) | {plain_name(k) for k in tensors if ".original_module." not in k}
    # the base weight PEFT saves beside a targeted embedding is optional; factors and saved modules are not
    missing = [k for k in expected if k not in provided and not k.endswith(".base_layer.weight")]
    if missing:
        raise LorafitError(f"adapter '{source}' is incomplete: no tensor '{missing[0]}' "
                           f"({len(missing)} missing); the file is damaged or was written for another model")


def adapter_tensor_targets(model: nn.Module, adapter_name: str, config: LoraConfig, tensors: dict[str, torch.Tensor],
                           source: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, saved tensor) pairs for loading into adapter ``adapter_name``, all checked, none copied yet.

    The adapter's own factors and saved-module copies must all be in the file, saved with the same
    scaling; other keys go to the base parameter of that name (PEFT's ``original_module`` keys always to
    the frozen original).
    """
    own = adapter_tensors(model, adapter_name)
    base = {plain_name(name): param for name, param in model.named_parameters(remove_duplicate=False)
            if not is_adapter_tensor(name)}
    pairs = []
    for key, tensor in tensors.items():
        plain = plain_name(key)
        if ".original_module." in key:
            target = base.get(plain)
        else:
            target = own[key] if key in own else own[plain] if plain in own else base.get(plain)
        _check_shape(key, tensor, None if target is None else tuple(target.shape), source)
        pairs.append((target, tensor))
    provided = set(tensors) | {plain_name(k) for k in tensors if ".original_module." not in k}
    missing = [k for k in own if k not in provided]
    if missing:
        raise LorafitError(f"adapter '{source}' is incomplete for adapter {adapter_name!r}: no tensor '{missing[0]}' "
                           f"({len(missing)} missing); load it with load_adapter under a new name instead")
    for path, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.r:
            continue
        saved, here = config.scaling_for(path), layer.scaling[adapter_name]
        if not math.isclose(saved, here):
            raise LorafitError(f"adapter '{source}' was saved with another lora_alpha / r than adapter "
                               f"{adapter_name!r} (scaling {saved:g} at '{path}', here {here:g}); load it with "
                               "load_adapter under a new name")
    return pairs


def copy_all_or_nothing(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy checked (parameter, tensor) pairs; if any copy fails, every parameter gets its old value back."""
    backup = [(param, param.detach().clone()) for param, _ in pairs]
    with torch.no_grad():
        try:
            for param, tensor in pairs:
                param.copy_(tensor.to(param.dtype))
        except BaseException:
            for param, old in backup:
                param.copy_(old)
            raise


def _check_shape(key: str, tensor: torch.Tensor, shape: tuple[int, ...] | None, source: str) -> None:
    if shape is None:
        if f".{ADAPTER_PREFIX}" in key:
            module = key.rsplit(f".{ADAPTER_PREFIX}", 1)[0]
            raise LorafitError(f"adapter '{source}' does not fit this model: it has weights for module '{module}', "
                               "which this model lacks; load it onto the base model it was trained on")
        raise LorafitError(f"adapter '{source}' does not fit this model: its tensor '{key}' matches no parameter "
                           "here; load it onto the base model it was trained on")
    if tuple(tensor.shape) != shape:
        raise LorafitError(f"adapter '{source}' does not fit this model: '{key}' has shape {tuple(tensor.shape)} "
                           f"in the adapter but {shape} here; load it onto the base model it was trained on")


def plain_name(key: str) -> str:
    """A parameter's name in the unwrapped base model (PEFT's and lorafit's wrapper segments left out)."""
    return ".".join(part for part in key.split(".") if part not in ("base_layer", "original_module", "modules_to_save"))


def is_adapter_tensor(name: str) -> bool:
    """True for LoRA factors and saved-module copies, in a model's parameter names or a file's keys."""
    return f".{ADAPTER_PREFIX}" in name or ".modules_to_save." in name


def get_peft_model_state_dict(model, state_dict: dict | None = None,
                              adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """One adapter's tensors with the keys PEFT's ``get_peft_model_state_dict`` gives (and PEFT's files hold):
    ``base_model.model.<module>.lora_A.weight`` and so on, without the adapter name. ``state_dict`` is
    accepted for PEFT's signature and must be None: the tensors are read from the model."""
    if state_dict is not None:
        raise LorafitError("get_peft_model_state_dict reads the tensors from the model; call it without state_dict")
    model._require(adapter_name)  # a LoraModel
    return adapter_state_dict(model.model, adapter_name, model.peft_config[adapter_name])


def set_peft_model_state_dict(model, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default") -> None:
    """Copy tensors keyed as ``get_peft_model_state_dict`` (or a PEFT file) keys them into an existing adapter;
    a state dict that does not fit the adapter raises one error and changes nothing."""
    model._require(adapter_name)
    tensors = {key.removeprefix(KEY_PREFIX): value for key, value in peft_model_state_dict.items()}
    config = model.peft_config[adapter_name]
    check_adapter_fits(model.model, config, tensors, "state dict")
    copy_all_or_nothing(adapter_tensor_targets(model.model, adapter_name, config, tensors, "state dict"))
