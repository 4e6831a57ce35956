"""Tests for the run directory: what `lorafit train` leaves behind, and the lorafit.training.run_dir helpers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorafit.errors import LorafitError
from lorafit.training.checkpoint import STATE_NAME
from lorafit.training.run_dir import (append_metrics, lock_run_dir, model_card, plot_curves,
                                     prepare_run_dir, read_metrics, recover_run_dir, release_run_dirs,
                                     rewrite_metrics)
from lorafit.training.settings import TrainConfig
from test_cli import (FAST, FIELDS, adapter_tensors, assert_one_line_error, make_rows, read_jsonl,  # noqa: F401
                      run_cli, small_run, snapshot, tensors_equal, tiny_bert_dir, trained_run, tiny_bert3_dir,
                      write_rows)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHECKPOINT_FILES = {"adapter", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"}


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE and raw[12:16] == b"IHDR"
    return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")


# --- a run folder made by the command line --------------------------------------------------------------

@pytest.fixture(scope="module")
def steps_run(tmp_path_factory, tiny_bert_dir):
    """Evaluated and saved every 2 steps, every checkpoint kept: 32 rows, batch 8, 2 epochs = 8 steps."""
    root = tmp_path_factory.mktemp("steps_run")
    train = write_rows(root / "train.csv", make_rows(32, seed=31))
    validation = write_rows(root / "dev.jsonl", make_rows(10, seed=32))
    from test_cli import single_thread
    from lorafit.cli import main

    with single_thread():
        code = main(["train", "--model", str(tiny_bert_dir), "--train-file", str(train), "--validation-file",
                     str(validation), "--output-dir", str(root / "run"), "--max-length", "32", "--batch-size", "8",
                     "--epochs", "2", "--lr", "0.02", "--eval-strategy", "steps", "--eval-steps", "2",
                     "--keep-checkpoints", "50", "--metric", "loss", "--r", "4"])
    assert code == 0
    return root / "run", train, validation


def test_run_folder_layout(steps_run):
    run, _, _ = steps_run
    assert sorted(p.name for p in run.iterdir()) == [
        ".lorafit.lock", "README.md", "best", "checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8", "config.yaml",
        "curves.png", "metrics.jsonl"]
    for step in (2, 4, 6, 8):
        checkpoint = run / f"checkpoint-{step}"
        assert {p.name for p in checkpoint.iterdir()} == CHECKPOINT_FILES
        assert {p.name for p in (checkpoint / "adapter").iterdir()} == {"adapter_config.json",
                                                                       "adapter_model.safetensors"}
        assert json.loads((checkpoint / "trainer_state.json").read_text())["state"]["step"] == step
    assert {p.name for p in (run / "best").iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                         "lorafit.json", "tokenizer"}


def test_config_yaml_records_the_run(steps_run):
    run, train, validation = steps_run
    saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert set(saved) == set(FIELDS)
    assert (saved["train_file"], saved["validation_file"]) == (str(train), str(validation))
    assert (saved["eval_strategy"], saved["eval_steps"], saved["save_strategy"], saved["save_steps"]) == \
        ("steps", 2, "steps", 2)
    assert (saved["r"], saved["lr"], saved["metric"], saved["keep_checkpoints"]) == (4, 0.02, "loss", 50)


def test_metrics_jsonl_has_one_line_per_evaluation(steps_run):
    run, _, _ = steps_run
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert [r["epoch"] for r in records] == [0.5, 1.0, 1.5, 2.0]
    for record in records:
        assert {"train_loss", "loss", "accuracy", "f1", "per_class", "confusion_matrix"} <= set(record)
        assert sum(map(sum, record["confusion_matrix"])) == 10


def test_run_without_evaluations(tmp_path, capsys, tiny_bert_dir):
    """--eval-strategy no: no checkpoints (saving follows evaluation), best/ is the final adapter,
    the log has the final training loss, and the validation file is still scored once at the end."""
    train = write_rows(tmp_path / "train.jsonl", make_rows(16, seed=33))
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "--model", tiny_bert_dir, "--train-file", train,
                                "--validation-file", train, "--output-dir", out, "--max-length", "32",
                                "--batch-size", "8", "--epochs", "1", "--eval-strategy", "no")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".lorafit.lock", "README.md", "best", "config.yaml", "curves.png",
                                                     "metrics.jsonl"]
    (record,) = read_jsonl(out / "metrics.jsonl")
    assert set(record) == {"step", "epoch", "train_loss"} and record["step"] == 2
    assert "validation_accuracy: " in stdout
    assert json.loads((out / "best" / "lorafit.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}


def test_epoch_strategy_logs_one_line_per_epoch(trained_run):
    records = read_jsonl(trained_run.dir / "metrics.jsonl")
    assert [(r["step"], r["epoch"]) for r in records] == [(12, 1.0), (24, 2.0), (36, 3.0), (48, 4.0)]


def test_best_holds_the_adapter_with_the_best_recorded_metric(steps_run):
    run, _, _ = steps_run
    records = read_jsonl(run / "metrics.jsonl")
    lowest = min(r["loss"] for r in records)
    best_step = next(r["step"] for r in records if r["loss"] == lowest)  # the first of equals is kept
    best = adapter_tensors(run / "best")
    matching = [step for step in (2, 4, 6, 8) if tensors_equal(adapter_tensors(run / f"checkpoint-{step}" / "adapter"), best)]
    assert matching == [best_step]
    state = json.loads((run / "checkpoint-8" / "trainer_state.json").read_text())["state"]
    assert (state["best_step"], state["best_metric"]) == (best_step, lowest)


def test_best_carries_labels_and_settings_for_the_other_commands(steps_run):
    run, _, _ = steps_run
    info = json.loads((run / "best" / "lorafit.json").read_text())
    assert info["id2label"] == {"0": "neg", "1": "pos"}
    assert info["task"] == "classification"
    assert (info["max_length"], info["text_column"], info["label_column"]) == (32, "text", "label")
    assert (run / "best" / "tokenizer" / "tokenizer.json").is_file()
    config = json.loads((run / "best" / "adapter_config.json").read_text())
    assert (config["r"], config["task_type"], config["peft_type"]) == (4, "SEQ_CLS", "LORA")


def test_curves_png(steps_run):
    run, _, _ = steps_run
    width, height = _png_size(run / "curves.png")
    assert width >= 400 and height >= 200


def test_model_card(steps_run, tiny_bert_dir):
    run, train, validation = steps_run
    card = (run / "README.md").read_text(encoding="utf-8")
    assert f"Base model: `{tiny_bert_dir}`" in card
    assert str(train) in card and str(validation) in card  # the data
    hyper = card.split("## Hyperparameters")[1]
    for row in ("| r | 4 |", "| lr | 0.02 |", "| lora_alpha | 16 |", "| batch_size | 8 |", "| epochs | 2.0 |"):
        assert row in hyper, row
    metrics = card.split("## Final metrics")[1].split("##")[0]
    record = min(read_jsonl(run / "metrics.jsonl"), key=lambda r: r["loss"])
    assert f"| validation_loss | {record['loss']:.4f} |" in metrics  # the best adapter's scores
    assert f"| validation_accuracy | {record['accuracy']:.4f} |" in metrics
    assert "Trained with [lorafit]" in card
    assert f'LoraModel.from_pretrained(base, "{run / "best"}")' in card
    assert f'PeftModel.from_pretrained(base, "{run / "best"}")' in card
    assert "AutoModelForSequenceClassification" in card


# --- helpers ------------------------------------------------------------------------------------------

def _prepared(path: Path, **settings) -> Path:
    """A run folder as `lorafit train` leaves it once its checks passed (config.yaml and the lock file)."""
    prepare_run_dir(path, TrainConfig(output_dir=str(path), **settings).resolved())
    release_run_dirs()
    return path


def _resume(path: Path, **settings) -> None:
    try:
        prepare_run_dir(path, TrainConfig(output_dir=str(path), resume=True, **settings).resolved())
    finally:
        release_run_dirs()


def _checkpoint(run: Path, step: int) -> None:
    (run / f"checkpoint-{step}" / "adapter").mkdir(parents=True)
    (run / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")


@pytest.mark.parametrize("marker", ["metrics.jsonl", "best"])
def test_prepare_refuses_to_mix_two_runs(tmp_path, marker):
    run = _prepared(tmp_path / "run")
    (run / marker).mkdir() if marker == "best" else (run / marker).write_text("")
    _checkpoint(run, 2)
    before = snapshot(run)
    with pytest.raises(LorafitError, match="already holds a run; pass --resume"):
        prepare_run_dir(run, TrainConfig(output_dir=str(run)).resolved())
    assert snapshot(run) == before
    _resume(run)  # continuing it is fine
    assert snapshot(run)["config.yaml"] == before["config.yaml"]


def test_prepare_fresh_and_empty_folders(tmp_path):
    target = tmp_path / "a" / "b"
    with pytest.raises(LorafitError, match="holds no run to resume"):
        _resume(target)
    assert not target.exists()
    _prepared(target)
    assert yaml.safe_load((target / "config.yaml").read_text())["output_dir"] == str(target)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LorafitError, match="holds no run to resume"):
        _resume(empty)
    assert sorted(p.name for p in _prepared(empty).iterdir()) == [".lorafit.lock", "config.yaml"]


@pytest.mark.parametrize("files", [
    {"README.md": "my notes", "curves.png": "my plot"},
    {"checkpoint-1/trainer_state.json": "{}", "checkpoint-1/optimizer.pt": "x"},  # a transformers Trainer's run
    {"config.yaml": "learning_rate: 0.1\n"},  # someone else's config.yaml
])
def test_folders_lorafit_did_not_make_are_refused(tmp_path, files):
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    before = snapshot(tmp_path)
    for resume in (False, True):
        with pytest.raises(LorafitError, match="is not empty and was not made by lorafit; pass a new or empty"):
            prepare_run_dir(tmp_path, TrainConfig(output_dir=str(tmp_path), resume=resume).resolved())
    assert snapshot(tmp_path) == before


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(LorafitError, match="'.*out' is a file; pass a folder"):
        _prepared(tmp_path / "out")
    assert (tmp_path / "out").read_text() == "mine"


def test_resume_refuses_settings_that_change_the_result(tmp_path):
    run = _prepared(tmp_path / "run", model="tiny", lr=0.01, seed=3)
    _checkpoint(run, 2)
    before = snapshot(run)
    with pytest.raises(LorafitError) as raised:
        _resume(run, model="other", lr=0.01, seed=4, r=16)
    message = str(raised.value)
    assert "model (saved 'tiny', now 'other')" in message and "seed (saved 3, now 4)" in message
    assert "r (saved 8, now 16)" in message and "lr" not in message
    assert "another --output-dir" in message
    assert snapshot(run) == before
    # where checkpoints go and how memory is spent may change
    _resume(run, model="tiny", lr=0.01, seed=3, keep_checkpoints=9, save_strategy="steps", gradient_checkpointing=True)
    assert snapshot(run)["config.yaml"] == before["config.yaml"]


def test_resume_of_a_complete_run_or_one_without_a_checkpoint_is_refused(tmp_path):
    run = _prepared(tmp_path / "run")
    (run / "best").mkdir()
    (run / "best" / "adapter_config.json").write_text("{}")
    before = snapshot(run)
    with pytest.raises(LorafitError, match="has no checkpoint to continue from, and starting over would replace "
                                           "its best/; to start over, pass another --output-dir"):
        _resume(run)
    _checkpoint(run, 4)
    (run / "best" / "lorafit.json").write_text("{}")  # written once training has ended
    _resume(run)  # stopped before the model card: resuming from the last checkpoint writes the rest
    (run / "README.md").write_text("card")  # the last file a run writes
    before = snapshot(run)
    with pytest.raises(LorafitError, match="is complete .*; to train again, pass another --output-dir"):
        _resume(run)
    assert snapshot(run) == before
    fresh = _prepared(tmp_path / "fresh")  # no checkpoint and no best/: resuming starts from step 0
    _resume(fresh)


def test_metrics_append_read_rewrite(tmp_path):
    assert read_metrics(tmp_path) == []
    append_metrics(tmp_path, {"step": 1, "loss": 0.5})
    append_metrics(tmp_path, {"step": 2, "loss": 0.25})
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == ['{"step": 1, "loss": 0.5}',
                                                                     '{"step": 2, "loss": 0.25}']
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    rewrite_metrics(tmp_path, [{"step": 1, "loss": 0.5}])
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_recover_run_dir_clears_every_leftover_and_puts_back_set_aside_folders(tmp_path):
    (tmp_path / ".checkpoint-4.x1.tmp" / "adapter").mkdir(parents=True)  # checkpoints being built
    (tmp_path / ".checkpoint-6.x2.tmp").mkdir()
    (tmp_path / ".best.k2j3.tmp").mkdir()  # best/ being built
    (tmp_path / ".checkpoint-8.old").mkdir()  # set aside, its replacement never arrived: put back
    (tmp_path / ".checkpoint-8.old" / STATE_NAME).write_text("8")
    (tmp_path / ".best.old").mkdir()  # set aside, but best/ was replaced: dropped
    for name in ("curves.png", "README.md", "config.yaml", "metrics.jsonl"):  # files being written (files.atomic_path)
        (tmp_path / f".{name}.a1b2c3.tmp").write_text("half")
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "best").mkdir()
    for name in (".gitignore", ".lorafit.lock", ".notes.old", "notes.tmp", ".notes.k2j3.tmp"):  # not a run's temporaries
        (tmp_path / name).write_text("keep")
    recover_run_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".gitignore", ".lorafit.lock", ".notes.k2j3.tmp", ".notes.old",
                                                          "best", "checkpoint-2", "checkpoint-8", "notes.tmp"]
    assert (tmp_path / "checkpoint-8" / STATE_NAME).read_text() == "8"


def test_plot_curves(tmp_path):
    history = [{"step": 2, "epoch": 1.0, "train_loss": 0.7, "loss": 0.69, "accuracy": 0.5},
               {"step": 4, "epoch": 2.0, "train_loss": 0.5, "loss": 0.55, "accuracy": 0.75}]
    path = plot_curves(tmp_path, history, "accuracy")
    assert path == tmp_path / "curves.png"
    assert _png_size(path) == (1000, 400)  # figsize 10 x 4 inches at 100 dpi
    assert plot_curves(tmp_path / "other", [], "accuracy") is None


def test_plot_curves_without_validation(tmp_path):
    history = [{"step": 2, "epoch": 1.0, "train_loss": 0.7}, {"step": 4, "epoch": 2.0, "train_loss": 0.5}]
    assert _png_size(plot_curves(tmp_path, history, "accuracy")) == (1000, 400)


def test_model_card_for_a_causal_lm(tmp_path):
    card = model_card(base_model="smollm2", data="chats.jsonl", config={"r": 8, "lr": None},
                      metrics={"validation_loss": 1.23456, "per_class": {}}, run_dir=tmp_path, task="causal-lm")
    assert "AutoModelForCausalLM" in card and "lorafit generate --adapter" in card
    assert "| validation_loss | 1.2346 |" in card
    assert "| r | 8 |" in card and "| lr |" not in card  # unset settings are left out
    assert "per_class" not in card


# --- the command line on run folders ---------------------------------------------------------------------

class Killed(BaseException):
    """Stands for a kill: nothing after it runs."""


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, tiny_bert_dir):
    """A run stopped during step 3 of 6, after checkpoint-2: (run folder, command without --output-dir)."""
    from lorafit.tasks import classification
    from lorafit.tasks.classification import classification_loss
    from lorafit.cli import main
    from test_cli import single_thread

    root = tmp_path_factory.mktemp("killed_run")
    train = write_rows(root / "train.jsonl", make_rows(24, seed=23))
    command = ["train", "--model", str(tiny_bert_dir), "--train-file", str(train), "--validation-file", str(train),
               "--max-length", "32", "--batch-size", "4", "--epochs", "1", "--eval-strategy", "steps",
               "--eval-steps", "2", "--lr", "0.01", "--r", "4"]
    calls = []

    def crash_at_3(model, batch):
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return classification_loss(model, batch)

    with pytest.MonkeyPatch.context() as patch, single_thread():
        patch.setattr(classification, "classification_loss", crash_at_3)
        with pytest.raises(Killed):
            main([*command, "--output-dir", str(root / "run")])
    assert (root / "run" / "checkpoint-2").is_dir() and not (root / "run" / "checkpoint-4").exists()
    return root / "run", command


def test_resume_with_another_model_changes_nothing_and_a_plain_resume_still_works(tmp_path, capsys, killed_run,
                                                                                 tiny_bert3_dir):
    run = tmp_path / "run"
    shutil.copytree(killed_run[0], run)
    before = snapshot(run)
    code, out, err = run_cli(capsys, "train", "--output-dir", run, "--resume", "--model", tiny_bert3_dir,
                             "--lr", "0.5")
    assert_one_line_error(code, err, "model (saved ", f"now '{tiny_bert3_dir}')", "lr (saved 0.01, now 0.5)",
                          "another --output-dir")
    assert snapshot(run) == before
    code, out, err = run_cli(capsys, "train", "--output-dir", run, "--resume")
    assert code == 0, err
    assert "Resuming from checkpoint-2 (step 2 of 6)" in out


def test_resume_of_a_finished_run_says_it_is_complete(tmp_path, capsys, small_run):
    run = tmp_path / "run"
    shutil.copytree(small_run.dir, run)
    before = snapshot(run)
    code, out, err = run_cli(capsys, *small_run.args[:-len(FAST) - 2], *FAST, "--output-dir", run, "--resume")
    assert_one_line_error(code, err, f"the run in '{run}' is complete", "pass another --output-dir")
    assert snapshot(run) == before


def test_train_into_a_folder_lorafit_did_not_make(tmp_path, capsys, killed_run):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "curves.png").write_bytes(b"my plot")
    code, _, err = run_cli(capsys, *killed_run[1], "--output-dir", out)
    assert_one_line_error(code, err, f"'{out}' is not empty and was not made by lorafit")
    assert snapshot(out) == {"README.md": b"my notes", "curves.png": b"my plot"}


def test_resume_into_a_folder_holding_someone_elses_config_yaml(tmp_path, capsys, killed_run):
    """Its config.yaml is not read as lorafit settings ("unknown setting(s)"): the folder is named as not lorafit's."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("learning_rate: 0.1\n")
    code, _, err = run_cli(capsys, *killed_run[1], "--output-dir", out, "--resume")
    assert_one_line_error(code, err, f"'{out}' is not empty and was not made by lorafit")
    assert snapshot(out) == {"config.yaml": b"learning_rate: 0.1\n"}


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path, killed_run):
    """Two real processes: one holds the run folder, a `lorafit train --resume` on it is refused."""
    run = tmp_path / "run"
    shutil.copytree(killed_run[0], run)
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                               "from lorafit.training.run_dir import lock_run_dir; lock_run_dir(Path(sys.argv[1])); "
                               "print('locked', flush=True); sys.stdin.read()", str(run)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        before = snapshot(run)
        second = subprocess.run([sys.executable, "-m", "lorafit", "train", "--output-dir", str(run), "--resume"],
                                capture_output=True, text=True, timeout=300)
    finally:
        holder.communicate("", timeout=60)
    assert second.returncode == 2, second.stderr
    assert second.stderr == (f"lorafit train: error: run folder '{run}' is in use by another lorafit process "
                             f"(pid {holder.pid}); wait for it to end or stop it\n")
    assert snapshot(run) == before and second.stdout == ""


def test_a_lock_that_fails_for_another_reason_closes_its_file(tmp_path, monkeypatch):
    """ENOLCK (a network file system) is raised as it is, and the lock file's descriptor is not leaked."""
    import errno
    import fcntl
    import os

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError) as excinfo:
        lock_run_dir(tmp_path)
    assert excinfo.value.errno == errno.ENOLCK
    assert set(os.listdir("/proc/self/fd")) == before
