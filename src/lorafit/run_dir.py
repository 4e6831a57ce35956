"""The run directory: resolved config, metrics log, curves, best adapter, and the model card."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from lorafit.errors import LorafitError
from lorafit.serialization import atomic_path, write_json

METRICS_NAME = "metrics.jsonl"
INFO_NAME = "lorafit.json"


def prepare_run_dir(path: Path, resume: bool) -> None:
    """Refuse to mix two runs in one folder; create it only once the inputs have been checked."""
    holds_run = path.is_dir() and any((path / name).exists() for name in ("config.yaml", METRICS_NAME, "best"))
    if resume and not holds_run:
        raise LorafitError(f"--resume: '{path}' holds no run to resume; pass the --output-dir of an earlier run")
    if holds_run and not resume:
        raise LorafitError(f"output directory '{path}' already holds a run; pass --resume to continue it "
                           "or choose another --output-dir")
    path.mkdir(parents=True, exist_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


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


def replace_dir_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Build a folder beside ``target`` and swap it in, so ``target`` is always complete or absent."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    old = target.with_name(f".{target.name}.old")
    try:
        write(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


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
               "label_column": str, "chat": bool, "train_on_prompt": bool}


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
