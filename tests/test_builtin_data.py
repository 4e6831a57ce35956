"""The shipped quickstart sentiment data and the benchmark corpus generator."""
from __future__ import annotations

import json
import statistics
import sys
from importlib import resources
from pathlib import Path

import pytest

LABELS = {"negative", "positive"}
BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str) -> list[dict]:
    ref = resources.files("lorafit").joinpath("builtin_data", "sentiment", name)
    rows = []
    with ref.open("r", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def _key(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.fixture(scope="module")
def train() -> list[dict]:
    return _load("train.jsonl")


@pytest.fixture(scope="module")
def validation() -> list[dict]:
    return _load("validation.jsonl")


def test_counts(train, validation):
    assert len(train) >= 600
    assert len(validation) >= 200


@pytest.mark.parametrize("split", ["train", "validation"])
def test_rows_well_formed_and_balanced(split, request):
    rows = request.getfixturevalue(split)
    for row in rows:
        assert set(row) == {"text", "label"}
        assert isinstance(row["text"], str) and row["text"].strip()
        assert row["label"] in LABELS
    share = sum(r["label"] == "positive" for r in rows) / len(rows)
    assert 0.4 <= share <= 0.6, share


@pytest.mark.parametrize("split", ["train", "validation"])
def test_no_duplicates(split, request):
    keys = [_key(r["text"]) for r in request.getfixturevalue(split)]
    assert len(keys) == len(set(keys))


def test_no_train_validation_overlap(train, validation):
    assert not {_key(r["text"]) for r in train} & {_key(r["text"]) for r in validation}


def test_length_spread(train, validation):
    for rows in (train, validation):
        words = [len(r["text"].split()) for r in rows]
        assert min(words) < 6
        assert max(words) > 30
        assert 6 <= statistics.median(words) <= 25


def test_demo_sentences_not_in_data(train, validation):
    demo = {
        "a feel-good picture in the best sense of the term .",
        "it 's just incredibly dull .",
        "resourceful and ingenious entertainment .",
    }
    keys = {_key(r["text"]) for r in train + validation}
    assert not keys & {_key(d) for d in demo}


@pytest.fixture(scope="module")
def make_reviews():
    sys.path.insert(0, str(BENCH))
    try:
        from make_reviews import make_reviews as fn
    finally:
        sys.path.remove(str(BENCH))
    return fn


def test_make_reviews_deterministic_balanced_varied(make_reviews):
    a = make_reviews(3000, seed=0)
    assert a == make_reviews(3000, seed=0)
    assert a != make_reviews(3000, seed=1)
    assert len(a) == 3000
    assert {r["label"] for r in a} == LABELS
    assert sum(r["label"] == "positive" for r in a) == 1500
    texts = [r["text"] for r in a]
    assert len(set(texts)) == len(texts) and all(t.strip() for t in texts)
    words = [len(t.split()) for t in texts]
    assert min(words) <= 8
    assert max(words) >= 60
    assert sum(w < 15 for w in words) > 300  # many short ones
    assert sum(w > 40 for w in words) > 150  # and a long tail
    assert statistics.pstdev(words) > 8


def test_make_reviews_exclude(make_reviews):
    train = make_reviews(200, seed=0)
    held = make_reviews(100, seed=1, exclude={r["text"] for r in train})
    assert not {r["text"] for r in train} & {r["text"] for r in held}


def test_shipped_bench_files_match_generator(make_reviews):
    data = BENCH / "data"
    if not (data / "reviews_train.jsonl").exists():
        pytest.skip("bench/data not generated")
    rows = [json.loads(x) for x in (data / "reviews_train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows == make_reviews(3000, seed=0)
    val = [json.loads(x) for x in (data / "reviews_validation.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(val) == 500
    assert not {r["text"] for r in rows} & {r["text"] for r in val}
