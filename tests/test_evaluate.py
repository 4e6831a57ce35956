"""Tests for `lorafit eval`: its scores checked against predictions from `lorafit predict`, scored by hand."""

from __future__ import annotations

import json
import math

import pytest

from test_cli import (assert_one_line_error, make_rows, read_jsonl, run_cli, tiny_bert3_dir, trained_run,  # noqa: F401
                      write_rows)

NAMES = ["neg", "neu", "pos"]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, trained_run):
    """An evaluation file, `lorafit predict`'s output for it, and scores worked out here from those."""
    import test_cli

    root = tmp_path_factory.mktemp("eval")
    rows = make_rows(30, tuple(NAMES), seed=41)
    data = write_rows(root / "eval.csv", rows)
    output = root / "predictions.jsonl"
    with test_cli.single_thread():
        assert test_cli.main(["predict", "--adapter", str(trained_run.best), "--input", str(data),
                              "--output", str(output)]) == 0
    predictions = read_jsonl(output)
    truth = [r["label"] for r in rows]
    guess = [p["label"] for p in predictions]
    assert len(set(guess)) > 1  # a model that predicts one class would leave most of the report untested
    matrix = [[sum(1 for t, g in zip(truth, guess) if t == a and g == b) for b in NAMES] for a in NAMES]
    per_class = {}
    for k, name in enumerate(NAMES):
        predicted = sum(matrix[i][k] for i in range(3))
        support = sum(matrix[k])
        precision = matrix[k][k] / predicted if predicted else 0.0
        recall = matrix[k][k] / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    expected = {
        "accuracy": sum(t == g for t, g in zip(truth, guess)) / len(truth),
        "f1": sum(s["f1"] for s in per_class.values()) / 3,  # every class occurs in this file
        "per_class": per_class,
        "confusion_matrix": matrix,
        # mean cross-entropy from predict's (6-decimal) probabilities
        "loss": sum(-math.log(p["probabilities"][t]) for p, t in zip(predictions, truth)) / len(truth),
    }
    return data, expected


def test_json_scores_match_predictions_scored_by_hand(capsys, trained_run, scored):
    data, expected = scored
    code, out, err = run_cli(capsys, "eval", "--adapter", trained_run.best, "--data", data, "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["confusion_matrix"] == expected["confusion_matrix"]
    assert metrics["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    assert metrics["f1"] == pytest.approx(expected["f1"], abs=1e-6)
    assert metrics["loss"] == pytest.approx(expected["loss"], abs=1e-4)
    assert list(metrics["per_class"]) == NAMES
    for name in NAMES:
        assert metrics["per_class"][name] == pytest.approx(expected["per_class"][name], abs=1e-9)


def test_printed_report(capsys, trained_run, scored):
    data, expected = scored
    code, out, err = run_cli(capsys, "eval", "--adapter", trained_run.best, "--data", data)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["loss", f"{expected['loss']:.4f}", "accuracy", f"{expected['accuracy']:.4f}",
                                "macro-F1", f"{expected['f1']:.4f}"]
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["class"])
    assert lines[header].split() == ["class", "precision", "recall", "f1", "support"]
    for name, line in zip(NAMES, lines[header + 1:header + 4]):
        s = expected["per_class"][name]
        assert line.split() == [name, f"{s['precision']:.4f}", f"{s['recall']:.4f}", f"{s['f1']:.4f}",
                                str(s["support"])]
    start = lines.index("confusion matrix (rows: true, columns: predicted)")
    assert lines[start + 1].split() == NAMES
    assert [line.split() for line in lines[start + 2:start + 5]] == \
        [[name, *map(str, row)] for name, row in zip(NAMES, expected["confusion_matrix"])]


def test_eval_on_validation_matches_what_training_recorded(capsys, trained_run):
    code, out, err = run_cli(capsys, "eval", "--adapter", trained_run.best, "--data", trained_run.validation, "--json")
    assert code == 0, err
    metrics = json.loads(out)
    records = read_jsonl(trained_run.dir / "metrics.jsonl")
    best = next(r for r in records if r["accuracy"] == max(x["accuracy"] for x in records))
    assert metrics["confusion_matrix"] == best["confusion_matrix"]
    for key in ("loss", "accuracy", "f1"):
        assert metrics[key] == pytest.approx(best[key], abs=1e-6), key


def test_column_flags(tmp_path, capsys, trained_run):
    rows = [{"body": r["text"], "gold": r["label"]} for r in make_rows(9, tuple(NAMES), seed=42)]
    data = write_rows(tmp_path / "renamed.jsonl", rows)
    code, out, err = run_cli(capsys, "eval", "--adapter", trained_run.best, "--data", data, "--text-column", "body",
                             "--label-column", "gold", "--json")
    assert code == 0, err
    assert sum(map(sum, json.loads(out)["confusion_matrix"])) == 9


@pytest.mark.parametrize("rows, args, fragments", [
    ([{"text": "good", "label": "great"}], [], ["label 'great' (row 1) never occurs in the training data",
                                                "neg, neu, pos"]),
    ([{"text": "good", "label": "pos"}], ["--label-column", "gold"], ["no column 'gold'", "columns found: text, label"]),
    ([{"review": "good", "label": "pos"}], [], ["no column 'text'", "--text-column review"]),
    ([{"text": "good", "label": "pos"}], ["--batch-size", "0"], ["--batch-size must be a positive integer"]),
    ([{"text": "good", "label": None}], [], ["row 1", "no label"]),
    ([{"text": "good", "label": "pos"}], ["--max-length", "0"], ["--max-length must be a positive integer, got 0"]),
    ([{"text": "good", "label": "pos"}], ["--max-length", "-3"], ["--max-length must be a positive integer, got -3"]),
])
def test_bad_input(tmp_path, capsys, trained_run, rows, args, fragments):
    data = write_rows(tmp_path / "data.jsonl", rows)
    code, out, err = run_cli(capsys, "eval", "--adapter", trained_run.best, "--data", data, *args)
    assert_one_line_error(code, err, *fragments)
    assert out == ""


def test_missing_data_file_and_adapter(tmp_path, capsys, trained_run):
    code, _, err = run_cli(capsys, "eval", "--adapter", trained_run.best, "--data", tmp_path / "none.csv")
    assert_one_line_error(code, err, "none.csv", "does not exist")
    data = write_rows(tmp_path / "d.jsonl", [{"text": "good", "label": "pos"}])
    code, _, err = run_cli(capsys, "eval", "--adapter", tmp_path / "no-adapter", "--data", data)
    assert_one_line_error(code, err, "no-adapter", "does not exist")
