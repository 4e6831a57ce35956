"""FSDP (lorafit.training.sharding): `lorafit train` under accelerate's FSDP on two CPU processes (gloo), launched as
users launch it (`accelerate launch --use_fsdp`, BERT's layers auto-wrapped), FSDP1 and FSDP2.

A sharded run must train the adapter a one-process run trains (dropout 0), evaluate and end on the
whole model, save whole adapters and checkpoints in the one-process format, write its run folder once,
and resume after SIGKILL to the uninterrupted sharded run's result.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import time
from pathlib import Path

import pytest
import torch

from test_cli import _train_or_fail, adapter_tensors, read_jsonl
from test_distributed import ADAPTER_TOLERANCE, data, kill_tree, launch, launched, run_args  # noqa: F401

# 30 examples in batches of 8; checkpoints and evaluations every 3 steps
STEPS = 9
EXTRA = ["--lora-dropout", "0", "--max-steps", STEPS, "--save-strategy", "steps", "--save-steps", "3",
         "--keep-checkpoints", "5", "--test-file", None]
FINAL_KEYS = ("validation_loss", "validation_accuracy", "test_loss", "test_accuracy")


def extra(data: dict) -> list:
    return [data["validation"] if value is None else value for value in EXTRA]  # the test split: validation's rows


def summary(out: str) -> dict:
    """The final metrics a run printed (`key: value` lines)."""
    pairs = (line.split(": ", 1) for line in out.splitlines() if ": " in line)
    return {key: float(value) for key, value in pairs if key in FINAL_KEYS}


@pytest.fixture(scope="module")
def one(data, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("one") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _train_or_fail(["train", *run_args(data, output, *extra(data))])
    return output, summary(printed.getvalue())


_RUNS: dict[int, tuple[Path, str]] = {}


def fsdp_run(version: int, data: dict, root: Path) -> tuple[Path, str]:
    """An uninterrupted two-process run under FSDP ``version``, once per session."""
    if version not in _RUNS:
        output = root / f"fsdp{version}"
        _RUNS[version] = output, launched(run_args(data, output, *extra(data)), fsdp=version)
    return _RUNS[version]


def max_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 2])
def test_fsdp_run_trains_the_one_process_adapter(version, data, one, tmp_path_factory):
    (alone, final_alone), (sharded, out) = one, fsdp_run(version, data, tmp_path_factory.mktemp(f"fsdp{version}"))
    assert f"FSDP{version}: each of the 2 processes holds a shard of the model" in out  # accelerate did shard it
    assert out.count("Adapter saved to") == 1  # the main process alone prints
    # the run folder written once, as one process writes it: no second best/, no temporaries
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in alone.iterdir())
    for adapter in ("best", *(f"checkpoint-{step}/adapter" for step in range(3, STEPS + 1, 3))):
        a, b = adapter_tensors(alone / adapter), adapter_tensors(sharded / adapter)
        assert sorted(a) == sorted(b) and all(a[k].shape == b[k].shape for k in a), adapter  # complete, whole
        assert max(b[k].abs().max().item() for k in b if "lora_B" in k) > 1e-3  # B moved from zero
        assert max_difference(a, b) <= ADAPTER_TOLERANCE, f"{adapter}: {max_difference(a, b)}"
    for step in range(3, STEPS + 1, 3):  # optimizer state in the one-process format: same keys, whole shapes
        a = adapter_tensors(alone / f"checkpoint-{step}" / "optimizer.safetensors")
        b = adapter_tensors(sharded / f"checkpoint-{step}" / "optimizer.safetensors")
        assert sorted(a) == sorted(b) and all(a[k].shape == b[k].shape for k in a)
        assert max_difference(a, b) <= ADAPTER_TOLERANCE, f"step {step}: {max_difference(a, b)}"
    for r1, r2 in zip(read_jsonl(alone / "metrics.jsonl"), read_jsonl(sharded / "metrics.jsonl"), strict=True):
        assert (r2["step"], r2["epoch"], r2["accuracy"]) == (r1["step"], r1["epoch"], r1["accuracy"])
        assert r2["loss"] == pytest.approx(r1["loss"], abs=2e-6)
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], abs=2e-6)
    final = summary(out)  # evaluated after best/ was restored into the sharded model
    assert final.keys() == final_alone.keys() == set(FINAL_KEYS)
    for key, value in final_alone.items():
        assert final[key] == pytest.approx(value, abs=2e-6), key


@pytest.mark.slow
def test_killed_fsdp_run_resumes_to_the_uninterrupted_result(data, tmp_path, tmp_path_factory):
    whole, _ = fsdp_run(1, data, tmp_path_factory.mktemp("fsdp1"))
    killed = tmp_path / "killed"
    process = launch(run_args(data, killed, *extra(data)), fsdp=1)
    deadline = time.monotonic() + 300
    while not list(killed.glob("checkpoint-*/trainer_state.json")) and process.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    kill_tree(process.pid)  # accelerate and both workers at once
    process.communicate()
    assert not (killed / "README.md").exists(), "the run ended before it could be killed"
    assert not (killed / f"checkpoint-{STEPS}").exists()
    on_one = tmp_path / "on-one"  # the same checkpoint, resumed on one process without FSDP
    shutil.copytree(killed, on_one)
    (on_one / ".lorafit.lock").unlink(missing_ok=True)
    launched(["--output-dir", killed, "--resume"], fsdp=1)
    _train_or_fail(["train", "--output-dir", on_one, "--resume"])
    assert read_jsonl(killed / "metrics.jsonl") == read_jsonl(whole / "metrics.jsonl")
    for adapter in ("best", f"checkpoint-{STEPS}/adapter"):
        a, b = adapter_tensors(whole / adapter), adapter_tensors(killed / adapter)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), adapter
        c = adapter_tensors(on_one / adapter)  # the checkpoint's format does not depend on the sharding
        assert sorted(a) == sorted(c) and max_difference(a, c) <= ADAPTER_TOLERANCE, adapter
