"""Tests for the run directory: what `lorafit train` leaves behind, and the lorafit.run_dir helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lorafit.errors import LorafitError
from lorafit.run_dir import (append_metrics, load_adapter_info, model_card, plot_curves, prepare_run_dir,
                             read_metrics, replace_dir_atomically, rewrite_metrics, save_adapter_info)
from test_cli import (FIELDS, adapter_tensors, make_rows, read_jsonl, run_cli, tensors_equal,  # noqa: F401
                      tiny_bert_dir, trained_run, tiny_bert3_dir, write_rows)

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
        "README.md", "best", "checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8", "config.yaml",
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
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "best", "config.yaml", "curves.png", "metrics.jsonl"]
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

@pytest.mark.parametrize("marker", ["config.yaml", "metrics.jsonl", "best"])
def test_prepare_refuses_to_mix_two_runs(tmp_path, marker):
    (tmp_path / marker).mkdir() if marker == "best" else (tmp_path / marker).write_text("")
    with pytest.raises(LorafitError, match="already holds a run; pass --resume"):
        prepare_run_dir(tmp_path, resume=False)
    prepare_run_dir(tmp_path, resume=True)  # continuing it is fine


def test_prepare_fresh_and_unrelated_folders(tmp_path):
    target = tmp_path / "a" / "b"
    with pytest.raises(LorafitError, match="holds no run to resume"):
        prepare_run_dir(target, resume=True)
    assert not target.exists()
    prepare_run_dir(target, resume=False)
    assert target.is_dir()
    (target / "notes.txt").write_text("mine")  # a folder with other files is not a run
    prepare_run_dir(target, resume=False)
    with pytest.raises(LorafitError, match="holds no run to resume"):
        prepare_run_dir(target, resume=True)


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


def test_replace_dir_atomically(tmp_path):
    target = tmp_path / "best"
    replace_dir_atomically(target, lambda tmp: (tmp / "v").write_text("1"))
    replace_dir_atomically(target, lambda tmp: (tmp / "v").write_text("2"))
    assert (target / "v").read_text() == "2"

    def failing(tmp):
        (tmp / "v").write_text("3")
        raise OSError("disk full")

    with pytest.raises(OSError):
        replace_dir_atomically(target, failing)
    assert (target / "v").read_text() == "2"  # the old folder is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["best"]  # and no temporary is left


def test_adapter_info_round_trip(tmp_path):
    save_adapter_info(tmp_path, {"task": "classification", "id2label": {0: "neg", 1: "pos"}})
    assert load_adapter_info(tmp_path) == {"task": "classification", "id2label": {0: "neg", 1: "pos"}}
    assert load_adapter_info(tmp_path / "nothing-here") == {}


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
