"""Tests for training/entities.py: entity extraction and entity-level scores against the real `seqeval`,
on IOB1, IOB2 and IOBES tags, malformed runs included."""

from __future__ import annotations

import math
import random
import warnings

import pytest

from lorafit.training.entities import entity_scores, extract_entities

seqeval_metrics = pytest.importorskip("seqeval.metrics")
from seqeval.metrics.sequence_labeling import get_entities  # noqa: E402

FIXED = [
    ["B-PER", "I-PER", "O", "B-LOC"],  # IOB2
    ["I-PER", "I-PER", "O", "I-LOC", "B-LOC"],  # IOB1: B only between two entities of one type
    ["S-PER", "O", "B-LOC", "I-LOC", "E-LOC", "S-LOC"],  # IOBES
    ["I-PER", "O", "E-LOC", "I-LOC"],  # malformed: I- and E- without B-
    ["B-PER", "I-LOC", "I-LOC", "E-PER"],  # a type change inside a run
    ["E-PER", "E-PER", "S-PER", "I-PER"],
    ["B-ORG-X", "I-ORG-X", "O"],  # a type holding a dash
    [],
]


@pytest.mark.parametrize("tags", FIXED)
def test_entities_match_seqeval_on_chosen_sequences(tags):
    assert extract_entities(tags) == [tuple(e) for e in get_entities(tags)]


def test_entities_match_seqeval_on_random_sequences():
    rng = random.Random(0)
    vocabulary = ["O", "O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC", "I-MISC"]
    for _ in range(3000):
        tags = [rng.choice(vocabulary) for _ in range(rng.randint(0, 14))]
        assert extract_entities(tags) == [tuple(e) for e in get_entities(tags)], tags


def test_scores_match_seqeval_overall_and_per_type():
    rng = random.Random(1)
    vocabulary = ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "S-LOC"]
    for trial in range(200):
        truth = [[rng.choice(vocabulary) for _ in range(rng.randint(1, 9))] for _ in range(rng.randint(1, 6))]
        guess = [[rng.choice(vocabulary) if rng.random() < 0.4 else t for t in s] for s in truth]
        ours = entity_scores(truth, guess)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # seqeval warns where precision or recall is 0/0
            expected = {"precision": seqeval_metrics.precision_score(truth, guess),
                        "recall": seqeval_metrics.recall_score(truth, guess),
                        "f1": seqeval_metrics.f1_score(truth, guess),
                        "accuracy": seqeval_metrics.accuracy_score(truth, guess)}
            report = seqeval_metrics.classification_report(truth, guess, output_dict=True)
        for key, value in expected.items():
            assert math.isclose(ours[key], value, abs_tol=1e-12), (trial, key, truth, guess)
        for kind, scores in ours["per_type"].items():
            if scores["support"]:  # seqeval lists the types of the true tags
                for key, theirs in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
                    assert math.isclose(scores[key], report[kind][theirs], abs_tol=1e-12)
                assert scores["support"] == report[kind]["support"]
