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


def _fsdp_env(monkeypatch, **values) -> None:
    """What `accelerate launch` sets for an FSDP config (FSDP_VERSION, FSDP_USE_ORIG_PARAMS, ...)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for name, value in values.items():
        monkeypatch.setenv(f"FSDP_{name.upper()}", value)


def test_fsdp_trains_where_accelerate_can_shard_lora(monkeypatch):
    _fsdp_env(monkeypatch, use_orig_params="true", sync_module_states="true")
    check_accelerator_settings(_config(), cuda=True)  # accelerate's default FSDP1 config on GPUs
    _fsdp_env(monkeypatch, version="2", use_orig_params="false", sync_module_states="true")
    check_accelerator_settings(_config(), cuda=False)  # FSDP2 has neither setting
    _fsdp_env(monkeypatch, version="1", use_orig_params="true", sync_module_states="false")
    check_accelerator_settings(_config(), cuda=False)


def test_fsdp1_without_original_parameters_is_refused(monkeypatch):
    # FSDP1's flat parameters would hold frozen and trained weights together, which it refuses mid-prepare
    _fsdp_env(monkeypatch, use_orig_params="false")
    with pytest.raises(LorafitError, match="FSDP1 without use_orig_params cannot train LoRA.*--fsdp_use_orig_params "
                                           "true.*or fsdp_version: 2"):
        check_accelerator_settings(_config(), cuda=True)


def test_fsdp1_sync_module_states_on_cpus_is_refused(monkeypatch):
    # accelerate's plugin looks for a GPU device for it and fails with a RuntimeError naming GPU kinds
    _fsdp_env(monkeypatch, use_orig_params="true", sync_module_states="true")
    with pytest.raises(LorafitError, match="FSDP1 on CPU processes.*--fsdp_sync_module_states false "
                                           "--fsdp_cpu_ram_efficient_loading false"):
        check_accelerator_settings(_config(), cuda=False)


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
