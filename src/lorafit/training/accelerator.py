"""The accelerate Accelerator a run trains with: device, mixed precision, experiment trackers.

``check_accelerator_settings`` refuses what this machine (or lorafit) cannot do before anything is written;
``make_accelerator`` builds it. Processes, FSDP and the like come from `accelerate launch` / its config.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, str_to_bool

from lorafit.cpu import cpu_has_bf16
from lorafit.errors import LorafitError
from lorafit.training.settings import TrainConfig

# the package each tracker needs; accelerate names the same ones
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
# wandb and mlflow file runs under a project; tensorboard's events go to <output-dir>/tensorboard
TRACKER_PROJECT = {"tensorboard": "tensorboard", "wandb": "lorafit", "mlflow": "lorafit"}


def check_accelerator_settings(config: TrainConfig, cuda: bool | None = None) -> None:
    """One-line refusals for a precision this machine lacks or a tracker whose package is missing."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if config.mixed_precision == "fp16" and not cuda:
        raise LorafitError("--mixed-precision fp16 needs a CUDA GPU (its loss scaling is for GPUs); on a CPU pass "
                           "--mixed-precision bf16 (if the CPU has it) or no")
    if config.mixed_precision == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise LorafitError("--mixed-precision bf16: this GPU has no bf16; pass --mixed-precision fp16 or no")
        if not cuda and not cpu_has_bf16():
            raise LorafitError("--mixed-precision bf16: this CPU has no bf16 instructions (AVX512-BF16 or AMX in "
                               "/proc/cpuinfo); pass --mixed-precision no, or train on a GPU")
    fsdp1 = fsdp_requested() and os.environ.get("FSDP_VERSION", "1") == "1"  # as accelerate reads its config
    if fsdp1 and not str_to_bool(os.environ.get("FSDP_USE_ORIG_PARAMS", "false")):
        raise LorafitError("FSDP1 without use_orig_params cannot train LoRA (the frozen base and the adapter share "
                           "its flat parameters); set fsdp_use_orig_params: true in the accelerate config (accelerate "
                           "launch --fsdp_use_orig_params true), or fsdp_version: 2")
    if fsdp1 and not cuda and str_to_bool(os.environ.get("FSDP_SYNC_MODULE_STATES", "false")):
        raise LorafitError("FSDP1 on CPU processes: accelerate's sync_module_states looks for a GPU; pass "
                           "--fsdp_sync_module_states false --fsdp_cpu_ram_efficient_loading false to accelerate "
                           "launch (each process then loads the weights itself)")
    package = TRACKER_PACKAGES.get(config.report_to)
    if package and importlib.util.find_spec(package) is None:
        raise LorafitError(f"--report-to {config.report_to} needs the {package} package: pip install {package} "
                           "(or pass --report-to none)")


def make_accelerator(config: TrainConfig, run_dir: Path) -> Accelerator:
    """The run's Accelerator, its trackers started (they log on the main process only)."""
    tracking = config.report_to != "none"
    # accelerate keeps one precision per process and refuses another: a second run in the same process
    # (the library, a notebook) starts from fresh settings; the process group (PartialState) is kept
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision,
                              log_with=config.report_to if tracking else None,
                              project_dir=str(run_dir) if tracking else None)
    shard_cpu_processes(accelerator)
    if tracking:
        accelerator.init_trackers(TRACKER_PROJECT[config.report_to], config=tracker_config(config))
    return accelerator


def fsdp_requested() -> bool:
    """True when `accelerate launch` was given an FSDP config (it passes it on in the environment)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def shard_cpu_processes(accelerator: Accelerator) -> None:
    """Apply an FSDP config to CPU processes too. accelerate (1.15) switches GPU processes to FSDP but leaves CPU
    ones (gloo) unsharded without a word; lorafit makes the same switch for them, so that a config means the
    same on every machine (and the FSDP path is tested on CPUs)."""
    state = accelerator.state
    if not fsdp_requested() or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the environment, as accelerate builds it for GPUs
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
    state.device = torch.device("cpu")  # accelerate's cpu:0, which FSDP1 refuses as not its compute device "cpu"


def tracker_config(config: TrainConfig) -> dict:
    """The settings as trackers take them: numbers, text and true/false (tensorboard's hparams refuse None and lists)."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in dataclasses.asdict(config).items()}


def finish_trackers(accelerator: Accelerator) -> None:
    """Flush and close the trackers (accelerator.end_training would also end the process group, which the
    final evaluation still needs)."""
    for tracker in accelerator.trackers:
        tracker.finish()
