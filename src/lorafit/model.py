"""LoraModel: one base model, any number of named adapters, and the switches between them."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from lorafit.adapter_arithmetic import check_saved_modules, fill_weighted_adapter, plan_weighted_adapter
from lorafit.adapter_state import adapter_parameters, adapter_state_dict, set_trainable
from lorafit.config import LoraConfig
from lorafit.errors import LorafitError
from lorafit.inject import inject_adapter, lora_layers, saved_module_wrappers, unwrap_all
from lorafit.layers import BASE_ADAPTER, BatchRouting, LoraLayer
from lorafit.quantized import dequantize_model
from lorafit.saved_modules import BaseBiases, ModulesToSave
from lorafit.serialization import (adapter_tensor_targets, check_adapter_fits, copy_all_or_nothing, read_adapter,
                                   save_adapter, tensor_shapes)
from lorafit.variants.residual_init import check_alone, warn_if_rederived_at_random

DEFAULT_ADAPTER = "default"


def get_lora_model(model: nn.Module, config: LoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> "LoraModel":
    """Freeze ``model`` and add a trainable LoRA adapter to it (PEFT's ``get_peft_model``)."""
    return LoraModel(model, config, adapter_name)


class LoraModel(nn.Module):
    """A transformers model with LoRA adapters injected into it.

    Switching adapters flips which low-rank factors each layer adds; the base weights are never
    copied or reloaded. ``model(**batch, adapter_names=[...])`` runs each row with its own adapter.
    """

    def __init__(self, model: nn.Module, config: LoraConfig | None = None, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        _refuse_wrapped(model)
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.routing = BatchRouting()
        self._active_adapter: str | None = None
        self._base_biases = BaseBiases()
        self._disabled: tuple | None = None  # what disable_adapter_layers undoes
        with self._undone_on_failure(adapter_name):
            model.requires_grad_(False)
            if config is not None:
                self.add_adapter(adapter_name, config)
                self.set_adapter(adapter_name)

    # --- adapters ------------------------------------------------------------------------------
    @property
    def active_adapter(self) -> str | None:
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return [self._active_adapter] if self._active_adapter else []

    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Inject a new adapter (inactive until ``set_adapter``); the base weights are untouched."""
        if adapter_name in self.peft_config:
            raise LorafitError(f"adapter {adapter_name!r} already exists; pick another name or delete_adapter() it")
        if adapter_name == BASE_ADAPTER:
            raise LorafitError(f"{BASE_ADAPTER!r} is reserved for 'no adapter' in mixed batches; pick another name")
        check_alone(adapter_name, config, self.peft_config)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
        self._base_biases.remember(self.model, config.bias)
        inject_adapter(self.model, config, adapter_name, self.routing)
        self.peft_config[adapter_name] = config
        if self._active_adapter is None:
            self.set_adapter(adapter_name)
        else:  # the new adapter's fresh parameters stay frozen until set_adapter; the active one trains on
            active = self._active_adapter
            self._set_trainable(active, trainable=not self.peft_config[active].inference_mode)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one applied and the one trained; the others stay frozen.

        Merged adapters are unmerged first, with a warning, as PEFT does: otherwise their weights would
        silently stay in the base model under the new adapter.
        """
        self._require(adapter_name)
        merged = [layer for layer in lora_layers(self.model) if layer.merged]
        if merged:
            names = sorted({name for layer in merged for name in layer.merged_adapters})
            warnings.warn(f"adapter(s) {', '.join(names)} are merged into the base weights; unmerging them "
                          f"before switching to {adapter_name!r}", UserWarning, stacklevel=2)
            for layer in merged:
                layer.unmerge()
        self._activate(adapter_name)

    def _activate(self, adapter_name: str) -> None:
        for module in [*lora_layers(self.model), *saved_module_wrappers(self.model)]:
            module.active_adapter = adapter_name
        self._active_adapter = adapter_name
        self._set_trainable(adapter_name, trainable=not self.peft_config[adapter_name].inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self._require(adapter_name)
        for module in [*lora_layers(self.model), *saved_module_wrappers(self.model)]:
            module.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if self._active_adapter == adapter_name:
            self._active_adapter = None
            if self.peft_config:  # adapters still merged stay merged, as in PEFT
                self._activate(next(iter(self.peft_config)))

    def load_adapter(self, adapter_dir: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER,
                     is_trainable: bool = False) -> None:
        """Add an adapter saved by lorafit or PEFT; a file that does not fit leaves the model as it was."""
        if adapter_name in self.peft_config:
            raise LorafitError(f"adapter {adapter_name!r} already exists; pick another name or delete_adapter() it")
        config, tensors = read_adapter(adapter_dir)
        warn_if_rederived_at_random(config, str(adapter_dir))
        config.inference_mode = not is_trainable
        check_adapter_fits(self.model, config, tensors, str(adapter_dir))
        with self._undone_on_failure(adapter_name):
            self.add_adapter(adapter_name, config)
            copy_all_or_nothing(adapter_tensor_targets(self.model, adapter_name, config, tensors, str(adapter_dir)))
        # add_adapter already set requires_grad: the loaded adapter trains only if it is the active one
        # and is_trainable; an adapter loaded beside the active one leaves that one's training as it was

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str = "total") -> None:
        """Add ``adapter_name``, a weighted combination of loaded adapters (PEFT's method and semantics: see
        ``lorafit.adapter_arithmetic``). It starts inactive and frozen; a bad argument changes nothing, and an
        existing ``adapter_name`` is refused (PEFT silently keeps the old one)."""
        if adapter_name in self.peft_config:
            raise LorafitError(f"adapter {adapter_name!r} already exists; pick another name or delete_adapter() it")
        plan = plan_weighted_adapter(self.peft_config, adapters, weights, combination_type, svd_rank, svd_clamp,
                                     svd_full_matrices, svd_driver, density, majority_sign_method)
        check_saved_modules(self.model, plan.adapters)
        with self._undone_on_failure(adapter_name):
            self.add_adapter(adapter_name, plan.config)
            fill_weighted_adapter(self.model, plan, adapter_name)

    def load_weights(self, adapter_dir: str | os.PathLike, adapter_name: str) -> None:
        """Overwrite an existing adapter's weights with saved ones (resuming a run, loading best/)."""
        self._require(adapter_name)
        config, tensors = read_adapter(adapter_dir)
        check_adapter_fits(self.model, config, tensors, str(adapter_dir))
        copy_all_or_nothing(adapter_tensor_targets(self.model, adapter_name, config, tensors, str(adapter_dir)))

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, adapter_dir: str | os.PathLike,
                        adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False) -> "LoraModel":
        """Wrap ``base_model`` and load a saved adapter onto it (PEFT's ``PeftModel.from_pretrained``)."""
        requires_grad = [(param, param.requires_grad) for param in base_model.parameters()]
        lora_model = cls(base_model)  # freezes base_model
        try:
            lora_model.load_adapter(adapter_dir, adapter_name, is_trainable=is_trainable)
        except BaseException:
            for param, flag in requires_grad:  # an adapter that does not fit leaves the model as it was
                param.requires_grad_(flag)
            raise
        return lora_model

    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
                        expected_shapes: dict[str, dict[str, tuple[int, ...]]] | None = None) -> None:
        """PEFT's layout: the ``default`` adapter at the top, every other one in a sub-folder of its name.

        ``path_initial_model_for_weight_conversion`` (PEFT's): the folder an adapter initialised with PiSSA or
        OLoRA was saved to before training; the adapter is then written as a plain LoRA of twice the rank
        that applies to the original, unchanged base model.

        Each file is checked after writing (every key, full shapes, nothing empty); ``expected_shapes``
        (adapter name -> ``adapter_shapes``, taken before the model was sharded) is what it must hold.
        """
        for name in selected_adapters or list(self.peft_config):
            self._require(name)
            directory = Path(save_directory) if name == DEFAULT_ADAPTER else Path(save_directory) / name
            save_adapter(self.model, name, self.peft_config[name], directory, path_initial_model_for_weight_conversion,
                         (expected_shapes or {}).get(name))

    def adapter_shapes(self, adapter_name: str | None = None) -> dict[str, tuple[int, ...]]:
        """The file keys and full shapes an adapter's save holds; taken before FSDP shards the model, they
        are what every later save of it is checked against."""
        name = adapter_name or self.active_adapter
        self._require(name)
        return tensor_shapes(adapter_state_dict(self.model, name, self.peft_config[name]))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run exactly the base model inside the block: LoRA updates and trained head copies are off, merged
        weights are unmerged for it, and biases trained with bias="all"/"lora_only" hold their base values
        (PEFT leaves those trained biases in place and only warns)."""
        already_off = self._disabled is not None  # by disable_adapter_layers(), which stays in force
        self.disable_adapter_layers()
        try:
            yield
        finally:
            if not already_off:
                self.enable_adapter_layers()

    def disable_adapter_layers(self) -> None:
        """Every adapter off until ``enable_adapter_layers()``: exactly the base model, as in ``disable_adapter()``."""
        if self._disabled is not None:
            return
        layers, wrappers = lora_layers(self.model), saved_module_wrappers(self.model)
        merged = {layer: list(layer.merged_adapters) for layer in layers if layer.merged}
        for layer in merged:
            layer.unmerge()
        for module in [*layers, *wrappers]:
            module.disabled = True
        self._disabled = (merged, self._base_biases.put())

    def enable_adapter_layers(self) -> None:
        """Undo ``disable_adapter_layers()``: trained biases and merged weights come back as they were."""
        if self._disabled is None:
            return
        merged, trained = self._disabled
        self._disabled = None
        self._base_biases.put(trained)
        for module in [*lora_layers(self.model), *saved_module_wrappers(self.model)]:
            module.disabled = False
        for layer, names in merged.items():
            layer.merge(names)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Gradients on or off for the named adapters' LoRA factors and trained module copies, as in PEFT."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self._require(name)
        for name in names:
            for param in adapter_parameters(self.model, name):
                param.requires_grad_(requires_grad)

    @property
    def base_model(self) -> "LoraModel":
        """As in PEFT, ``model.base_model.model`` is the transformers model (the tuner is this object here)."""
        return self

    # --- merging -------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active one) into the base weights for zero-overhead inference."""
        names = adapter_names or self.active_adapters
        for name in names:
            self._require(name)
        layers = lora_layers(self.model)
        if safe_merge:  # every layer checked before any changes, so a bad adapter leaves the whole model as it was
            for layer in layers:
                layer.check_merge(names)
        for layer in layers:
            layer.merge(names)

    def unmerge_adapter(self) -> None:
        for layer in lora_layers(self.model):
            layer.unmerge()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge and return the plain transformers model with no lorafit modules left in it.

        A base quantized by bitsandbytes comes back de-quantized: an fp32 model whose weights are the
        quantized ones expanded (their rounding stays) plus, in fp32, the merged updates."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        unwrap_all(self.model, keep_adapter=(adapter_names or self.active_adapters or [None])[0])
        dequantize_model(self.model)
        return self.model

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original base model."""
        self.unmerge_adapter()
        unwrap_all(self.model)
        return self.model

    # --- running -------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, adapter_names: list[str] | None = None, **kwargs):
        """The wrapped model's forward; ``adapter_names`` gives one adapter per row (``"__base__"``: none).

        The named arguments are spelled out so that transformers' Trainer keeps those dataset columns.
        """
        named = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                 "position_ids": position_ids, "inputs_embeds": inputs_embeds, "labels": labels}
        kwargs.update({key: value for key, value in named.items() if value is not None})
        with self._routed(adapter_names, batch_size=_batch_size(kwargs)):
            return self.model(**kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        batch_size = len(args[0]) if args else _batch_size(kwargs)
        with self._routed(adapter_names, batch_size=batch_size):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _routed(self, adapter_names: list[str] | None, batch_size: int | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        if self.training:
            raise LorafitError("adapter_names (mixed-adapter batches) is for inference; call model.eval() first")
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise LorafitError(f"unknown adapter(s) {', '.join(unknown)} in adapter_names; loaded: "
                               f"{', '.join(self.peft_config)} (or {BASE_ADAPTER!r} for the base model)")
        if batch_size is not None and len(adapter_names) != batch_size:
            raise LorafitError(f"adapter_names has {len(adapter_names)} entries for a batch of {batch_size} rows; "
                               "give one name per row")
        if any(layer.merged for layer in lora_layers(self.model)):
            raise LorafitError("adapters are merged into the weights; call unmerge_adapter() before mixed batches")
        self.routing.set(list(adapter_names))
        try:
            yield
        finally:
            self.routing.set(None)

    # --- parameters ----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, each shared tensor counted once, as PEFT counts."""
        trainable = total = 0
        for param in self.parameters():
            total += param.numel()
            trainable += param.numel() if param.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def _set_trainable(self, adapter_name: str, trainable: bool) -> None:
        trains_biases = any(config.bias != "none" for config in self.peft_config.values())
        set_trainable(self.model, adapter_name, trainable, self.peft_config[adapter_name].bias, reset_biases=trains_biases)

    @contextlib.contextmanager
    def _undone_on_failure(self, adapter_name: str) -> Iterator[None]:
        """Put the module tree, requires_grad flags and active adapters back if adding ``adapter_name`` fails.

        Tensor values need no undo here: ``copy_all_or_nothing`` restores what it overwrote.
        """
        children = [(parent, name, child) for parent in self.model.modules() for name, child in parent.named_children()]
        requires_grad = [(param, param.requires_grad) for param in self.model.parameters()]
        wrappers = [*lora_layers(self.model), *saved_module_wrappers(self.model)]
        active = [(module, module.active_adapter) for module in wrappers]
        model_active, had_adapter = self._active_adapter, adapter_name in self.peft_config
        try:
            yield
        except BaseException:
            if not had_adapter:
                for module in [*lora_layers(self.model), *saved_module_wrappers(self.model)]:
                    module.delete_adapter(adapter_name)
                self.peft_config.pop(adapter_name, None)
            for parent, name, child in children:
                setattr(parent, name, child)
            for param, flag in requires_grad:
                param.requires_grad_(flag)
            for module, name in active:
                module.active_adapter = name
            self._active_adapter = model_active
            raise

    def _require(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise LorafitError(f"no adapter named {adapter_name!r}; loaded: {', '.join(self.peft_config) or 'none'}")

    # --- what Trainer and generation helpers look for ---------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def get_base_model(self) -> nn.Module:
        return self.model

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Checkpoint activations; with the embeddings frozen, their outputs must require grad for it to work.

        transformers 5 calls this ``activation_checkpointing_enable`` (and passes ``every_n_layers`` and
        ``offload``); older versions only have this name.
        """
        if hasattr(self.model, "activation_checkpointing_enable"):
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs,
                                                       **kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        if getattr(self.model, "_require_grads_hook", None) is None:
            self.model.enable_input_require_grads()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """transformers 5's name for ``gradient_checkpointing_enable`` (what its Trainer calls)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        disable = getattr(self.model, "activation_checkpointing_disable", None) or self.model.gradient_checkpointing_disable
        disable()

    def activation_checkpointing_disable(self) -> None:
        self.gradient_checkpointing_disable()


def _refuse_wrapped(model: nn.Module) -> None:
    """A second LoraModel over the same modules would re-initialise (or share) the first one's adapters."""
    if isinstance(model, LoraModel) or any(isinstance(m, (LoraLayer, ModulesToSave)) for m in model.modules()):
        raise LorafitError("this model already holds lorafit adapters (from an earlier get_lora_model or "
                           "from_pretrained); wrapping it again would re-initialise them: use that LoraModel's "
                           "add_adapter(name, config) or load_adapter(dir, name), or wrap its unload() result")


def _batch_size(kwargs: dict) -> int | None:
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    return None

