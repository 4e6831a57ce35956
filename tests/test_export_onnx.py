"""`lorafit export --format onnx`: a merged classifier that ONNX Runtime runs with free batch and length,
giving the probabilities `lorafit predict` gives (1e-4)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_cli import assert_one_line_error, make_rows, run_cli, trained_run, tiny_bert3_dir  # noqa: F401

from lorafit.inference.loading import load_adapter_for_inference
from lorafit.inference.predict import PredictSettings, predict_rows

ort = pytest.importorskip("onnxruntime")


def onnx_probabilities(folder, texts: list[str]) -> np.ndarray:
    """What a user of the folder does: its tokenizer, ONNX Runtime, softmax."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="np")
    logits = session.run(["logits"], {k: v.astype(np.int64) for k, v in batch.items() if k in wanted})[0]
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def test_onnx_runtime_gives_lorafits_probabilities(tmp_path, capsys, trained_run):
    out = tmp_path / "onnx"
    code, stdout, err = run_cli(capsys, "export", "--adapter", trained_run.best, "--format", "onnx", "--output", out)
    assert code == 0, err
    assert "ONNX model written to" in stdout
    assert {"model.onnx", "labels.json", "config.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "labels.json").read_text()) == ["neg", "neu", "pos"]

    loaded = load_adapter_for_inference(trained_run.best)
    texts = [row["text"] for row in make_rows(11, ("neg", "neu", "pos"), seed=9)]  # 11 rows of 1 to 11 words
    expected = predict_rows(loaded, texts, None, PredictSettings())
    expected = np.array([[row["probabilities"][label] for label in ("neg", "neu", "pos")] for row in expected])
    for rows in (texts, texts[:1], texts[3:8]):  # other batch sizes and lengths than the traced ones
        got = onnx_probabilities(out, rows)
        np.testing.assert_allclose(got, expected[[texts.index(t) for t in rows]], atol=1e-4, rtol=0)


def test_onnx_export_refuses_a_causal_lm_and_a_full_folder(tmp_path, capsys, trained_run):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "export", "--adapter", trained_run.best, "--format", "onnx", "--output", out)
    assert_one_line_error(code, err, "is not empty", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run_cli(capsys, "export", "--adapter", trained_run.best, "--output", tmp_path / "a.gguf")
    assert_one_line_error(code, err, "this is a classification adapter", "--format onnx")
