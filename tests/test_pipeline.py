"""Tests for `lorafit train` (classification): data formats and sources, decoder classifiers, bad input,
length-grouped batching, and the offline quickstart."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
import yaml

from test_cli import (FAST, WORDS, assert_one_line_error, build_tiny_bert, build_tiny_decoder, copy_run,  # noqa: F401
                      make_rows, read_jsonl, run_cli, small_run, snapshot, tiny_bert3_dir, tiny_bert_dir, write_rows)


def train_cmd(model, train, out, validation=None, *extra) -> list:
    args = ["train", "--model", model, "--train-file", train, "--output-dir", out, *FAST]
    if validation is not None:
        args += ["--validation-file", validation]
    return args + list(extra)


def info(run_dir: Path) -> dict:
    return json.loads((run_dir / "best" / "lorafit.json").read_text(encoding="utf-8"))


def predict_lines(capsys, adapter: Path, *texts) -> list[list[str]]:
    code, out, err = run_cli(capsys, "predict", "--adapter", adapter, *texts)
    assert code == 0, err
    return [line.split("\t") for line in out.splitlines()]


# --- data formats and sources -----------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet", ""])
def test_every_file_format_trains(tmp_path, capsys, tiny_bert_dir, suffix):
    train = write_rows(tmp_path / f"train{suffix}", make_rows(16, seed=1))
    validation = write_rows(tmp_path / f"dev{suffix}", make_rows(8, seed=2))
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, *train_cmd(tiny_bert_dir, train, out, validation))
    assert code == 0, err
    assert info(out)["id2label"] == {"0": "neg", "1": "pos"}
    (record,) = read_jsonl(out / "metrics.jsonl")  # 16 rows / batch 8 = 2 steps, evaluated once
    assert record["step"] == 2 and 0 <= record["accuracy"] <= 1
    assert sum(map(sum, record["confusion_matrix"])) == 8  # every validation row was scored
    assert f"Adapter saved to {out / 'best'}" in stdout


def test_format_choice_does_not_change_the_result(tmp_path, capsys, tiny_bert_dir):
    """The same rows as CSV and as Parquet train to the same adapter."""
    runs = []
    for suffix in (".csv", ".parquet"):
        train = write_rows(tmp_path / f"train{suffix}", make_rows(16, seed=1))
        out = tmp_path / f"run{suffix}"
        code, _, err = run_cli(capsys, *train_cmd(tiny_bert_dir, train, out))
        assert code == 0, err
        runs.append(out)
    from test_cli import adapter_tensors, tensors_equal

    assert tensors_equal(adapter_tensors(runs[0] / "best"), adapter_tensors(runs[1] / "best"))


def test_string_labels_are_stored_and_predicted_by_name(capsys, small_run):
    assert info(small_run.dir)["id2label"] == {"0": "neg", "1": "pos"}
    lines = predict_lines(capsys, small_run.best, "a great lovely film", "an awful dull plot")
    assert len(lines) == 2
    for (label, probability, text), expected_text in zip(lines, ["a great lovely film", "an awful dull plot"]):
        assert label in {"neg", "pos"}
        assert 0.5 <= float(probability) <= 1.0  # the predicted class is the most probable of two
        assert text == expected_text


def test_integer_labels(tmp_path, capsys, tiny_bert_dir):
    rows = [{"text": r["text"], "label": {"neg": 0, "pos": 1}[r["label"]]} for r in make_rows(16, seed=1)]
    train = write_rows(tmp_path / "train.csv", rows)
    validation = write_rows(tmp_path / "dev.csv", rows[:6])
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, *train_cmd(tiny_bert_dir, train, out, validation, "--test-file", validation))
    assert code == 0, err
    assert info(out)["id2label"] == {"0": "0", "1": "1"}
    # the test file is scored once, at the end, with the best adapter: here the same rows as validation
    summary = dict(line.split(": ", 1) for line in stdout.splitlines() if line.startswith(("test_", "validation_")))
    assert summary["test_accuracy"] == summary["validation_accuracy"] and summary["test_loss"] == summary["validation_loss"]
    assert f"| test_accuracy | {float(summary['test_accuracy']):.4f} |" in (out / "README.md").read_text()
    assert read_jsonl(out / "metrics.jsonl")[0]["per_class"].keys() == {"0", "1"}
    assert {line[0] for line in predict_lines(capsys, out / "best", "good", "bad film")} <= {"0", "1"}
    code, _, err = run_cli(capsys, "eval", "--adapter", out / "best", "--data", validation, "--json")
    assert code == 0, err


def test_text_pair_column(tmp_path, capsys, tiny_bert_dir):
    rows = [{"premise": r["text"], "hypothesis": "the film was " + ("good" if i % 3 else "bad"), "label": r["label"]}
            for i, r in enumerate(make_rows(16, seed=7))]
    train = write_rows(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_cmd(tiny_bert_dir, train, out, train, "--text-column", "premise",
                                              "--text-pair-column", "hypothesis"))
    assert code == 0, err
    saved = info(out)
    assert (saved["text_column"], saved["text_pair_column"]) == ("premise", "hypothesis")
    # eval reads both columns as in training: a file without the second one is refused
    code, _, err = run_cli(capsys, "eval", "--adapter", out / "best", "--data", train)
    assert code == 0, err
    single = write_rows(tmp_path / "single.jsonl", [{"premise": r["premise"], "label": r["label"]} for r in rows])
    code, _, err = run_cli(capsys, "eval", "--adapter", out / "best", "--data", single)
    assert_one_line_error(code, err, "no column 'hypothesis'", "premise, label")


def test_pair_inputs_change_the_prediction_inputs(tmp_path, capsys, tiny_bert_dir):
    """The pair column reaches the model: training with it gives another adapter than without it."""
    rows = [{"text": r["text"], "other": "plot twist " * (i % 4 + 1), "label": r["label"]}
            for i, r in enumerate(make_rows(16, seed=8))]
    train = write_rows(tmp_path / "train.jsonl", rows)
    from test_cli import adapter_tensors, tensors_equal

    code, _, _ = run_cli(capsys, *train_cmd(tiny_bert_dir, train, tmp_path / "a"))
    assert code == 0
    code, _, _ = run_cli(capsys, *train_cmd(tiny_bert_dir, train, tmp_path / "b", None, "--text-pair-column", "other"))
    assert code == 0
    assert not tensors_equal(adapter_tensors(tmp_path / "a" / "best"), adapter_tensors(tmp_path / "b" / "best"))


def test_hub_dataset_code_path(tmp_path, capsys, monkeypatch, tiny_bert_dir):
    features = datasets.Features({"sentence": datasets.Value("string"), "idx": datasets.Value("int32"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})

    def split(n, seed, hidden=False):
        rows = make_rows(n, seed=seed)
        labels = [-1 if hidden else int(r["label"] == "pos") for r in rows]
        return datasets.Dataset.from_dict({"sentence": [r["text"] for r in rows], "idx": list(range(n)),
                                           "label": labels}, features=features)

    calls = []

    def fake_load_dataset(name, config=None, *args, **kwargs):
        calls.append((name, config))
        # as GLUE on the hub: the test split's labels are hidden (-1)
        return datasets.DatasetDict({"train": split(16, 1), "validation": split(8, 2), "test": split(4, 3, True)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "--model", tiny_bert_dir, "--dataset", "glue", "--dataset-config",
                                "sst2", "--text-column", "sentence", "--output-dir", out, *FAST)
    assert code == 0, err
    assert calls == [("glue", "sst2")]
    assert info(out)["id2label"] == {"0": "negative", "1": "positive"}  # names from the ClassLabel feature
    assert len(read_jsonl(out / "metrics.jsonl")) == 1  # the validation split was used
    assert "glue" in (out / "README.md").read_text(encoding="utf-8")
    assert "Untrained model predictions" in stdout  # a sentiment classifier shows the example sentences


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoder_model_as_classifier(tmp_path_factory, tmp_path, capsys, kind):
    """GPT-2/Llama classifiers with a tokenizer lacking a pad token: padded batches of mixed lengths work."""
    from lorafit.tasks.classification import predict_texts
    from lorafit.inference.loading import load_adapter_for_inference

    model_dir = build_tiny_decoder(tmp_path_factory.mktemp(kind), kind)
    from transformers import AutoConfig, AutoTokenizer

    assert AutoTokenizer.from_pretrained(model_dir).pad_token is None
    assert AutoConfig.from_pretrained(model_dir).pad_token_id is None
    train = write_rows(tmp_path / "train.jsonl", make_rows(16, seed=9))  # 1 to 11 words: ragged batches
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_cmd(model_dir, train, out, train, "--no-group-by-length",
                                              "--batch-size", "4", "--lr", "0.01"))
    assert code == 0, err
    losses = [r["train_loss"] for r in read_jsonl(out / "metrics.jsonl")]
    assert len(losses) == 1 and losses[0] == losses[0]  # finite, not NaN

    loaded = load_adapter_for_inference(out / "best")
    assert loaded.tokenizer.pad_token == "</s>"
    assert loaded.model.config.pad_token_id == loaded.tokenizer.pad_token_id == 1
    texts = ["great", "the movie was really quite awful and the plot dull", "lovely film"]
    together = predict_texts(loaded.model, loaded.tokenizer, texts, max_length=32)
    alone = torch.cat([predict_texts(loaded.model, loaded.tokenizer, [t], max_length=32) for t in texts])
    # the score is read at each row's last real token, not at padding
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("targets, adapted", [
    # all-linear: every linear layer but the classification head (PEFT's meaning of the keyword)
    (["all-linear"], {"attention.self.query", "attention.self.key", "attention.self.value",
                      "attention.output.dense", "intermediate.dense", "output.dense", "pooler.dense"}),
    (["key"], {"attention.self.key"}),
    (["query", "output.dense"], {"attention.self.query", "attention.output.dense", "output.dense"}),
])
def test_target_modules(tmp_path, capsys, small_run, targets, adapted):
    import re

    from test_cli import adapter_tensors

    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_cmd(small_run.model, small_run.train, out, None, "--max-steps", "1",
                                              "--target-modules", *targets))
    assert code == 0, err
    modules = {re.sub(r"^base_model\.model\.bert\.(encoder\.layer\.\d+\.)?", "", k).removesuffix(".lora_A.weight")
               for k in adapter_tensors(out / "best") if k.endswith(".lora_A.weight")}
    assert modules == adapted


# --- length grouping ---------------------------------------------------------------------------------

def test_group_by_length_on_and_off_both_train(tmp_path, capsys, tiny_bert_dir):
    train = write_rows(tmp_path / "train.jsonl", make_rows(32, seed=10))
    losses = {}
    for flag in ("--group-by-length", "--no-group-by-length"):
        out = tmp_path / flag.strip("-")
        code, _, err = run_cli(capsys, *train_cmd(tiny_bert_dir, train, out, None, flag, "--batch-size", "4",
                                                  "--max-steps", "4"))
        assert code == 0, err
        saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
        assert saved["group_by_length"] is (flag == "--group-by-length")
        (record,) = read_jsonl(out / "metrics.jsonl")
        assert record["step"] == 4
        losses[flag] = record["train_loss"]
    assert losses["--group-by-length"] != losses["--no-group-by-length"]  # other batches, other losses


# --- bad input ---------------------------------------------------------------------------------------

def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


BAD_INPUT = {
    # name: (files to write {name: content or rows}, extra args with {placeholders}, message fragments)
    "missing train file": ({}, ["--train-file", "{tmp}/nope.csv"], ["train file", "nope.csv", "does not exist"]),
    "missing validation file": ({}, ["--validation-file", "{tmp}/nope.jsonl"], ["validation file", "does not exist"]),
    "missing column": ({}, ["--text-column", "review"],
                       ["no column 'review'", "columns found: text, label", "--text-column text"]),
    "missing label column": ({}, ["--label-column", "sentiment"], ["no column 'sentiment'", "columns found: text, label"]),
    "empty validation split": ({"dev.csv": "text,label\n"}, ["--validation-file", "{tmp}/dev.csv"],
                               ["validation file 'dev.csv' has no rows"]),
    "empty train split": ({"train.csv": "text,label\n"}, ["--train-file", "{tmp}/train.csv"],
                          ["training file 'train.csv' has no rows"]),
    "empty train file": ({"train.jsonl": ""}, ["--train-file", "{tmp}/train.jsonl"],
                         ["training file 'train.jsonl' has no rows"]),
    "unseen validation label": ({"dev.jsonl": [{"text": "meh", "label": "meh"}, {"text": "good", "label": "pos"}]},
                                ["--validation-file", "{tmp}/dev.jsonl"],
                                ["validation label 'meh' (row 1) never occurs in the training data", "neg, pos"]),
    "empty text": ({"dev.jsonl": [{"text": "good", "label": "pos"}, {"text": "  ", "label": "neg"}]},
                   ["--validation-file", "{tmp}/dev.jsonl"], ["row 2", "empty text in column 'text'"]),
    "null text": ({"train.jsonl": [{"text": None, "label": "pos"}, {"text": "bad", "label": "neg"}]},
                  ["--train-file", "{tmp}/train.jsonl"], ["row 1", "empty text"]),
    "missing label": ({"train.csv": "text,label\ngood,pos\nbad,\nfine,neg\n"}, ["--train-file", "{tmp}/train.csv"],
                      ["row 2", "no label"]),
    "one label only": ({"train.csv": "text,label\ngood,pos\ngreat,pos\n"}, ["--train-file", "{tmp}/train.csv"],
                       ["only one distinct label"]),
    "unknown model directory": ({}, ["--model", "{tmp}/no-such-model"], ["no-such-model", "does not exist"]),
    "model directory without a model": ({}, ["--model", "{tmp}/tokenizer-only"], ["tokenizer-only", "could not be loaded"]),
    "unknown target module": ({}, ["--target-modules", "no_such_layer"], ["no_such_layer"]),
    "max length too small": ({}, ["--max-length", "2"], ["--max-length 2 leaves no room"]),
    "r 0": ({}, ["--r", "0"], ["--r must be a positive integer"]),
    "negative lr": ({}, ["--lr", "-1"], ["--lr must be a number > 0"]),
    "dropout 1.5": ({}, ["--lora-dropout", "1.5"], ["--lora-dropout must be in [0, 1)"]),
    "unsupported file type": ({"train.xlsx": "x"}, ["--train-file", "{tmp}/train.xlsx"], ["unsupported file type"]),
}


@pytest.fixture
def existing_run(tmp_path, small_run):
    """A copy of a finished run, and its bytes, to check that failing commands leave it alone."""
    run = copy_run(small_run, tmp_path / "existing")
    return run, snapshot(run)


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_leaves_the_run_alone(tmp_path, capsys, small_run, existing_run, case):
    files, extra, fragments = BAD_INPUT[case]
    for name, content in files.items():
        if isinstance(content, list):
            write_rows(tmp_path / name, content)
        else:
            _write(tmp_path / name, content)
    if case == "model directory without a model":
        from test_cli import minilm_tokenizer

        minilm_tokenizer().save_pretrained(tmp_path / "tokenizer-only")
    run, before = existing_run
    args = ["train", "--model", small_run.model, "--train-file", small_run.train,
            "--validation-file", small_run.validation, *FAST]
    args += [a.replace("{tmp}", str(tmp_path)) for a in extra]
    # --resume: had the input passed its checks, this would go on writing into the finished run
    code, out, err = run_cli(capsys, *args, "--output-dir", run, "--resume")
    assert_one_line_error(code, err, *fragments)
    assert out == ""
    assert snapshot(run) == before
    # a fresh output directory is not even created
    code, out, err = run_cli(capsys, *args, "--output-dir", tmp_path / "fresh")
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "fresh").exists()


def test_unknown_hub_model_offline(tmp_path, capsys, monkeypatch, small_run, existing_run):
    from lorafit.inference import base_models as models

    monkeypatch.setattr(models, "_hub_reachable", lambda: False)
    run, before = existing_run
    code, out, err = run_cli(capsys, "train", "--model", "no-such-org/no-such-model", "--train-file", small_run.train,
                             "--output-dir", run, "--resume", *FAST)
    assert_one_line_error(code, err, "no-such-org/no-such-model", "offline?")
    assert snapshot(run) == before


def test_output_dir_holding_a_run_needs_resume(capsys, small_run, existing_run):
    run, before = existing_run
    code, out, err = run_cli(capsys, *train_cmd(small_run.model, small_run.train, run))
    assert_one_line_error(code, err, "already holds a run", "--resume")
    assert out == ""
    assert snapshot(run) == before


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_resume_without_a_run(tmp_path, capsys, small_run, state):
    out = tmp_path / "out"
    if state == "empty":
        out.mkdir()
    code, stdout, err = run_cli(capsys, *train_cmd(small_run.model, small_run.train, out), "--resume")
    assert_one_line_error(code, err, "holds no run to resume")
    assert stdout == ""
    assert out.exists() == (state == "empty")
    assert snapshot(out) == {}


def test_bad_input_in_a_real_process(tmp_path):
    """The same contract seen from a shell: no warnings, no traceback, one line, exit code 2."""
    result = subprocess.run([sys.executable, "-m", "lorafit", "train", "--train-file", str(tmp_path / "nope.csv"),
                             "--output-dir", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("lorafit train: error: train file")
    assert not (tmp_path / "out").exists()


def test_training_starts_by_saying_what_was_loaded(tmp_path, capsys, tiny_bert3_dir):
    """Examples per split and each split's label counts, before the model's numbers: a file read wrongly
    (a shifted column, a label missing from a split) shows at once."""
    labels = ("neg", "neu", "pos")
    train = write_rows(tmp_path / "train.csv", make_rows(12, labels, seed=1))  # 4 of each
    validation = write_rows(tmp_path / "dev.jsonl", make_rows(5, labels, seed=2))  # neg, neu, pos, neg, neu
    test = write_rows(tmp_path / "test.jsonl", make_rows(2, ("neg", "pos"), seed=3))
    code, out, err = run_cli(capsys, *train_cmd(tiny_bert3_dir, train, tmp_path / "run", validation,
                                                "--test-file", test, "--max-steps", "1"))
    assert code == 0, err
    summary = out[:out.index("trainable params")]
    assert f"train: `{train}`" in summary and f"validation: `{validation}`" in summary
    assert "  train: 12 examples (neg 4, neu 4, pos 4)\n" in summary
    assert "  validation: 5 examples (neg 2, neu 2, pos 1)\n" in summary
    assert "  test: 2 examples (neg 1, neu 0, pos 1)\n" in summary
    assert "  3 labels: neg, neu, pos\n" in summary


def test_base_classifier_with_another_label_count(tmp_path, capsys, tiny_bert_dir):
    train = write_rows(tmp_path / "train.jsonl", make_rows(12, ("neg", "neu", "pos"), seed=11))
    code, _, err = run_cli(capsys, *train_cmd(tiny_bert_dir, train, tmp_path / "run"))  # 2-label base, 3 classes
    assert code == 0, err


# --- the quickstart ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_quickstart_with_no_arguments(tmp_path, capsys, monkeypatch):
    """`lorafit train` alone: MiniLM on the built-in sentiment set, offline, >= 85% validation accuracy."""
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    code, out, err = run_cli(capsys, "train")
    seconds = time.perf_counter() - started
    assert code == 0, err
    (run,) = (tmp_path / "lorafit-runs").iterdir()
    assert run.name.startswith("classification-minilm-")
    assert "trainable params:" in out and "|| all params:" in out
    assert out.index("Untrained model predictions") < out.index("Epoch") < out.index("Trained model predictions")
    table = out.split("Validation Loss", 1)[1].split("Trained model predictions")[0]
    epoch_rows = [line.split() for line in table.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in epoch_rows] == ["1.00", "2.00", "3.00"]
    assert f"Adapter saved to {Path('lorafit-runs') / run.name / 'best'}" in out
    records = read_jsonl(run / "metrics.jsonl")
    assert len(records) == 3
    best = max(r["accuracy"] for r in records)
    assert best >= 0.85, records
    final = float(out.split("validation_accuracy:")[1].split()[0])
    assert final == best  # the best adapter was restored for the final evaluation
    print(f"quickstart: {seconds:.0f} s, final validation accuracy {final:.4f}")  # shown with -rP
