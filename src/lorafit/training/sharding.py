"""FSDP (accelerate's FSDP1 flat parameters, or FSDP2's fully_shard): the whole model where a run needs it, and
checkpoints in the one-process format.

Training steps run sharded. Everything else a run does with the model (evaluation, saving and loading
the adapter, the demo) runs inside ``whole_model``: every process gathers every parameter, which costs
the memory of the whole model on each process (as TRL's generation under FSDP does), and the layers run
as plain modules, without FSDP's per-layer all-gathers, so processes may run different numbers of batches.
Models that are not sharded pass through every function here unchanged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from lorafit.model import LoraModel
from lorafit.serialization import adapter_tensor_targets, check_adapter_fits, read_adapter


# what FSDP1 and activation checkpointing insert between a module and the module they wrap
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def unwrapped_name(name: str) -> str:
    """A parameter's name as in the model before FSDP1 (or activation checkpointing) wrapped its layers, as
    torch's distributed state dicts name it."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def fsdp_version(model: nn.Module) -> int:
    """1 for FSDP1 (FullyShardedDataParallel wrappers), 2 for FSDP2 (fully_shard), 0 for a model not sharded."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    modules = list(model.modules())
    if any(isinstance(module, FullyShardedDataParallel) for module in modules):
        return 1
    return 2 if any(isinstance(module, FSDPModule) for module in modules) else 0


@contextlib.contextmanager
def whole_model(model: nn.Module, writeback: bool = False) -> Iterator[None]:
    """Inside the block every parameter of ``model`` is whole on every process and the model runs as a plain one;
    every process must enter it. ``writeback`` (FSDP1): changes made inside are kept (FSDP2's are lost: load
    weights with ``load_adapter``).

    Under FSDP each process holds only its shard of the parameters (empty where it holds none): an
    adapter saved from those is partial, the most reported failure of sharded LoRA training."""
    version = fsdp_version(model)
    if version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, writeback=writeback), wrappers_removed(model):
            yield
    elif version == 2:
        with _fsdp2_unsharded(model), wrappers_removed(model):
            yield
    else:
        yield


@contextlib.contextmanager
def wrappers_removed(model: nn.Module) -> Iterator[None]:
    """The layers FSDP1 and activation checkpointing (accelerate's fsdp_activation_checkpointing) wrapped put back
    in their wrappers' places: the model is the plain one, its module names those of adapter files, and its
    forward FSDP1's no more (which would all-gather again, every process the same number of times, and may
    not even start inside summon_full_params). The wrapper around the whole model stays: lorafit uses the
    model it wraps."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrappers = (FullyShardedDataParallel, CheckpointWrapper)

    def inner(module: nn.Module) -> nn.Module:  # through nested wrappers (FSDP1 around a checkpointed layer)
        while isinstance(module, wrappers):
            module = module._fsdp_wrapped_module if isinstance(module, FullyShardedDataParallel) else \
                module._checkpoint_wrapped_module
        return module

    places = []  # (parent, attribute, outermost wrapper), found before anything moves
    for name, module in model.named_modules():
        if isinstance(module, wrappers) and name:
            path, _, attribute = name.rpartition(".")
            parent = model.get_submodule(path)
            if not isinstance(parent, wrappers) or parent is model:
                places.append((parent, attribute, module))
    for parent, attribute, wrapper in places:
        parent._modules[attribute] = inner(wrapper)
    try:
        yield
    finally:
        for parent, attribute, wrapper in places:
            parent._modules[attribute] = wrapper


@contextlib.contextmanager
def _fsdp2_unsharded(model: nn.Module) -> Iterator[None]:
    """Every fully_shard module unsharded, and kept so through forwards and state_dict() calls: its hooks would
    reshard it after each forward and all-gather it at the next (a collective, which processes with fewer
    batches would not join), and reshard it when any module holding its parameters gives its state dict
    (as a saved head's copy does when the adapter is saved)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    modules = [module for module in model.modules() if isinstance(module, FSDPModule)]
    groups = [group for group in (fully_shard.state(m)._fsdp_param_group for m in modules) if group is not None]
    # torch reshards after forward exactly when a group has a post-forward mesh (FSDPParamGroup._reshard_after_forward)
    meshes = [group.post_forward_mesh_info for group in groups]
    for module in modules:
        module.unshard()
    for group in groups:
        group.post_forward_mesh_info = None
        for hooks in (group._module_to_pre_save_state_dict_hook_handle,
                      group._module_to_pre_load_state_dict_hook_handle):
            for handle in hooks.values():
                handle.remove()
            hooks.clear()
    try:
        yield
    finally:
        for group, mesh in zip(groups, meshes):
            group.post_forward_mesh_info = mesh
            group._register_state_dict_hooks()
        for module in modules:
            module.reshard()


def parameter_shapes(optimizer: torch.optim.Optimizer) -> list[tuple[int, ...]]:
    """Each optimizer parameter's shape, in the optimizer's order (whole only before FSDP shards them)."""
    return [tuple(param.shape) for group in optimizer.param_groups for param in group["params"]]


@dataclass
class ShardedModel:
    """The model as the training loop runs it (``prepared``: FSDP-wrapped, or not) and what checkpoints need of it.

    ``shapes``: each optimizer parameter's whole shape, in the optimizer's order, taken before sharding."""

    prepared: nn.Module
    lora: LoraModel
    shapes: list[tuple[int, ...]]

    @property
    def version(self) -> int:
        return fsdp_version(self.prepared)

    def load_adapter(self, folder: Path) -> None:
        """Load a saved adapter into the active one, every shard of it; every process calls it."""
        if self.version == 2:  # an unsharded FSDP2 parameter is a copy: written into, it changes nothing
            _load_fsdp2_adapter(self.prepared, self.lora, folder)
            return
        with whole_model(self.prepared, writeback=True):
            self.lora.load_weights(folder, self.lora.active_adapter)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state as one process's ``state_dict()`` has it (parameters by index in the optimizer's
        order, whole tensors, on the CPU), whatever the sharding. Under FSDP every process must call it."""
        if not self.version:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        # every process gets the whole state (the adapter's moments are small); cpu_offload=True, which gives it to
        # the main process only, returned exp_avg and exp_avg_sq in one buffer on CPUs (torch 2.13): both wrong
        full = get_optimizer_state_dict(self.prepared, optimizer, options=StateDictOptions(full_state_dict=True))
        index = {name: i for i, name in enumerate(self._names(optimizer))}
        return {"state": {index[name]: {key: value.detach().cpu() if torch.is_tensor(value) else value
                                        for key, value in state.items()}
                          for name, state in full.get("state", {}).items()},
                "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                                 for group in full.get("param_groups", [])]}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Restore what ``optimizer_state`` gave (on any number of processes, sharded or not); every process calls
        it with the whole state."""
        if not self.version:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = self._names(optimizer)
        full = {"state": {names[int(i)]: value for i, value in state["state"].items()},
                "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                 for group in state["param_groups"]]}
        set_optimizer_state_dict(self.prepared, optimizer, full, options=StateDictOptions(full_state_dict=True))

    def _names(self, optimizer: torch.optim.Optimizer) -> list[str]:
        """Each optimizer parameter's name as torch's distributed state dicts key it: FSDP1's wrapper segments
        left out, so that names match whatever the sharding."""
        names = {id(param): unwrapped_name(name) for name, param in self.lora.named_parameters()}
        return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def _load_fsdp2_adapter(model: nn.Module, lora: LoraModel, folder: Path) -> None:
    """Checked as LoraModel.load_weights checks it (FSDP2's sharded parameters report their whole shapes), then
    set shard by shard from the whole tensors every process read."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    config, tensors = read_adapter(folder)
    with wrappers_removed(lora):  # activation checkpointing's, whose names are not the file's
        check_adapter_fits(lora.model, config, tensors, str(folder))
        pairs = adapter_tensor_targets(lora.model, lora.active_adapter, config, tensors, str(folder))
        names = {id(param): name for name, param in lora.named_parameters()}
    state = {names[id(param)]: tensor.to(param.dtype) for param, tensor in pairs}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
