"""Tests for lorafit.training.checkpoint: what a checkpoint holds, exact restore, atomic writes, pruning."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_batch, tiny_bert_cls
from lorafit.training import checkpoint
from lorafit.training.checkpoint import STATE_NAME, TrainState, list_checkpoints, load_checkpoint, save_checkpoint
from lorafit.config import LoraConfig
from lorafit import files
from lorafit.errors import LorafitError
from lorafit.model import get_lora_model
from lorafit.training.run_dir import read_metrics
from lorafit.training.loop import make_optimizer, make_scheduler
from lorafit.training.settings import TrainConfig
from test_cli import assert_same_tensors, single_thread
from test_loop import Killed, _crash_at, _final_weights, _steps_config, _train

FILES = {"adapter", "optimizer.safetensors", "rng.safetensors", STATE_NAME}


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = get_lora_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]))
    config = TrainConfig(lr=0.01, weight_decay=0.1)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, total_steps=10, warmup_ratio=0.2)
    return model, optimizer, scheduler


def _train_steps(model, optimizer, scheduler, steps: int) -> None:
    model.train()
    batch = make_batch()
    for step in range(steps):
        loss = model(**batch, labels=torch.tensor([0, 1, 0, 1])).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _state(step: int = 3) -> TrainState:
    return TrainState(step=step, epoch=1, batch_in_epoch=1, best_metric=0.75, best_step=2,
                      history=[{"step": 2, "accuracy": 0.75}], window_loss=1.25, window_steps=1)


def test_round_trip_restores_weights_optimizer_schedule_and_every_rng(tmp_path):
    model, optimizer, scheduler = _setup()
    _train_steps(model, optimizer, scheduler, 3)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = save_checkpoint(tmp_path, model.save_pretrained, optimizer, scheduler, _state(), keep=5)
    assert path == tmp_path / "checkpoint-3"
    weights, lr = _trainable(model), optimizer.param_groups[0]["lr"]
    moments = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}
    expected_draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))

    fresh, fresh_optimizer, fresh_scheduler = _setup(seed=9)  # other weights, empty optimizer
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    state = load_checkpoint(path, fresh, fresh_optimizer, fresh_scheduler)

    assert state == _state()
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected_draws
    restored = _trainable(fresh)
    assert restored.keys() == weights.keys()
    assert all(torch.equal(restored[k], weights[k]) for k in weights)
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    assert fresh_scheduler.last_epoch == 3
    restored_moments = fresh_optimizer.state_dict()["state"][0]
    assert restored_moments.keys() == moments.keys()
    assert all(torch.equal(torch.as_tensor(restored_moments[k]), torch.as_tensor(moments[k])) for k in moments)

    # the same next steps from the restored state as from the original one
    torch.manual_seed(5)  # the same dropout masks for both
    _train_steps(model, optimizer, scheduler, 2)
    torch.manual_seed(5)
    _train_steps(fresh, fresh_optimizer, fresh_scheduler, 2)
    after, fresh_after = _trainable(model), _trainable(fresh)
    assert all(torch.equal(after[k], fresh_after[k]) for k in after)


def test_round_trip_restores_the_cuda_rng_of_every_device(tmp_path, monkeypatch):
    """On a GPU, dropout masks come from each device's own generator: a resume must restore those too.
    (Faked here: CPU tensors stand for two devices' generator states.)"""
    states = [torch.arange(4, dtype=torch.uint8), torch.arange(4, 8, dtype=torch.uint8)]
    restored: dict[int, torch.Tensor] = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.__setitem__(device, state))
    model, optimizer, scheduler = _setup()
    path = save_checkpoint(tmp_path, model.save_pretrained, optimizer, scheduler, _state(), keep=5)
    load_checkpoint(path, *_setup(seed=9))
    assert sorted(restored) == [0, 1]
    assert all(torch.equal(restored[device], states[device]) for device in (0, 1))


def test_checkpoint_is_safetensors_and_json_only(tmp_path):
    model, optimizer, scheduler = _setup()
    _train_steps(model, optimizer, scheduler, 1)
    path = save_checkpoint(tmp_path, model.save_pretrained, optimizer, scheduler, _state(1), keep=5)
    assert {p.name for p in path.iterdir()} == FILES
    assert {p.name for p in (path / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert any(key.endswith(".exp_avg") for key in load_file(str(path / "optimizer.safetensors")))
    assert set(load_file(str(path / "rng.safetensors"))) == {"torch"}
    saved = json.loads((path / STATE_NAME).read_text())
    assert saved["state"]["step"] == 1 and saved["state"]["history"] == [{"step": 2, "accuracy": 0.75}]
    assert {"optimizer", "scheduler", "python_rng", "numpy_rng"} <= set(saved)
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in path.rglob("*"))


def test_failed_save_leaves_no_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    model, optimizer, scheduler = _setup()
    save_checkpoint(tmp_path, model.save_pretrained, optimizer, scheduler, _state(2), keep=5)
    before = {p: p.read_bytes() for p in (tmp_path / "checkpoint-2").rglob("*") if p.is_file()}

    real_save_file = checkpoint.save_file

    def failing_save_file(tensors, filename, *args, **kwargs):
        if filename.endswith("rng.safetensors"):
            raise OSError("disk full")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, model.save_pretrained, optimizer, scheduler, _state(4), keep=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]  # no checkpoint-4, no temporary
    assert {p: p.read_bytes() for p in (tmp_path / "checkpoint-2").rglob("*") if p.is_file()} == before


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    model, optimizer, scheduler = _setup()
    for step in (2, 4, 6, 8, 10):
        save_checkpoint(tmp_path, model.save_pretrained, optimizer, scheduler, _state(step), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-8", "checkpoint-10"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-8"]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    model, optimizer, scheduler = _setup()
    save_checkpoint(tmp_path, model.save_pretrained, optimizer, scheduler, _state(3), keep=2)
    changed = _state(3)
    changed.best_metric = 0.9
    save_checkpoint(tmp_path, model.save_pretrained, optimizer, scheduler, changed, keep=2)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]
    assert json.loads((tmp_path / "checkpoint-3" / STATE_NAME).read_text())["state"]["best_metric"] == 0.9


def test_list_checkpoints_numeric_order_and_only_complete_ones(tmp_path):
    for name in ("checkpoint-9", "checkpoint-10", "checkpoint-100", "checkpoint-2"):
        (tmp_path / name / "adapter").mkdir(parents=True)
        (tmp_path / name / STATE_NAME).write_text("{}")
    (tmp_path / "checkpoint-50" / "adapter").mkdir(parents=True)  # no trainer_state.json: not complete
    (tmp_path / ".checkpoint-200.abc.tmp").mkdir()  # an interrupted save
    (tmp_path / ".checkpoint-200.abc.tmp" / STATE_NAME).write_text("{}")
    (tmp_path / "checkpoint-last").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-9", "checkpoint-10",
                                                            "checkpoint-100"]


def test_pruning_leaves_checkpoint_folders_lorafit_did_not_write(tmp_path):
    """A transformers Trainer's checkpoint-1/ also holds a trainer_state.json; it is not lorafit's to delete."""
    trainer = tmp_path / "checkpoint-1"
    trainer.mkdir()
    for name in (STATE_NAME, "optimizer.pt", "adapter_model.safetensors"):
        (trainer / name).write_text("theirs")
    model, optimizer, scheduler = _setup()
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, model.save_pretrained, optimizer, scheduler, _state(step), keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-6"]
    assert {p.name: p.read_text() for p in trainer.iterdir()} == {
        STATE_NAME: "theirs", "optimizer.pt": "theirs", "adapter_model.safetensors": "theirs"}


@pytest.mark.parametrize("swap", [True, False], ids=["swap", "no-swap"])
def test_replacing_a_checkpoint_always_leaves_a_complete_one_in_place(tmp_path, monkeypatch, swap):
    """At every rename and delete while checkpoint-3/ is written again, it or the previous one set aside
    (.checkpoint-3.old, which run_dir.recover_run_dir puts back) is complete, also where the file system
    cannot swap two folders in one step."""
    if not swap:
        monkeypatch.setattr(files, "_swap", lambda new, target: False)
    model, optimizer, scheduler = _setup()
    save_checkpoint(tmp_path, model.save_pretrained, optimizer, scheduler, _state(3), keep=2)
    final, aside = tmp_path / "checkpoint-3", tmp_path / ".checkpoint-3.old"
    seen = []

    def watched(function):
        def run(*args, **kwargs):
            result = function(*args, **kwargs)
            seen.append((final / STATE_NAME).is_file() or (aside / STATE_NAME).is_file())
            return result
        return run

    monkeypatch.setattr(os, "rename", watched(os.rename))
    monkeypatch.setattr(shutil, "rmtree", watched(shutil.rmtree))
    save_checkpoint(tmp_path, model.save_pretrained, optimizer, scheduler, _state(3), keep=2)
    monkeypatch.undo()
    assert seen and all(seen), seen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]


def test_replacing_a_checkpoint_never_leaves_its_name_empty(tmp_path, monkeypatch):
    """Where the file system can swap two folders in one step (Linux), checkpoint-3/ itself is complete at
    every rename and delete while it is written again: a reader never finds the name missing."""
    model, optimizer, scheduler = _setup()
    save_checkpoint(tmp_path, model.save_pretrained, optimizer, scheduler, _state(3), keep=2)
    final = tmp_path / "checkpoint-3"
    seen = []

    def watched(function):
        def run(*args, **kwargs):
            result = function(*args, **kwargs)
            seen.append((final / STATE_NAME).is_file())
            return result
        return run

    monkeypatch.setattr(os, "rename", watched(os.rename))
    monkeypatch.setattr(shutil, "rmtree", watched(shutil.rmtree))
    changed = _state(3)
    changed.best_metric = 0.9
    save_checkpoint(tmp_path, model.save_pretrained, optimizer, scheduler, changed, keep=2)
    monkeypatch.undo()
    assert seen and all(seen), seen
    assert json.loads((final / STATE_NAME).read_text())["state"]["best_metric"] == 0.9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
@pytest.mark.parametrize("file", ["optimizer.safetensors", "rng.safetensors", "adapter/adapter_model.safetensors",
                                  STATE_NAME])
def test_a_damaged_file_is_named_and_nothing_is_restored(tmp_path, file, damage):
    model, optimizer, scheduler = _setup()
    _train_steps(model, optimizer, scheduler, 2)
    path = save_checkpoint(tmp_path, model.save_pretrained, optimizer, scheduler, _state(2), keep=2)
    _damage(path / file, damage)
    fresh, fresh_optimizer, fresh_scheduler = _setup(seed=1)
    weights, rng = _trainable(fresh), torch.get_rng_state()
    with pytest.raises(checkpoint.CheckpointDamaged, match=f"^checkpoint-2/{file.split('/')[0]} is damaged \\(.+\\)$"):
        load_checkpoint(path, fresh, fresh_optimizer, fresh_scheduler)
    assert all(torch.equal(weights[n], p) for n, p in _trainable(fresh).items())
    assert torch.equal(torch.get_rng_state(), rng) and not fresh_optimizer.state


# --- resuming past a damaged checkpoint, in the training loop ---------------------------------------

def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(b"\x00garbage" * 40)
    else:
        path.unlink()


@pytest.mark.parametrize("file, how", [("optimizer.safetensors", "truncated"), ("adapter/adapter_model.safetensors",
                                       "garbage"), ("rng.safetensors", "missing"), (STATE_NAME, "garbage")])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys, file, how):
    config = _steps_config()
    reference, _ = _train(tmp_path / "reference", config)
    with pytest.raises(Killed):
        _train(tmp_path / "run", config, loss_fn=_crash_at(7))  # checkpoints 2, 4, 6
    _damage(tmp_path / "run" / "checkpoint-6" / file, how)
    capsys.readouterr()
    resumed, result = _train(tmp_path / "run", _steps_config(resume=True))
    out, err = capsys.readouterr()
    (line,) = [line for line in err.splitlines() if line.startswith("lorafit")]  # the rest is the progress bar
    assert line.startswith(f"lorafit: checkpoint-6/{file.split('/')[0]} is damaged (")
    assert line.endswith("; resuming from checkpoint-4 instead")
    assert "Resuming from checkpoint-4 (step 4 of 12)" in out
    assert read_metrics(tmp_path / "run") == read_metrics(tmp_path / "reference")
    assert_same_tensors(_final_weights(resumed), _final_weights(reference), atol=1e-6)


def test_with_no_usable_checkpoint_resume_names_the_damaged_file_and_changes_nothing(tmp_path):
    config = _steps_config(keep_checkpoints=1)
    with pytest.raises(Killed):
        _train(tmp_path, config, loss_fn=_crash_at(5))  # checkpoint-4 only
    _damage(tmp_path / "checkpoint-4" / "optimizer.safetensors", "truncated")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(LorafitError, match=r"cannot resume '.+': checkpoint-4/optimizer.safetensors is damaged "
                                           r"\(.+\), and no earlier checkpoint reads back; start the run again"):
        _train(tmp_path, _steps_config(keep_checkpoints=1, resume=True))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
