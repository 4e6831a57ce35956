"""The Accelerator a run trains with (lorafit.training.accelerator): precision refused where the machine lacks
it, trackers refused where their package is missing, tensorboard's events written beside metrics.jsonl."""

from __future__ import annotations

import importlib.util

import pytest

from lorafit.errors import LorafitError
from lorafit.training import accelerator
from lorafit.training.accelerator import check_accelerator_settings
from lorafit.training.settings import TrainConfig
from test_cli import _tiny_train_args, assert_one_line_error, read_jsonl, run_cli, tiny_bert_dir  # noqa: F401


def _config(**values) -> TrainConfig:
    return TrainConfig(model="m", train_file="t.jsonl", **values)


def test_fp16_on_a_cpu_is_refused_with_the_alternatives():
    with pytest.raises(LorafitError, match=r"fp16 needs a CUDA GPU.*--mixed-precision bf16 \(if the CPU has it\) or no"):
        check_accelerator_settings(_config(mixed_precision="fp16"), cuda=False)


def test_bf16_is_refused_on_a_cpu_without_it(monkeypatch):
    monkeypatch.setattr(accelerator, "cpu_has_bf16", lambda: False)
    with pytest.raises(LorafitError, match="this CPU has no bf16 instructions"):
        check_accelerator_settings(_config(mixed_precision="bf16"), cuda=False)
    monkeypatch.setattr(accelerator, "cpu_has_bf16", lambda: True)
    check_accelerator_settings(_config(mixed_precision="bf16"), cuda=False)


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_without_its_package_is_refused(tracker, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else real(name, *a))
    with pytest.raises(LorafitError, match=f"--report-to {tracker} needs the {tracker} package: pip install {tracker}"):
        check_accelerator_settings(_config(report_to=tracker))


def test_fsdp_from_accelerate_launch_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    with pytest.raises(LorafitError, match="does not run under FSDP yet.*without FSDP, or torchrun"):
        check_accelerator_settings(_config())


def test_fp16_on_a_cpu_is_one_line_exit_2_before_anything_is_written(tmp_path, capsys, tiny_bert_dir):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *_tiny_train_args(tmp_path, tiny_bert_dir), "--mixed-precision", "fp16",
                           "--output-dir", out)
    assert_one_line_error(code, err, "--mixed-precision fp16 needs a CUDA GPU")
    assert not out.exists()


def test_tensorboard_gets_the_metrics_and_metrics_jsonl_is_kept(tmp_path, capsys, tiny_bert_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    args = [*_tiny_train_args(tmp_path, tiny_bert_dir), "--max-steps", "2", "--batch-size", "4",
            "--eval-strategy", "steps", "--eval-steps", "1", "--validation-file", tmp_path / "train.jsonl",
            "--report-to", "tensorboard", "--output-dir", out]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))  # the settings go in a sub-folder's file
    assert len(events) == 1
    logged = EventAccumulator(str(events[0].parent)).Reload()
    for key in ("train_loss", "loss", "accuracy"):
        assert [(e.step, round(e.value, 5)) for e in logged.Scalars(key)] == [
            (r["step"], round(r[key], 5)) for r in records], key
