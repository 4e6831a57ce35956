"""Training checkpoints: adapter, optimizer, scheduler, RNG and data-order state, written atomically.

A checkpoint is assembled in a hidden temporary folder and renamed into place in one step, so a
run killed at any moment leaves either a complete ``checkpoint-<step>/`` or none. Everything is
safetensors or JSON: resuming never unpickles anything.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lorafit.model import LoraModel

STATE_NAME = "trainer_state.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


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


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _torch_rng_states() -> dict[str, torch.Tensor]:
    """The CPU generator's state, and on a GPU each device's: dropout there draws from the device's own."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda.{device}": state for device, state in enumerate(torch.cuda.get_rng_state_all())})
    return states


def _restore_torch_rng(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    for key, state in states.items():
        device = int(key.removeprefix("cuda.")) if key.startswith("cuda.") else None
        if device is not None and torch.cuda.is_available() and device < torch.cuda.device_count():
            torch.cuda.set_rng_state(state, device=device)


def save_checkpoint(run_dir: Path, model: LoraModel, optimizer, scheduler, state: TrainState, keep: int) -> Path:
    """Write ``checkpoint-<step>/`` atomically and prune all but the newest ``keep``."""
    final = run_dir / f"checkpoint-{state.step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{state.step}.", dir=run_dir))
    try:
        model.save_pretrained(tmp / "adapter")
        tensors, meta = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file(_torch_rng_states(), str(tmp / "rng.safetensors"))
        py_state = random.getstate()
        np_state = np.random.get_state()
        extra = {
            "optimizer": meta,
            "scheduler": scheduler.state_dict(),
            "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        }
        (tmp / STATE_NAME).write_text(json.dumps({"state": asdict(state), **extra}), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted save are ignored)."""
    found = [p for p in run_dir.glob("checkpoint-*") if _CHECKPOINT.search(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(_CHECKPOINT.search(p.name).group(1)))


def load_checkpoint(path: Path, model: LoraModel, optimizer, scheduler) -> TrainState:
    """Restore everything ``save_checkpoint`` wrote, including the RNG streams."""
    data = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
    model.load_weights(path / "adapter", model.active_adapter)
    _restore_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), data["optimizer"])
    scheduler.load_state_dict(data["scheduler"])
    _restore_torch_rng(load_file(str(path / "rng.safetensors")))
    version, internal, gauss = data["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = data["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    return TrainState(**data["state"])


def remove_temporaries(run_dir: Path) -> None:
    """Delete half-written checkpoint folders left by a killed run."""
    for tmp in run_dir.glob(".checkpoint-*"):
        shutil.rmtree(tmp, ignore_errors=True)
