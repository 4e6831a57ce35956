"""Modules trained in full alongside an adapter (a new classification head, say), one copy per adapter."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorafit.layers import ADAPTER_PREFIX, BatchRouting


class ModulesToSave(nn.Module):
    """Keeps the original module frozen and gives each adapter its own trainable copy.

    The original is what the base model (or a disabled adapter) uses; switching adapters switches
    copies, so heads trained for different tasks live side by side on one base model.
    """

    def __init__(self, original_module: nn.Module, routing: BatchRouting) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.routing = routing
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        trainable_copy = copy.deepcopy(self.original_module)
        trainable_copy.requires_grad_(True)
        self.modules_to_save[name] = trainable_copy

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s live tensors: its copy's, keyed as in the original module (and in adapter files)."""
        return self.modules_to_save[name].state_dict(keep_vars=True)

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:  # ModuleDict.pop takes no default
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.disabled:
            return self.original_module(x, *args, **kwargs)
        if self.routing.adapter_names is not None:
            return self._mixed_forward(x, *args, **kwargs)
        module = self.modules_to_save[self.active_adapter] if self.active_adapter in self.modules_to_save else self.original_module
        return module(x, *args, **kwargs)

    def _mixed_forward(self, x: torch.Tensor, *args, **kwargs):
        """Each row through its own adapter's copy (the original for the base or an adapter without one)."""
        names = list(self.modules_to_save)
        slots = self.routing.row_slots(names, x.shape[0], x.device)
        modules = [*self.modules_to_save.values(), self.original_module]
        outputs = None
        for slot in slots.unique().tolist():
            rows = (slots == slot).nonzero().squeeze(1)
            out = modules[slot](x[rows], *args, **kwargs)
            if outputs is None:
                outputs = out.new_empty((x.shape[0], *out.shape[1:]))
            outputs[rows] = out
        return outputs


_ADAPTER_PARTS = (f".{ADAPTER_PREFIX}", ".modules_to_save.", ".original_module.")


class BaseBiases:
    """The base values of the biases ``bias="all"``/``"lora_only"`` trains: those live in the base model
    itself, so a disabled adapter needs them back to be exactly the base model."""

    def __init__(self) -> None:
        self.saved: list[tuple[nn.Parameter, torch.Tensor]] = []

    def remember(self, model: nn.Module, bias_mode: str) -> None:
        """Take the values before the first adapter that trains biases is injected (or loaded)."""
        if bias_mode == "none":
            return
        known = {id(param) for param, _ in self.saved}
        self.saved += [(param, param.detach().clone()) for name, param in model.named_parameters()
                       if name.endswith(".bias") and id(param) not in known
                       and not any(part in name for part in _ADAPTER_PARTS)]

    @torch.no_grad()
    def put(self, values: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Copy ``values`` (default: the base values) into the biases; returns what they held before."""
        held = [param.detach().clone() for param, _ in self.saved]
        for (param, _), value in zip(self.saved, values if values is not None else [b for _, b in self.saved]):
            param.copy_(value)
        return held
