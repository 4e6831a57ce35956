"""Training checkpoints: adapter, optimizer, scheduler, RNG and data-order state, written atomically.

A checkpoint is assembled in a temporary folder and swapped into place (files.replace_dir), so a run
killed at any moment leaves either a complete ``checkpoint-<step>/`` or none. Everything is
safetensors or JSON: resuming never unpickles anything.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lorafit.errors import LorafitError, first_line
from lorafit.files import replace_dir
from lorafit.model import LoraModel
from lorafit.training.distributed import gather_lists, process_index
from lorafit.training.run_dir import checkpoint_dirs
from lorafit.training.sharding import ShardedModel, parameter_shapes

STATE_NAME = "trainer_state.json"


@dataclass
class TrainState:
    """Where training stands: enough to continue exactly where it stopped."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)
    window_loss: float = 0.0  # training loss summed since the last evaluation (logged as its mean)
    window_steps: int = 0


def _optimizer_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state dict (parameters by index) as safetensors tensors ``<index>.<name>`` and JSON."""
    tensors, scalars = {}, {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state_dict(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _torch_rng_states() -> dict[str, torch.Tensor]:
    """The CPU generator's state, and on a GPU each device's: dropout there draws from the device's own."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda.{device}": state for device, state in enumerate(torch.cuda.get_rng_state_all())})
    return states


def process_rng_states() -> dict[str, torch.Tensor]:
    """Every process's torch RNG states, for the main process to save: each process draws its own dropout
    masks. Rank 0's go under the keys of a one-process run, rank k's under ``rank<k>.``; every process calls it."""
    states = gather_lists([_torch_rng_states()])
    merged = dict(states[0])
    for rank, own in enumerate(states[1:], start=1):
        merged.update({f"rank{rank}.{key}": value for key, value in own.items()})
    return merged


def _restore_torch_rng(states: dict[str, torch.Tensor]) -> None:
    if process_index() > 0:
        prefix = f"rank{process_index()}."
        states = {key.removeprefix(prefix): value for key, value in states.items() if key.startswith(prefix)}
        if not states:  # resumed on more processes than saved the checkpoint: this one keeps its seeded streams
            return
    torch.set_rng_state(states["torch"])
    for key, state in states.items():
        device = int(key.removeprefix("cuda.")) if key.startswith("cuda.") else None
        if device is not None and torch.cuda.is_available() and device < torch.cuda.device_count():
            torch.cuda.set_rng_state(state, device=device)


def save_checkpoint(run_dir: Path, save_adapter: Callable[[Path], None], optimizer, scheduler, state: TrainState,
                    keep: int, rng_states: dict[str, torch.Tensor] | None = None, scaler=None,
                    optimizer_state: dict | None = None) -> Path:
    """Write ``checkpoint-<step>/`` atomically and prune all but the newest ``keep``.

    ``save_adapter(folder)`` writes the adapter (a LoraModel's save_pretrained, or the training loop's,
    which also checks the file against the adapter's full shapes).
    ``rng_states``: every process's (process_rng_states), by default this process's; ``scaler``: fp16's
    gradient scaler, whose scale a resumed run continues from; ``optimizer_state``: the optimizer's state in
    the one-process format when the caller gathered it (under FSDP: ShardedModel.optimizer_state), by
    default ``optimizer.state_dict()``."""
    final = run_dir / f"checkpoint-{state.step}"

    def write(tmp: Path) -> None:
        save_adapter(tmp / "adapter")
        tensors, meta = _optimizer_tensors(optimizer.state_dict() if optimizer_state is None else optimizer_state)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng_states or _torch_rng_states(), str(tmp / "rng.safetensors"))
        py_state = random.getstate()
        np_state = np.random.get_state()
        extra = {
            "optimizer": meta,
            "scheduler": scheduler.state_dict(),
            "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            **({"grad_scaler": scaler.state_dict()} if scaler is not None else {}),
        }
        (tmp / STATE_NAME).write_text(json.dumps({"state": asdict(state), **extra}), encoding="utf-8")

    replace_dir(final, write)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted save are ignored)."""
    return [p for p in checkpoint_dirs(run_dir) if (p / STATE_NAME).is_file()]


class CheckpointDamaged(Exception):
    """A checkpoint file that does not read back; the message names it and why."""


def load_checkpoint(path: Path, model: LoraModel, optimizer, scheduler, scaler=None,
                    sharded: ShardedModel | None = None) -> TrainState:
    """Restore everything ``save_checkpoint`` wrote, including the RNG streams.

    Every file is read and checked before anything is restored; a file that does not read back raises
    CheckpointDamaged naming it. ``sharded``: the model as training runs it, when it may be under FSDP
    (every process then calls this); the checkpoint's format is the same either way.
    """
    if sharded is None:
        sharded = ShardedModel(model, model, parameter_shapes(optimizer))
    with _reading(path, STATE_NAME):
        data = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
        state = TrainState(**data["state"])
        optimizer_meta, scheduler_state = data["optimizer"], data["scheduler"]
        version, internal, gauss = data["python_rng"]
        python_rng = (version, tuple(internal), gauss)
        random.Random().setstate(python_rng)
        name, keys, *rest = data["numpy_rng"]
        numpy_rng = (name, np.array(keys, dtype=np.uint32), *rest)
        np.random.RandomState().set_state(numpy_rng)
    with _reading(path, "optimizer.safetensors"):
        optimizer_tensors = load_file(str(path / "optimizer.safetensors"))
        _check_optimizer_shapes(sharded.shapes, optimizer_tensors)
    with _reading(path, "rng.safetensors"):
        torch_rngs = load_file(str(path / "rng.safetensors"))
        torch_rng, current = torch_rngs["torch"], torch.get_rng_state()
        if torch_rng.dtype != current.dtype or torch_rng.shape != current.shape:
            raise ValueError(f"torch RNG state of shape {tuple(torch_rng.shape)}, expected {tuple(current.shape)}")
    with _reading(path, "adapter"):  # load_weights checks the whole adapter before changing any weight
        sharded.load_adapter(path / "adapter")
    with _reading(path, STATE_NAME):
        sharded.load_optimizer_state(optimizer, _optimizer_state_dict(optimizer_tensors, optimizer_meta))
        scheduler.load_state_dict(scheduler_state)
        if scaler is not None and data.get("grad_scaler"):
            scaler.load_state_dict(data["grad_scaler"])
    _restore_torch_rng(torch_rngs)
    random.setstate(python_rng)
    np.random.set_state(numpy_rng)
    return state


@contextlib.contextmanager
def _reading(checkpoint: Path, file: str) -> Iterator[None]:
    """Turn any failure to read ``file`` (truncated, garbage, missing) into CheckpointDamaged naming it."""
    try:
        yield
    except Exception as err:
        reason = "missing" if not (checkpoint / file).exists() else first_line(err)
        raise CheckpointDamaged(f"{checkpoint.name}/{file} is damaged ({reason[:160]})") from None


def _check_optimizer_shapes(shapes: list[tuple[int, ...]], tensors: dict[str, torch.Tensor]) -> None:
    """load_state_dict does not compare moment shapes with the parameters (``shapes``, whole, in the optimizer's
    order): a wrong one would fail mid-step."""
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        if name != "step" and tuple(value.shape) != tuple(shapes[int(index)]):
            raise ValueError(f"{key} has shape {tuple(value.shape)}, its parameter {tuple(shapes[int(index)])}")


def load_newest_checkpoint(run_dir: Path, model: LoraModel, optimizer, scheduler, scaler=None,
                           sharded: ShardedModel | None = None) -> tuple[TrainState, Path] | None:
    """Restore the newest checkpoint that reads back whole, saying which newer ones are damaged; None if none exists."""
    damaged = []
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            state = load_checkpoint(path, model, optimizer, scheduler, scaler, sharded)
        except CheckpointDamaged as err:
            damaged.append(str(err))
            continue
        if damaged:
            print(f"lorafit: {'; '.join(damaged)}; resuming from {path.name} instead", file=sys.stderr)
        return state, path
    if damaged:
        raise LorafitError(f"cannot resume '{run_dir}': {'; '.join(damaged)}, and no earlier checkpoint reads back; "
                           "start the run again with another --output-dir")
    return None

