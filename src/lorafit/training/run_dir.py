"""The run directory: resolved config, metrics log, curves, best adapter, and the model card.

A run folder is lorafit's when it holds ``.lorafit.lock`` (or, from older versions, a lorafit
config.yaml). The lock file is flocked for the run's life and holds the running process's id.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path

import yaml

from lorafit.errors import LorafitError
from lorafit.files import atomic_path, exists_or_set_aside, recover_interrupted, write_json, write_text
from lorafit.training.settings import TrainConfig, dump_config

METRICS_NAME = "metrics.jsonl"
INFO_NAME = "lorafit.json"
CONFIG_NAME = "config.yaml"
LOCK_NAME = ".lorafit.lock"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
# Files only a lorafit checkpoint holds: a transformers Trainer's checkpoint-<step>/ has none of them.
CHECKPOINT_PARTS = ("adapter", "optimizer.safetensors", "rng.safetensors")
# Settings a resumed run may change: they decide when checkpoints are written and how memory is spent,
# never the weights or the metrics.
RESUMABLE_CHANGES = frozenset({"output_dir", "resume", "gradient_checkpointing", "save_strategy", "save_steps",
                               "keep_checkpoints", "test_file"})
_LOCKS: dict[Path, int] = {}  # run folders this process holds, with the lock file's descriptor


def prepare_run_dir(path: Path, config: TrainConfig) -> None:
    """Check that ``path`` can take this run, lock it, and write config.yaml for a new run.

    Called once the data and model have been checked: any refusal leaves the folder as it was. Under
    `accelerate launch` only the main process does this; the others find the folder it prepared.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if path.exists() and not path.is_dir():
        raise LorafitError(f"--output-dir '{path}' is a file; pass a folder")
    ours = (path / LOCK_NAME).is_file() or saved_config(path) is not None
    if path.is_dir() and not ours and any(path.iterdir()):
        raise LorafitError(f"output directory '{path}' is not empty and was not made by lorafit; "
                           "pass a new or empty --output-dir")
    holds_run = ours and any((path / name).exists() for name in (CONFIG_NAME, METRICS_NAME, "best"))
    if config.resume and not holds_run:
        raise LorafitError(f"--resume: '{path}' holds no run to resume; pass the --output-dir of an earlier run")
    if holds_run and not config.resume:
        raise LorafitError(f"output directory '{path}' already holds a run; pass --resume to continue it "
                           "or choose another --output-dir")
    if config.resume:
        check_resumable(path, config)
    path.mkdir(parents=True, exist_ok=True)
    lock_run_dir(path)
    if not config.resume:  # a resumed run keeps the config.yaml it started with (check_resumable: same result)
        write_text(path / CONFIG_NAME, dump_config(config))


def saved_config(path: Path) -> dict | None:
    """The settings in ``path``/config.yaml if lorafit wrote it, else None."""
    try:
        saved = yaml.safe_load((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    looks_ours = isinstance(saved, dict) and {"task", "model", "r", "output_dir"} <= set(saved)
    return saved if looks_ours else None


def check_resumable(path: Path, config: TrainConfig) -> None:
    """Refuse a resume that would not continue the same run, or has nothing to continue."""
    saved = saved_config(path)
    if saved is None:
        raise LorafitError(f"--resume: '{path / CONFIG_NAME}' is missing or unreadable, so the run's settings are "
                           "unknown; restore it, or start a new run with another --output-dir")
    now = yaml.safe_load(dump_config(config))
    changed = [key for key in now if key in saved and key not in RESUMABLE_CHANGES and now[key] != saved[key]]
    if changed:
        diffs = ", ".join(f"{key} (saved {saved[key]!r}, now {now[key]!r})" for key in changed)
        raise LorafitError(f"--resume: {diffs} differ from the run's config.yaml and would change its result; "
                           "drop them to continue the run as it was set up, or start a new run with another "
                           "--output-dir")
    if (path / "README.md").is_file() and (path / "best" / INFO_NAME).is_file():  # the last files a run writes
        raise LorafitError(f"--resume: the run in '{path}' is complete (its adapter is in '{path / 'best'}'); "
                           "to train again, pass another --output-dir")
    if not checkpoint_dirs(path) and exists_or_set_aside(path / "best"):
        raise LorafitError(f"--resume: '{path}' has no checkpoint to continue from, and starting over would replace "
                           f"its best/; to start over, pass another --output-dir (or delete '{path}')")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """lorafit's checkpoint-<step>/ folders, complete or not, oldest first (others' folders are left alone)."""
    found = [p for p in run_dir.glob("checkpoint-*") if CHECKPOINT.fullmatch(p.name) and p.is_dir()
             and any((p / part).exists() for part in CHECKPOINT_PARTS)]
    return sorted(found, key=lambda p: int(CHECKPOINT.fullmatch(p.name).group(1)))


def lock_run_dir(path: Path) -> None:
    """Hold ``path`` for this process until release_run_dirs(), or refuse naming the process that holds it."""
    key = path.resolve()
    if key in _LOCKS:
        return
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise LorafitError(f"run folder '{path}' is in use by another lorafit process (pid {holder}); "
                           "wait for it to end or stop it") from None
    except OSError:  # e.g. ENOLCK on a network file system: the descriptor must not leak
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    _LOCKS[key] = fd


def release_run_dirs() -> None:
    """Let other processes use the run folders this one locked (exiting does the same)."""
    while _LOCKS:
        os.close(_LOCKS.popitem()[1])


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / METRICS_NAME, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def rewrite_metrics(run_dir: Path, history: list[dict]) -> None:
    """On resume, drop the lines an interrupted run logged after its last checkpoint."""
    write_text(run_dir / METRICS_NAME, "".join(json.dumps(r) + "\n" for r in history))


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def recover_run_dir(run_dir: Path) -> None:
    """Finish what a killed run's writes left: a best/ or checkpoint set aside goes back, temporaries go."""
    recover_interrupted(run_dir, lambda name: name in _RUN_FILES or CHECKPOINT.fullmatch(name) is not None)


# what a run writes at the top of its folder, each atomically (checkpoint-<step>/ besides)
_RUN_FILES = frozenset({"best", CONFIG_NAME, METRICS_NAME, "curves.png", "README.md"})


def save_adapter_info(adapter_dir: Path, info: dict) -> None:
    """What lorafit's commands need beside the adapter: task, base model as given, label names, lengths."""
    write_json(adapter_dir / INFO_NAME, info)


def load_adapter_info(adapter_dir: Path) -> dict:
    """lorafit.json, checked: a damaged file is one error naming it, not a traceback further on."""
    path = adapter_dir / INFO_NAME
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(info, dict):
            raise ValueError(f"a JSON {type(info).__name__}, not a JSON object")
        for key, types in _INFO_TYPES.items():
            if key in info and (not isinstance(info[key], types) or isinstance(info[key], bool) and types is not bool):
                raise ValueError(f"'{key}' is {info[key]!r}")
        if info.get("task", "classification") not in ("classification", "causal-lm"):
            raise ValueError(f"'task' is {info['task']!r}, not classification or causal-lm")
        if "id2label" in info:
            if sorted(info["id2label"], key=lambda k: (len(k), k)) != [str(i) for i in range(len(info["id2label"]))]:
                raise ValueError(f"'id2label' has keys {list(info['id2label'])!r}, not the class numbers 0, 1, ...")
            info["id2label"] = {int(k): v for k, v in info["id2label"].items()}
    except (OSError, UnicodeDecodeError, ValueError) as err:  # json's decode errors are ValueErrors
        raise LorafitError(f"'{path}' is damaged ({err}): copy it again from the run that trained the adapter, or "
                           "delete it (then pass --model, and labels show as LABEL_0, LABEL_1, ...)") from None
    return info


# what lorafit writes into lorafit.json, by type
_INFO_TYPES = {"task": str, "base_model": (str, type(None)), "id2label": dict, "max_length": (int, type(None)),
               "truncation_side": str, "text_column": str, "text_pair_column": (str, type(None)),
               "label_column": str, "chat": bool, "train_on_prompt": bool, "quantization": dict}


def plot_curves(run_dir: Path, history: list[dict], metric: str) -> Path | None:
    """curves.png: training and validation loss, and the chosen metric, against epoch."""
    records = [r for r in history if r.get("train_loss") is not None or r.get("loss") is not None]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r.get("train_loss") for r in records], marker="o", label="training loss")
    if any("loss" in r for r in records):
        ax_loss.plot(epochs, [r.get("loss") for r in records], marker="o", label="validation loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    values = [r.get(metric) for r in records]
    if any(v is not None for v in values):
        ax_metric.plot(epochs, values, marker="o", color="tab:green")
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel(f"validation {metric}")
    fig.tight_layout()
    path = run_dir / "curves.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def model_card(*, base_model: str, data: str, config: dict, metrics: dict, run_dir: Path, task: str) -> str:
    """README.md for the run: what was trained on what, how well, and how to load it."""
    auto = "AutoModelForSequenceClassification" if task == "classification" else "AutoModelForCausalLM"
    hyper = "\n".join(f"| {k} | {v} |" for k, v in config.items() if v is not None)
    results = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in metrics.items() if not isinstance(v, (dict, list)))
    return f"""# LoRA adapter: {base_model} ({task})

Trained with [lorafit](https://pypi.org/project/lorafit/). The adapter with the best validation
score is in `best/` (PEFT format: `adapter_config.json` + `adapter_model.safetensors`).

- Base model: `{base_model}`
- Data: {data}

## Final metrics
| metric | value |
| --- | --- |
{results}

## Hyperparameters
| setting | value |
| --- | --- |
{hyper}

## Load it
With lorafit:
```python
from transformers import {auto}
from lorafit import LoraModel

base = {auto}.from_pretrained("<base model directory>")
model = LoraModel.from_pretrained(base, "{run_dir / 'best'}")
```
With PEFT:
```python
from peft import PeftModel

model = PeftModel.from_pretrained(base, "{run_dir / 'best'}")
```
From the command line: `lorafit {'predict' if task == 'classification' else 'generate'} --adapter {run_dir / 'best'} ...`
"""


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
