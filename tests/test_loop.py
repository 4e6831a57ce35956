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
from lorafit.training.run_dir import LOCK_NAME, read_metrics
from lorafit.training.loop import (_due, _is_better, epoch_batches, make_optimizer, make_scheduler, run_training,
                           total_steps_for)
from lorafit.training.settings import TrainConfig
from test_causal_lm import save_tiny_model, todo_records, write_jsonl
from test_cli import (adapter_tensors, assert_same_tensors, build_tiny_bert, make_rows, read_jsonl, run_cli,  # noqa: F401
                      single_thread, tensors_equal, tiny_bert_dir, write_rows)

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
    leftover = tmp_path / ".checkpoint-6.k3j2.tmp"  # a save killed half-way through
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
    """Where the file system cannot swap two folders in one step, files.replace_dir renames best/ to .best.old,
    then the new folder to best/: a kill in between leaves no best/. Resuming puts the previous one back
    rather than losing it."""
    _train(tmp_path, _steps_config(max_steps=4, eval_steps=2, metric="accuracy"),
           evaluate=_scripted("accuracy", [0.9, 0.5]))
    (tmp_path / "best").rename(tmp_path / ".best.old")
    (tmp_path / ".best.k2j3.tmp").mkdir()  # the half-written replacement
    _train(tmp_path, _steps_config(max_steps=6, eval_steps=2, metric="accuracy", resume=True),
           evaluate=_scripted("accuracy", [0.4]))  # nothing better after resuming: best/ is not rewritten
    assert sorted(p.name for p in tmp_path.glob(".*")) == []
    assert tensors_equal(adapter_tensors(tmp_path / "best"), adapter_tensors(tmp_path / "checkpoint-2" / "adapter"))


def test_resume_needs_only_the_output_dir(tmp_path, capsys, monkeypatch, tiny_bert_dir):
    """`lorafit train --output-dir DIR --resume` (as --help shows it) continues the run with its own
    settings, not the defaults (built-in data and model)."""
    from lorafit.tasks import classification

    train = write_rows(tmp_path / "train.jsonl", make_rows(24, seed=23))
    common = ["train", "--model", str(tiny_bert_dir), "--train-file", str(train), "--validation-file", str(train),
              "--max-length", "32", "--batch-size", "4", "--epochs", "1", "--eval-strategy", "steps",
              "--eval-steps", "2", "--lr", "0.01", "--r", "4"]
    code, _, err = run_cli(capsys, *common, "--output-dir", tmp_path / "reference")
    assert code == 0, err
    with monkeypatch.context() as patch:
        patch.setattr(classification, "classification_loss", _crash_at(3))
        with pytest.raises(Killed):
            run_cli(capsys, *common, "--output-dir", tmp_path / "run")
    code, out, err = run_cli(capsys, "train", "--output-dir", tmp_path / "run", "--resume")
    assert code == 0, err
    assert "Resuming from checkpoint-2 (step 2 of 6)" in out
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == (tmp_path / "reference" / "metrics.jsonl").read_text()
    assert tensors_equal(adapter_tensors(tmp_path / "run" / "best"), adapter_tensors(tmp_path / "reference" / "best"))


# --- the acceptance tests: a seeded run repeats, and a run SIGKILLed and resumed ends the same ------------
# Every run is a child process `python -m lorafit train` with torch's default thread count, on bases saved
# with and without the head the task needs (a missing head is created at load time from the global RNG).

def _classifier_case(root: Path, head: bool, model: str | None = None) -> list:
    train = write_rows(root / "train.jsonl", make_rows(24, ("neg", "neu", "pos"), seed=21))  # 3 steps per epoch
    validation = write_rows(root / "dev.jsonl", make_rows(6, ("neg", "neu", "pos"), seed=22))
    model = model or build_tiny_bert(root / "model", num_labels=3, head=head)
    return ["train", "--model", model, "--train-file", train, "--validation-file", validation,
            "--max-length", "32", "--epochs", "3", "--lr", "0.01"]


def _causal_case(root: Path, head: bool) -> list:
    records = todo_records()
    train = write_jsonl(root / "train.jsonl", records[:40])  # 5 steps per epoch
    validation = write_jsonl(root / "dev.jsonl", records[40:])
    return ["train", "--task", "causal-lm", "--model", save_tiny_model(root / "model", "llama", head=head),
            "--train-file", train, "--validation-file", validation, "--max-length", "64", "--max-steps", "9",
            "--lr", "0.01"]


CASES = {
    "classifier": lambda root: _classifier_case(root, head=True),
    "classifier-headless": lambda root: _classifier_case(root, head=False),
    "causal-lm": lambda root: _causal_case(root, head=True),
    "causal-lm-headless": lambda root: _causal_case(root, head=False),
    "minilm": lambda root: _classifier_case(root, head=False, model="minilm"),  # the run, scaled down
}
# 9 steps; saves after every step and evaluations every 2 give the kills below a checkpoint to resume from
SEEDED = ["--seed", "7", "--lora-dropout", "0.1", "--batch-size", "8", "--save-strategy", "steps",
          "--save-steps", "1", "--eval-strategy", "steps", "--eval-steps", "2"]

# `python -c _KILLER MOMENT N ARGS...` runs `lorafit ARGS`, which SIGKILLs itself at the N-th MOMENT of the
# process: "step" (inside an optimizer step, before the update), "checkpoint" or "best" (inside the write of
# a checkpoint or of best/, just after its adapter was written).
_KILLER = """
import os, signal, sys
from pathlib import Path

import torch

from lorafit.cli import main
from lorafit.model import LoraModel

moment, when = sys.argv[1], int(sys.argv[2])
seen = dict.fromkeys(("step", "checkpoint", "best"), 0)
optimizer_step, save_adapter = torch.optim.AdamW.step, LoraModel.save_pretrained


def reached(what):
    seen[what] += 1
    if what == moment and seen[what] == when:
        os.kill(os.getpid(), signal.SIGKILL)


def step(self, *args, **kwargs):
    reached("step")
    return optimizer_step(self, *args, **kwargs)


def save_pretrained(self, path, *args, **kwargs):
    save_adapter(self, path, *args, **kwargs)
    if Path(path).parent.name.startswith(".checkpoint-"):
        reached("checkpoint")
    elif Path(path).name.startswith(".best."):
        reached("best")


torch.optim.AdamW.step, LoraModel.save_pretrained = step, save_pretrained
sys.exit(main(sys.argv[3:]))
"""


def _lorafit(args: list, log: Path, kill: tuple[str, int] | None = None) -> int:
    """Run `lorafit ARGS` in a child process (output to ``log``); ``kill=(moment, n)``: see _KILLER."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    command = [sys.executable, "-m", "lorafit"] if kill is None else [sys.executable, "-c", _KILLER, *map(str, kill)]
    with open(log, "wb") as out:
        return subprocess.run([*command, *map(str, args)], stdout=out, stderr=subprocess.STDOUT, env=env,
                              timeout=600).returncode


@pytest.fixture(scope="module", params=["classifier-headless", "causal-lm-headless",
                                        pytest.param("classifier", marks=pytest.mark.slow),
                                        pytest.param("causal-lm", marks=pytest.mark.slow),
                                        pytest.param("minilm", marks=pytest.mark.slow)])
def seeded_run(request, tmp_path_factory) -> SimpleNamespace:
    """An uninterrupted seeded run of each case: the reference the tests compare against."""
    root = tmp_path_factory.mktemp(request.param)
    args = [*CASES[request.param](root), *SEEDED]
    log = root / "reference.log"
    assert _lorafit([*args, "--output-dir", root / "reference"], log) == 0, log.read_text()
    return SimpleNamespace(args=args, dir=root / "reference", log=log)


def _final_metrics(log: Path) -> dict[str, float]:
    """The scores in the summary a run prints last (not its timings)."""
    lines = [line.split(": ") for line in log.read_text().splitlines()]
    return {line[0]: float(line[1]) for line in lines
            if len(line) == 2 and line[0].startswith(("validation_", "test_", "heldout_"))}


def _assert_close(value, expected, where: str) -> None:
    if isinstance(expected, dict):
        assert sorted(value) == sorted(expected), where
        for key in expected:
            _assert_close(value[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(value) == len(expected), where
        for i, (a, b) in enumerate(zip(value, expected)):
            _assert_close(a, b, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert value == pytest.approx(expected, abs=1e-6, rel=0), where
    else:
        assert value == expected, where


def _assert_same_run(run: Path, log: Path, reference: SimpleNamespace) -> None:
    """Same metrics, logged and final, and the same best and last adapters (within 1e-6)."""
    _assert_close(read_jsonl(run / "metrics.jsonl"), read_jsonl(reference.dir / "metrics.jsonl"), "metrics.jsonl")
    final = _final_metrics(reference.log)
    assert final, "the reference printed no final scores"
    _assert_close(_final_metrics(log), final, "final metrics")
    last = _complete_checkpoints(reference.dir)[-1]
    for adapter in ("best", f"checkpoint-{last}/adapter"):
        assert_same_tensors(adapter_tensors(run / adapter), adapter_tensors(reference.dir / adapter), atol=1e-6)


def _complete_checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*") if (p / STATE_NAME).is_file())


def test_same_seed_same_run(seeded_run, tmp_path):
    log = tmp_path / "again.log"
    assert _lorafit([*seeded_run.args, "--output-dir", tmp_path / "again"], log) == 0, log.read_text()
    _assert_same_run(tmp_path / "again", log, seeded_run)


def test_killed_run_resumes_to_the_same_result(seeded_run, tmp_path):
    """Killed while writing best/ at step 2, while writing checkpoint-3, then inside step 5: each time
    --resume goes on from the newest complete checkpoint, and the run ends as if never interrupted."""
    run = tmp_path / "run"
    kills = [(("best", 1), ".best.*", 1), (("checkpoint", 2), ".checkpoint-3.*", 2), (("step", 3), None, 4)]
    for attempt, (kill, leftover, newest) in enumerate(kills):
        log = tmp_path / f"killed-{attempt}.log"
        code = _lorafit([*seeded_run.args, "--output-dir", run, *(["--resume"] if attempt else [])], log, kill)
        assert code == -signal.SIGKILL, f"not killed at {kill}:\n{log.read_text()}"
        assert _complete_checkpoints(run)[-1] == newest, kill
        for step in _complete_checkpoints(run):  # a checkpoint folder is complete or absent
            assert {p.name for p in (run / f"checkpoint-{step}").iterdir()} == CHECKPOINT_FILES
        assert leftover is None or list(run.glob(leftover)), f"the kill at {kill} was not inside the write"
    log = tmp_path / "resumed.log"
    assert _lorafit([*seeded_run.args, "--output-dir", run, "--resume"], log) == 0, log.read_text()
    assert "Resuming from checkpoint-4 (step 4 of 9)" in log.read_text()
    leftovers = [p.name for p in run.glob(".*") if p.name != LOCK_NAME]  # the lock file marks lorafit's folder
    assert not leftovers, f"a killed write left its temporary folder: {leftovers}"
    _assert_same_run(run, log, seeded_run)


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
    from lorafit.tasks import classification

    train = write_rows(tmp_path / "train.jsonl", make_rows(24, seed=23))
    common = ["train", "--model", str(tiny_bert_dir), "--train-file", str(train), "--max-length", "32",
              "--batch-size", "4", "--epochs", "1", "--eval-strategy", "steps", "--eval-steps", "2",
              "--output-dir", tmp_path / "run"]
    monkeypatch.setattr(classification, "classification_loss", _interrupt_at(4))
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


# --- gradient accumulation, clipping, mixed precision ------------------------------------------------------
def _no_dropout_model():
    torch.manual_seed(42)
    base = tiny_bert_cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return get_lora_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_dropout=0.0, target_modules=["query", "value"]))


def test_gradient_accumulation_gives_the_step_of_the_whole_batch(tmp_path):
    # batches of 4 in 3 micro-batches: 2 + 1 + 1 examples (and the epoch's last batch of 4 the same)
    config = _steps_config(batch_size=4, eval_strategy="no", lora_dropout=0.0)
    whole, _ = _train(tmp_path / "whole", config, model=_no_dropout_model())
    micro, _ = _train(tmp_path / "micro", _steps_config(batch_size=4, eval_strategy="no", lora_dropout=0.0,
                                                        gradient_accumulation_steps=3), model=_no_dropout_model())
    a, b = _final_weights(whole), _final_weights(micro)
    # summation order only, which Adam's normalisation amplifies: 6e-8 on an AVX2 CPU, 1.7e-6 on an AVX-512 one;
    # micro-batches weighted alike (2 + 1 + 1 examples as 1:1:1) move the weights by over 1e-3
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert max(b[k].abs().max().item() for k in b if "lora_B" in k) > 1e-3  # B left zero would match trivially


class _RecordingAdamW(torch.optim.AdamW):
    """AdamW that notes the gradients' global norm at every step."""
    norms: list[float] = []

    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        _RecordingAdamW.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return super().step(closure)


@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_max_grad_norm_clips_every_step(tmp_path, monkeypatch, max_norm):
    monkeypatch.setattr(torch.optim, "AdamW", _RecordingAdamW)
    _RecordingAdamW.norms = []
    _train(tmp_path, _steps_config(eval_strategy="no", max_grad_norm=max_norm))
    assert len(_RecordingAdamW.norms) == 12  # 2 epochs of 6 batches
    if max_norm is None:  # the unclipped norms exceed the limit, so the clipped run below says something
        assert min(_RecordingAdamW.norms) > 0.05
    else:
        assert max(_RecordingAdamW.norms) <= max_norm * (1 + 1e-5)


def test_bf16_computes_in_bf16_with_onednn_and_keeps_the_adapter_fp32(tmp_path):
    from lorafit.cpu import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 instructions (AVX512-BF16 or AMX)")
    seen = []

    def loss_fn(model, batch):  # accelerate returns the outputs in fp32: what ran inside is autocast's
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
        seen.append((dtype, torch.backends.mkldnn.enabled))
        return classification_loss(model, batch)

    fp32, _ = _train(tmp_path / "fp32", _steps_config(eval_strategy="no", lora_dropout=0.0), loss_fn=loss_fn,
                     model=_no_dropout_model())
    assert set(seen) == {(torch.float32, False)}
    seen.clear()
    bf16, _ = _train(tmp_path / "bf16", _steps_config(eval_strategy="no", lora_dropout=0.0, mixed_precision="bf16"),
                     loss_fn=loss_fn, model=_no_dropout_model())
    # oneDNN (AMX/AVX512-BF16 kernels) is the fast path for bf16 matmuls: without it an epoch ran over 10x slower
    assert set(seen) == {(torch.bfloat16, True)}
    start, a, b = _final_weights(_no_dropout_model()), _final_weights(fp32), _final_weights(bf16)
    assert all(t.dtype == torch.float32 for t in b.values())
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert 0 < diff < 0.25 * moved  # bf16 keeps 8 bits of mantissa: near the fp32 run, not equal to it


def test_bf16_training_evaluates_in_fp32_and_never_computes_bf16_without_onednn(tmp_path):
    from lorafit.cpu import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 instructions (AVX512-BF16 or AMX)")
    seen = set()
    model = _no_dropout_model()
    model.get_base_model().register_forward_pre_hook(lambda module, args: seen.add(
        (module.training, torch.is_autocast_enabled("cpu"), torch.backends.mkldnn.enabled)))
    _train(tmp_path, _steps_config(max_steps=4, lora_dropout=0.0, mixed_precision="bf16"), model=model)
    evaluate_classifier(model, VALIDATION, data.make_collator(TOKENIZER), 4, ["a", "b"])  # as the end of a run does
    # evaluation ran under accelerate's autocast wrapper, where oneDNN was off: bf16 matmuls 50x slower
    assert seen == {(True, True, True), (False, False, False)}


def _lm_examples(n: int) -> list[dict]:
    """Conversations whose trained (response) tokens differ in number, so a mean over tokens is not one over examples."""
    generator = torch.Generator().manual_seed(5)
    examples = []
    for i in range(n):
        prompt, response = 2 + i % 3, 1 + (i * 5) % 7
        ids = torch.randint(3, 100, (prompt + response,), generator=generator).tolist()
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * prompt + ids[prompt:]})
    return examples


def _lm_run(run_dir: Path, accumulation: int, weight) -> dict:
    from conftest import tiny_llama
    from lorafit.data.chat import make_lm_collator
    from lorafit.fast.causal_loss import causal_loss

    torch.manual_seed(42)
    model = get_lora_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=4, lora_dropout=0.0,
                                                    target_modules=["q_proj", "v_proj"]))
    config = _steps_config(task="causal-lm", batch_size=4, epochs=1, eval_strategy="no", lora_dropout=0.0,
                           gradient_accumulation_steps=accumulation)
    run_dir.mkdir()
    with single_thread():
        run_training(model, _lm_examples(12), make_lm_collator(0), causal_loss, None, config, run_dir, weight=weight)
    return _final_weights(model)


def test_gradient_accumulation_weights_causal_lm_micro_batches_by_their_trained_tokens(tmp_path):
    def trained_tokens(example):  # causal_loss is a mean over the positions predicting a response token
        return sum(label != -100 for label in example["labels"][1:])

    whole = _lm_run(tmp_path / "whole", 1, trained_tokens)
    micro = _lm_run(tmp_path / "micro", 2, trained_tokens)
    assert max((whole[k] - micro[k]).abs().max().item() for k in whole) <= 1e-6
    by_examples = _lm_run(tmp_path / "by-examples", 2, lambda example: 1)  # what weighting by examples would give
    assert max((whole[k] - by_examples[k]).abs().max().item() for k in whole) > 1e-4
