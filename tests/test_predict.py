"""Tests for `lorafit predict`: texts on the command line, files in and out, errors."""

from __future__ import annotations

import json

import pytest
import torch

from test_cli import (assert_one_line_error, make_rows, read_jsonl, run_cli, snapshot, tiny_bert3_dir,  # noqa: F401
                      tiny_bert_dir, trained_run, write_rows)

NAMES = ["neg", "neu", "pos"]
TEXTS = ["a great and lovely film", "the plot was dull", "an okay movie", "terrible"]


def test_texts_print_label_probability_and_text(capsys, trained_run):
    code, out, err = run_cli(capsys, "predict", "--adapter", trained_run.best, *TEXTS)
    assert code == 0, err
    lines = [line.split("\t") for line in out.splitlines()]
    assert [line[2] for line in lines] == TEXTS
    for label, probability, _ in lines:
        assert label in NAMES
        assert 1 / 3 <= float(probability) <= 1  # the winner of three classes


def test_output_file_has_labels_and_probabilities_summing_to_one(tmp_path, capsys, trained_run):
    source = write_rows(tmp_path / "texts.csv", [{"id": i, "review": t} for i, t in enumerate(TEXTS)])
    output = tmp_path / "out" / "predictions.jsonl"
    code, out, err = run_cli(capsys, "predict", "--adapter", trained_run.best, "--input", source,
                             "--text-column", "review", "--output", output)
    assert code == 0, err
    assert out == f"wrote 4 predictions to {output}\n"
    rows = read_jsonl(output)
    assert [r["text"] for r in rows] == TEXTS
    for row in rows:
        assert set(row) == {"text", "label", "probabilities"}
        assert list(row["probabilities"]) == NAMES
        assert sum(row["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
    # the file says what printing says
    code, printed, _ = run_cli(capsys, "predict", "--adapter", trained_run.best, *TEXTS)
    assert [line.split("\t")[:2] for line in printed.splitlines()] == \
        [[r["label"], f"{r['probabilities'][r['label']]:.4f}"] for r in rows]


def test_input_uses_the_training_text_column_by_default(tmp_path, capsys, trained_run):
    source = write_rows(tmp_path / "texts.jsonl", [{"text": t} for t in TEXTS])
    output = tmp_path / "p.jsonl"
    code, _, err = run_cli(capsys, "predict", "--adapter", trained_run.best, "--input", source, "--output", output)
    assert code == 0, err
    assert len(read_jsonl(output)) == 4


def test_probabilities_do_not_depend_on_batching(tmp_path, capsys, trained_run):
    """Padding a short text next to a long one must not change its scores."""
    texts = ["good", "the movie was really quite awful and the plot and the acting dull", "fine", "lovely story"]
    results = []
    for batch_size in ("1", "64"):
        output = tmp_path / f"b{batch_size}.jsonl"
        code, _, err = run_cli(capsys, "predict", "--adapter", trained_run.best, "--batch-size", batch_size,
                               "--output", output, *texts)
        assert code == 0, err
        results.append(torch.tensor([list(r["probabilities"].values()) for r in read_jsonl(output)]))
    assert torch.allclose(results[0], results[1], atol=2e-6)


def test_predictions_match_the_trained_model(capsys, trained_run):
    """predict loads base model + adapter exactly as training left them: its labels on the validation
    texts give the accuracy training recorded for best/."""
    rows = read_jsonl(trained_run.validation)
    code, out, err = run_cli(capsys, "predict", "--adapter", trained_run.best, *[r["text"] for r in rows])
    assert code == 0, err
    predicted = [line.split("\t")[0] for line in out.splitlines()]
    accuracy = sum(p == r["label"] for p, r in zip(predicted, rows)) / len(rows)
    best = max(r["accuracy"] for r in read_jsonl(trained_run.dir / "metrics.jsonl"))
    assert accuracy == pytest.approx(best, abs=1e-6)


def test_run_folder_instead_of_best(capsys, trained_run):
    code, out, err = run_cli(capsys, "predict", "--adapter", trained_run.dir, "good")
    assert_one_line_error(code, err, "adapter_config.json", f"did you mean '{trained_run.best}'?")


@pytest.mark.parametrize("args, fragments", [
    (["--adapter", "{tmp}/nowhere", "good"], ["adapter directory", "nowhere", "does not exist"]),
    (["--adapter", "{tmp}/texts.jsonl", "good"], ["texts.jsonl", "is a file", "best/ folder"]),
    (["--adapter", "{best}"], ["nothing to predict"]),
    (["--adapter", "{best}", "--input", "{tmp}/texts.jsonl", "good"], ["not both"]),
    (["--adapter", "{best}", "--input", "{tmp}/missing.jsonl"], ["missing.jsonl", "does not exist"]),
    (["--adapter", "{best}", "--input", "{tmp}/texts.jsonl", "--text-column", "body"],
     ["no column 'body'", "columns found: text"]),
    (["--adapter", "{best}", "--batch-size", "0", "good"], ["--batch-size must be a positive integer"]),
    (["--adapter", "{best}", "--input", "{tmp}/blank.jsonl"], ["row 2", "empty text"]),
])
def test_bad_input(tmp_path, capsys, trained_run, args, fragments):
    write_rows(tmp_path / "texts.jsonl", [{"text": "good"}])
    write_rows(tmp_path / "blank.jsonl", [{"text": "good"}, {"text": ""}])
    output = tmp_path / "out.jsonl"
    before = snapshot(trained_run.dir)
    args = [a.replace("{tmp}", str(tmp_path)).replace("{best}", str(trained_run.best)) for a in args]
    code, out, err = run_cli(capsys, "predict", *args, "--output", output)
    assert_one_line_error(code, err, *fragments)
    assert out == ""
    assert not output.exists()
    assert snapshot(trained_run.dir) == before


def test_output_is_replaced_whole(tmp_path, capsys, trained_run):
    output = tmp_path / "p.jsonl"
    output.write_text(json.dumps({"old": True}) + "\n" * 50)
    code, _, err = run_cli(capsys, "predict", "--adapter", trained_run.best, "--output", output, "good")
    assert code == 0, err
    assert [r["text"] for r in read_jsonl(output)] == ["good"]
    assert [p.name for p in tmp_path.iterdir()] == ["p.jsonl"]  # no temporary left beside it


@pytest.mark.parametrize("where", ["folder", "under-file"])
def test_output_that_cannot_be_a_file(tmp_path, capsys, trained_run, where):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    output = tmp_path if where == "folder" else blocker / "p.jsonl"
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, "predict", "--adapter", trained_run.best, "--output", output, "good")
    fragments = [f"'{tmp_path}'", "is a directory"] if where == "folder" else [f"'{blocker}'", "is a file"]
    assert_one_line_error(code, err, "--output", *fragments)
    assert out == ""
    assert snapshot(tmp_path) == before


def test_output_that_is_the_input_is_refused(tmp_path, capsys, trained_run):
    texts = write_rows(tmp_path / "texts.jsonl", [{"text": "good"}])
    before = texts.read_bytes()
    code, out, err = run_cli(capsys, "predict", "--adapter", trained_run.best, "--input", texts,
                             "--output", tmp_path / "." / "texts.jsonl")
    assert_one_line_error(code, err, "--output", "--input", "texts.jsonl")
    assert texts.read_bytes() == before


def test_full_disk_keeps_the_old_output(tmp_path, capsys, trained_run, monkeypatch):
    import errno
    import os

    output = tmp_path / "p.jsonl"
    output.write_text("old predictions\n")

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(os, "replace", no_space)
    code, out, err = run_cli(capsys, "predict", "--adapter", trained_run.best, "--output", output, "good")
    assert_one_line_error(code, err, "No space left on device", str(output))
    assert [p.name for p in tmp_path.iterdir()] == ["p.jsonl"]  # the temporary file is gone too
    assert output.read_text() == "old predictions\n"


# --- an adapter trained on text pairs -------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair_run(tmp_path_factory, tiny_bert_dir):
    import test_cli

    root = tmp_path_factory.mktemp("pair_run")
    rows = [{"premise": r["text"], "hypothesis": f"it was {'good' if i % 3 else 'bad'}", "label": r["label"]}
            for i, r in enumerate(make_rows(24, seed=51))]
    data = write_rows(root / "pairs.jsonl", rows)
    with test_cli.single_thread():
        assert test_cli.main(["train", "--model", str(tiny_bert_dir), "--train-file", str(data), "--output-dir",
                              str(root / "run"), "--text-column", "premise", "--text-pair-column", "hypothesis",
                              *test_cli.FAST, "--lr", "0.02"]) == 0
    return root / "run" / "best", data, rows


def test_pair_adapter_refuses_single_texts(capsys, pair_run):
    best, _, _ = pair_run
    code, out, err = run_cli(capsys, "predict", "--adapter", best, "good")
    assert_one_line_error(code, err, "text pairs", "'premise' and 'hypothesis'", "--input")


def test_pair_adapter_reads_both_columns(tmp_path, capsys, pair_run):
    best, data, rows = pair_run
    output = tmp_path / "p.jsonl"
    code, _, err = run_cli(capsys, "predict", "--adapter", best, "--input", data, "--output", output)
    assert code == 0, err
    predictions = read_jsonl(output)
    assert [(p["text"], p["text_pair"]) for p in predictions] == [(r["premise"], r["hypothesis"]) for r in rows]
    # the labels predict gives are the ones eval scores (eval reads both columns too)
    names = ["neg", "pos"]
    matrix = [[sum(1 for p, r in zip(predictions, rows) if r["label"] == a and p["label"] == b) for b in names]
              for a in names]
    code, out, err = run_cli(capsys, "eval", "--adapter", best, "--data", data, "--json")
    assert code == 0, err
    assert json.loads(out)["confusion_matrix"] == matrix
    # and the second text matters: without it the scores differ
    from lorafit.tasks.classification import predict_texts
    from lorafit.inference.loading import load_adapter_for_inference

    loaded = load_adapter_for_inference(best)
    alone = predict_texts(loaded.model, loaded.tokenizer, [r["premise"] for r in rows], max_length=32)
    together = torch.tensor([list(p["probabilities"].values()) for p in predictions])
    assert not torch.allclose(alone, together, atol=1e-3)


def test_causal_lm_adapter_points_to_generate(tmp_path, capsys):
    from test_generate import build_base, build_tokenizer, save_adapter

    tokenizer = build_tokenizer()
    build_base(len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    adapter = save_adapter(tmp_path / "base", tmp_path / "adapter", seed=1)
    code, out, err = run_cli(capsys, "predict", "--adapter", adapter, "good")
    assert_one_line_error(code, err, f"'{adapter}' is a causal-lm adapter", "lorafit generate")
    assert out == ""


def test_adapter_without_lorafit_json_reads_texts_with_the_task_default_max_length(tmp_path, capsys, trained_run,
                                                                                    monkeypatch):
    """An adapter saved by another tool has no lorafit.json; its texts are cut at the classification default
    that `lorafit train` uses, not at a length of predict's own."""
    import shutil

    from lorafit.inference import predict
    from lorafit.training.settings import TrainConfig

    adapter = tmp_path / "adapter"
    shutil.copytree(trained_run.best, adapter)
    (adapter / "lorafit.json").unlink()
    lengths = []

    def recording(model, tokenizer, texts, *, max_length, **options):
        lengths.append(max_length)
        return torch.full((len(texts), 3), 1 / 3)

    monkeypatch.setattr(predict, "predict_texts", recording)
    code, _, err = run_cli(capsys, "predict", "--adapter", adapter, "a great film")
    assert code == 0, err
    assert lengths == [TrainConfig(task="classification").resolved().max_length] == [128]
