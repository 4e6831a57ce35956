"""Tests for lorafit.training.metrics against values worked out by hand."""

from __future__ import annotations

import pytest

from lorafit.training.metrics import (accuracy, classification_report, confusion_matrix, format_report, macro_f1,
                             per_class_scores)

# truth:      0 0 1 1 2
# prediction: 0 1 1 1 0
LABELS = [0, 0, 1, 1, 2]
PREDICTIONS = [0, 1, 1, 1, 0]
NAMES = ["neg", "neu", "pos"]
# rows: true class, columns: predicted class
MATRIX = [[1, 1, 0],
          [0, 2, 0],
          [1, 0, 0]]


def test_confusion_matrix():
    assert confusion_matrix(LABELS, PREDICTIONS, 3) == MATRIX
    assert confusion_matrix([], [], 2) == [[0, 0], [0, 0]]


def test_accuracy():
    assert accuracy(LABELS, PREDICTIONS) == pytest.approx(3 / 5)
    assert accuracy([1, 1], [1, 1]) == 1.0
    assert accuracy([], []) == 0.0


def test_per_class_scores():
    neg, neu, pos = per_class_scores(MATRIX)
    # neg: 1 of 2 predicted neg are right, 1 of 2 true neg found
    assert neg == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    # neu: 2 of 3 predicted neu are right, both true neu found: F1 = 2 * (2/3) * 1 / (2/3 + 1) = 0.8
    assert neu == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    # pos: never predicted (precision 0 by convention), its one example missed
    assert pos == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1})


def test_macro_f1_averages_classes_present_in_the_labels():
    assert macro_f1(MATRIX) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    # class 2 never occurs in the labels (only predicted once): it is left out of the mean
    matrix = confusion_matrix([0, 0, 1, 1], [0, 2, 1, 1], 3)
    # class 0: p 1, r 1/2, F1 2/3; class 1: p 1, r 1, F1 1
    assert macro_f1(matrix) == pytest.approx((2 / 3 + 1.0) / 2)
    assert macro_f1([[0, 0], [0, 0]]) == 0.0


def test_perfect_and_all_wrong():
    perfect = classification_report([0, 1, 2, 1], [0, 1, 2, 1], NAMES)
    assert perfect["accuracy"] == 1.0 and perfect["f1"] == 1.0
    wrong = classification_report([0, 1], [1, 0], ["a", "b"])
    assert wrong["accuracy"] == 0.0 and wrong["f1"] == 0.0
    assert wrong["confusion_matrix"] == [[0, 1], [1, 0]]


def test_classification_report():
    report = classification_report(LABELS, PREDICTIONS, NAMES)
    assert report["accuracy"] == pytest.approx(0.6)
    assert report["f1"] == pytest.approx(1.3 / 3)
    assert report["confusion_matrix"] == MATRIX
    assert list(report["per_class"]) == NAMES
    assert report["per_class"]["neu"]["precision"] == pytest.approx(2 / 3)
    assert report["per_class"]["pos"]["support"] == 1


def test_format_report():
    text = format_report(classification_report(LABELS, PREDICTIONS, NAMES), NAMES)
    lines = text.splitlines()
    assert lines[0] == "accuracy 0.6000   macro-F1 0.4333"
    # the first block is per class: precision recall f1 support ...
    table = lines[lines.index(next(line for line in lines if line.startswith("class"))) + 1:][:3]
    assert [line.split() for line in table] == [
        ["neg", "0.5000", "0.5000", "0.5000", "2"],
        ["neu", "0.6667", "1.0000", "0.8000", "2"],
        ["pos", "0.0000", "0.0000", "0.0000", "1"],
    ]
    # ... then the confusion matrix, rows true, columns predicted
    matrix_lines = lines[lines.index("confusion matrix (rows: true, columns: predicted)") + 1:]
    assert matrix_lines[0].split() == NAMES
    assert [line.split() for line in matrix_lines[1:]] == [["neg", "1", "1", "0"], ["neu", "0", "2", "0"],
                                                             ["pos", "1", "0", "0"]]
