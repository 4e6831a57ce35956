"""Tests for the training loop (lorafit.training.loop): batching, optimizer, schedule, evaluation, best adapter,
checkpoints and resuming, down to a run killed with SIGKILL and resumed from the command line."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_bert_cls
from lorafit.data import classification as data
from lorafit.training.checkpoint import STATE_NAME, list_checkpoints
from lorafit.tasks.classification import classification_loss, evaluate_classifier
from lorafit.config import LoraConfig
from lorafit.model import get_lora_model
from lorafit.training.run_dir import read_metrics
from lorafit.training.loop import (_due, _is_better, epoch_batches, make_optimizer, make_scheduler, run_training,
                           total_steps_for)
from lorafit.training.settings import TrainConfig
from test_cli import (adapter_tensors, assert_same_tensors, make_rows, read_jsonl, run_cli, single_thread,  # noqa: F401
                      tensors_equal, tiny_bert_dir, write_rows)

CHECKPOINT_FILES = {"adapter", "optimizer.safetensors", "rng.safetensors", STATE_NAME}


# --- batching, schedule, optimizer -----------------------------------------------------------------

def _config(**overrides) -> TrainConfig:
    return TrainConfig(**{"batch_size": 4, "seed": 3, **overrides}).resolved()


@pytest.mark.parametrize("group", [True, False])
def test_epoch_batches_cover_every_example_once(group):
    lengths = [(i * 7) % 23 + 1 for i in range(50)]
    config = _config(group_by_length=group)
    batches = epoch_batches(lengths, config, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(50))
    assert [len(b) for b in batches] == [4] * 12 + [2]  # only the last batch is short
    assert epoch_batches(lengths, config, epoch=0) == batches  # a pure function of (seed, epoch)
    assert epoch_batches(lengths, config, epoch=1) != batches
    assert epoch_batches(lengths, _config(group_by_length=group, seed=4), epoch=0) != batches


def test_length_grouping_cuts_padding():
    lengths = [(i * 37) % 97 + 1 for i in range(400)]

    def padded(group):
        batches = epoch_batches(lengths, _config(group_by_length=group, batch_size=8), epoch=0)
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    real = sum(lengths)
    assert padded(True) - real < (padded(False) - real) / 4


def test_total_steps():
    assert total_steps_for(10, _config(epochs=2)) == 6  # ceil(10 / 4) = 3 per epoch
    assert total_steps_for(10, _config(epochs=1.5)) == 5  # ceil(3 * 1.5)
    assert total_steps_for(10, _config(epochs=2, max_steps=4)) == 4


def test_schedule_warms_up_then_decays_linearly_to_zero():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = make_scheduler(optimizer, total_steps=10, warmup_ratio=0.2)  # 2 warm-up steps
    seen = [optimizer.param_groups[0]["lr"]]
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        seen.append(optimizer.param_groups[0]["lr"])
    expected = [1 / 3, 2 / 3, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0]
    assert seen == pytest.approx(expected)


def test_optimizer_decays_weights_but_not_biases_or_norms():
    model = get_lora_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    optimizer = make_optimizer(model, _config(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups}
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert sorted(groups[0.1] + groups[0.0]) == trainable
    assert groups[0.0] and all(n.endswith(".bias") for n in groups[0.0])
    assert any("lora_A" in n for n in groups[0.1]) and any("classifier" in n for n in groups[0.1])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_due_and_better():
    assert [s for s in range(1, 8) if _due("steps", 3, s, False, s == 7)] == [3, 6, 7]
    assert _due("epoch", 3, 2, True, False) and not _due("epoch", 3, 3, False, False)
    assert not _due("no", 1, 1, True, True)
    assert _is_better(0.5, None, "accuracy") and _is_better(0.6, 0.5, "f1") and not _is_better(0.5, 0.5, "accuracy")
    assert _is_better(0.4, 0.5, "loss") and not _is_better(0.6, 0.5, "loss")


# --- the loop on a tiny model ------------------------------------------------------------------------

TOKENIZER = SimpleNamespace(pad_token_id=0, eos_token_id=None, padding_side="right")


def _examples(n: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = int(torch.randint(3, 12, (1,), generator=generator))
        ids = torch.randint(5, 100, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "attention_mask": [1] * length, "labels": i % 2})
    return examples


TRAIN, VALIDATION = _examples(12, seed=1), _examples(6, seed=2)


def _model(seed: int = 42):
    torch.manual_seed(seed)
    return get_lora_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=4, lora_dropout=0.1,
                                                      target_modules=["query", "value"]))


def _train(run_dir: Path, config: TrainConfig, evaluate=None, loss_fn=classification_loss, model=None):
    """Train a fresh tiny model (or ``model``); returns (model, result). ``evaluate(model)`` -> metrics."""
    model = model or _model()
    run_dir.mkdir(exist_ok=True)
    collate = data.make_collator(TOKENIZER)
    if evaluate is None:
        def evaluate(m):
            return evaluate_classifier(m, VALIDATION, collate, 4, ["a", "b"])
    with single_thread():
        result = run_training(model, TRAIN, collate, loss_fn, lambda: evaluate(model), config, run_dir)
    return model, result


def _scripted(key: str, values: list[float]):
    scores = iter(values)
    return lambda model: {key: next(scores)}


class Killed(BaseException):
    """Stands for a kill: nothing after it runs (BaseException, so no ``except Exception`` stops it)."""


def _crash_at(step: int):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] == step:
            raise Killed(f"killed during step {step}")
        return classification_loss(model, batch)

    return loss_fn


def _steps_config(**overrides) -> TrainConfig:
    settings = {"batch_size": 2, "epochs": 2, "eval_strategy": "steps", "eval_steps": 2, "keep_checkpoints": 50,
                "lr": 0.01, "seed": 42, "lora_dropout": 0.1}
    return TrainConfig(**{**settings, **overrides}).resolved()


@pytest.mark.parametrize("metric, scores, best_step", [
    ("accuracy", [0.5, 0.75, 0.6, 0.75, 0.7, 0.7], 2),  # a tie does not replace the first best
    ("f1", [0.2, 0.1, 0.3, 0.3, 0.25, 0.29], 3),
    ("loss", [0.9, 0.7, 0.8, 0.6, 0.65, 0.61], 4),  # lower is better
])
def test_best_adapter_is_the_one_with_the_best_score(tmp_path, metric, scores, best_step):
    config = _steps_config(metric=metric, eval_steps=1, max_steps=6)
    _, result = _train(tmp_path, config, evaluate=_scripted(metric, scores))
    assert result.state.best_step == best_step and result.state.best_metric == scores[best_step - 1]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert [r[metric] for r in read_metrics(tmp_path)] == scores
    best = adapter_tensors(tmp_path / "best")
    checkpoints = {int(p.name.split("-")[1]): adapter_tensors(p / "adapter") for p in list_checkpoints(tmp_path)}
    assert sorted(checkpoints) == [1, 2, 3, 4, 5, 6]
    assert [step for step, weights in checkpoints.items() if tensors_equal(weights, best)] == [best_step]


def test_every_checkpoint_is_complete_and_old_ones_are_pruned(tmp_path):
    _train(tmp_path, _steps_config(keep_checkpoints=2))
    checkpoints = list_checkpoints(tmp_path)
    assert [p.name for p in checkpoints] == ["checkpoint-10", "checkpoint-12"]
    for path in checkpoints:
        assert {p.name for p in path.iterdir()} == CHECKPOINT_FILES
        state = json.loads((path / STATE_NAME).read_text())
        assert state["state"]["step"] == int(path.name.split("-")[1])
    assert len(read_metrics(tmp_path)) == 6  # every 2 of 12 steps
    assert not list(tmp_path.glob(".*"))  # no temporary folders left


def _final_weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("crash_step", [5, 7, 9])
def test_resume_after_a_crash_matches_the_uninterrupted_run(tmp_path, crash_step):
    """Crash mid-epoch (5 and 9: 6 steps per epoch) or just after an epoch boundary (7); resume."""
    config = _steps_config()
    reference, _ = _train(tmp_path / "reference", config)

    with pytest.raises(Killed):
        _train(tmp_path / "run", config, loss_fn=_crash_at(crash_step))
    newest = list_checkpoints(tmp_path / "run")[-1]
    assert newest.name == f"checkpoint-{(crash_step - 1) // 2 * 2}"
    resumed, result = _train(tmp_path / "run", _steps_config(resume=True))
    assert result.state.step == 12
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == (tmp_path / "reference" / "metrics.jsonl").read_text()
    assert_same_tensors(_final_weights(resumed), _final_weights(reference), atol=1e-6)
    assert_same_tensors(adapter_tensors(tmp_path / "run" / "best"), adapter_tensors(tmp_path / "reference" / "best"),
                        atol=1e-6)


def test_resume_keeps_the_training_loss_window_when_saves_and_evaluations_differ(tmp_path):
    """Checkpoints every 3 steps, evaluations every 2: the loss averaged since the last evaluation
    spans the crash, and is still the same after resuming."""
    config = _steps_config(save_strategy="steps", save_steps=3)
    _train(tmp_path / "reference", config)
    with pytest.raises(Killed):
        _train(tmp_path / "run", config, loss_fn=_crash_at(5))  # resumes from step 3, mid-window
    _train(tmp_path / "run", _steps_config(save_strategy="steps", save_steps=3, resume=True))
    assert read_metrics(tmp_path / "run") == read_metrics(tmp_path / "reference")


def test_resume_with_no_checkpoint_starts_over_without_stale_metrics(tmp_path):
    """Killed after logging an evaluation but before its first checkpoint: resuming starts from
    step 0 and the log holds each evaluation once."""
    config = _steps_config(save_strategy="epoch")
    _train(tmp_path / "reference", config)
    with pytest.raises(Killed):
        _train(tmp_path / "run", config, loss_fn=_crash_at(5))  # evaluated at 2 and 4, no checkpoint yet
    assert len(read_metrics(tmp_path / "run")) == 2 and not list_checkpoints(tmp_path / "run")
    _train(tmp_path / "run", _steps_config(save_strategy="epoch", resume=True))
    assert read_metrics(tmp_path / "run") == read_metrics(tmp_path / "reference")


def test_leftover_temporary_checkpoint_is_ignored_and_removed(tmp_path):
    config = _steps_config(max_steps=4)
    _train(tmp_path, config)
    leftover = tmp_path / ".checkpoint-6.k3j2"  # a save killed half-way through
    (leftover / "adapter").mkdir(parents=True)
    (leftover / "optimizer.safetensors").write_bytes(b"half")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    _train(tmp_path, _steps_config(max_steps=6, resume=True))
    assert not leftover.exists()
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == "checkpoint-6"


def test_without_validation_the_training_loss_is_still_logged(tmp_path):
    config = _steps_config(max_steps=3)
    collate = data.make_collator(TOKENIZER)
    with single_thread():
        result = run_training(_model(), TRAIN, collate, classification_loss, None, config, tmp_path)
    assert result.state.best_step is None and not (tmp_path / "best").exists()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 3]  # at each evaluation point, and at the end
    assert all(math.isfinite(r["train_loss"]) and set(r) == {"step", "epoch", "train_loss"} for r in records)


def test_best_adapter_survives_a_kill_while_it_was_being_replaced(tmp_path):
    """replace_dir_atomically renames best/ to .best.old, then the new folder to best/: a kill in
    between leaves no best/. Resuming puts the previous one back rather than losing it."""
    _train(tmp_path, _steps_config(max_steps=4, eval_steps=2, metric="accuracy"),
           evaluate=_scripted("accuracy", [0.9, 0.5]))
    (tmp_path / "best").rename(tmp_path / ".best.old")
    (tmp_path / ".best.k2j3").mkdir()  # the half-written replacement
    _train(tmp_path, _steps_config(max_steps=6, eval_steps=2, metric="accuracy", resume=True),
           evaluate=_scripted("accuracy", [0.4]))  # nothing better after resuming: best/ is not rewritten
    assert sorted(p.name for p in tmp_path.glob(".*")) == []
    assert tensors_equal(adapter_tensors(tmp_path / "best"), adapter_tensors(tmp_path / "checkpoint-2" / "adapter"))


def test_resume_needs_only_the_output_dir(tmp_path, capsys, monkeypatch, tiny_bert_dir):
    """`lorafit train --output-dir DIR --resume` (as --help shows it) continues the run with its own
    settings, not the defaults (built-in data and model)."""
    from lorafit.tasks import pipeline as finetune

    train = write_rows(tmp_path / "train.jsonl", make_rows(24, seed=23))
    common = ["train", "--model", str(tiny_bert_dir), "--train-file", str(train), "--validation-file", str(train),
              "--max-length", "32", "--batch-size", "4", "--epochs", "1", "--eval-strategy", "steps",
              "--eval-steps", "2", "--lr", "0.01", "--r", "4"]
    code, _, err = run_cli(capsys, *common, "--output-dir", tmp_path / "reference")
    assert code == 0, err
    with monkeypatch.context() as patch:
        patch.setattr(finetune, "classification_loss", _crash_at(3))
        with pytest.raises(Killed):
            run_cli(capsys, *common, "--output-dir", tmp_path / "run")
    code, out, err = run_cli(capsys, "train", "--output-dir", tmp_path / "run", "--resume")
    assert code == 0, err
    assert "Resuming from checkpoint-2 (step 2 of 6)" in out
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == (tmp_path / "reference" / "metrics.jsonl").read_text()
    assert tensors_equal(adapter_tensors(tmp_path / "run" / "best"), adapter_tensors(tmp_path / "reference" / "best"))


# --- the acceptance test: SIGKILL mid-epoch, then --resume ------------------------------------------

def _complete_checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*") if (p / STATE_NAME).is_file())


def test_killed_run_resumes_to_the_same_result(tmp_path, capsys, tiny_bert_dir):
    train = write_rows(tmp_path / "train.jsonl", make_rows(48, seed=21))  # batch 4: 12 steps per epoch
    validation = write_rows(tmp_path / "dev.jsonl", make_rows(8, seed=22))
    common = ["train", "--model", str(tiny_bert_dir), "--train-file", str(train), "--validation-file", str(validation),
              "--max-length", "32", "--batch-size", "4", "--epochs", "2", "--lr", "0.01",
              "--save-strategy", "steps", "--save-steps", "2", "--eval-strategy", "steps", "--eval-steps", "2"]
    reference = tmp_path / "reference"
    code, _, err = run_cli(capsys, *common, "--output-dir", reference)
    assert code == 0, err

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as in-process commands run here (same arithmetic)
    for attempt in range(3):
        run = tmp_path / f"killed-{attempt}"
        log = tmp_path / f"killed-{attempt}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen([sys.executable, "-m", "lorafit", *common, "--output-dir", str(run)],
                                       stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        while not any(step >= 2 for step in _complete_checkpoints(run)):
            assert process.poll() is None, f"the run ended before its first checkpoint:\n{log.read_text()}"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
        killed = process.wait(timeout=60) == -signal.SIGKILL  # not if it had already finished
        steps = _complete_checkpoints(run)
        if killed and max(steps) < 12:  # killed inside the first epoch, as intended; else try again
            break
    else:
        pytest.fail(f"could not kill the run inside its first epoch (checkpoints {steps})")

    # a checkpoint folder is complete or absent
    for step in steps:
        assert {p.name for p in (run / f"checkpoint-{step}").iterdir()} == CHECKPOINT_FILES
    leftover = run / f".checkpoint-{max(steps) + 2}.x1y2"  # as if killed while writing the next one
    (leftover / "adapter").mkdir(parents=True)

    code, out, err = run_cli(capsys, *common, "--output-dir", run, "--resume")
    assert code == 0, err
    assert f"Resuming from checkpoint-{max(steps)} (step {max(steps)} of 24)" in out
    assert not leftover.exists()
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    assert len(read_jsonl(run / "metrics.jsonl")) == 12
    assert_same_tensors(adapter_tensors(run / "best"), adapter_tensors(reference / "best"), atol=1e-6)
    assert_same_tensors(adapter_tensors(run / "checkpoint-24" / "adapter"),
                        adapter_tensors(reference / "checkpoint-24" / "adapter"), atol=1e-6)

    def final_metrics(run_dir):
        card = (run_dir / "README.md").read_text(encoding="utf-8").split("## Hyperparameters")[0]
        return [line for line in card.splitlines() if line.startswith("| validation_")]

    assert final_metrics(run) == final_metrics(reference) and len(final_metrics(run)) == 3


def test_training_steps_run_without_onednn_and_with_fast_dropouts_and_leave_the_model_as_they_found_it(tmp_path):
    seen = []

    def loss_fn(model, batch):
        plain = [m for m in model.modules() if type(m) is torch.nn.Dropout and m.p > 0]
        seen.append((torch.backends.mkldnn.enabled, len(plain)))
        return classification_loss(model, batch)

    before = torch.backends.mkldnn.enabled
    model = _model()
    modules = list(model.modules())
    assert any(type(m) is torch.nn.Dropout and m.p > 0 for m in modules)
    _train(tmp_path, _steps_config(max_steps=2), loss_fn=loss_fn, model=model)
    assert seen == [(False, 0), (False, 0)]
    assert torch.backends.mkldnn.enabled == before and list(model.modules()) == modules


# --- interruptions ---------------------------------------------------------

def _interrupt_at(step: int):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return classification_loss(model, batch)

    return loss_fn


def test_ctrl_c_says_where_training_stopped_and_how_to_resume(tmp_path, capsys, monkeypatch, tiny_bert_dir):
    from lorafit.tasks import pipeline as finetune

    train = write_rows(tmp_path / "train.jsonl", make_rows(24, seed=23))
    common = ["train", "--model", str(tiny_bert_dir), "--train-file", str(train), "--max-length", "32",
              "--batch-size", "4", "--epochs", "1", "--eval-strategy", "steps", "--eval-steps", "2",
              "--output-dir", tmp_path / "run"]
    monkeypatch.setattr(finetune, "classification_loss", _interrupt_at(4))
    code, _, err = run_cli(capsys, *common)
    assert code == 130
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "lorafit" in line]  # the rest is the progress bar
    assert line == f"lorafit train: interrupted at step 3; resume with: lorafit train --resume --output-dir " \
                   f"{tmp_path / 'run'}"
    monkeypatch.undo()
    code, out, err = run_cli(capsys, "train", "--resume", "--output-dir", tmp_path / "run")
    assert code == 0, err
    assert "Resuming from checkpoint-2 (step 2 of 6)" in out


@pytest.mark.slow  # a second python process: ~15 s here
def test_sigterm_says_where_training_stopped_and_how_to_resume(tmp_path, tiny_bert_dir):
    train = write_rows(tmp_path / "train.jsonl", make_rows(400, seed=21))
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "lorafit", "train", "--model", str(tiny_bert_dir),
                                "--train-file", str(train), "--max-length", "32", "--batch-size", "2",
                                "--epochs", "1", "--eval-strategy", "steps", "--eval-steps", "2",
                                "--output-dir", str(run)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not _complete_checkpoints(run):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    last = err.splitlines()[-1]
    assert re.fullmatch(rf"lorafit train: interrupted at step (\d+); resume with: lorafit train --resume "
                        rf"--output-dir {re.escape(str(run))}", last), err
    assert "Traceback" not in err
    assert int(re.search(r"step (\d+)", last).group(1)) >= max(_complete_checkpoints(run))
