"""Tests for `lorafit merge`: a plain transformers model that predicts what base model + adapter predict."""

from __future__ import annotations

import shutil

import pytest
import torch

from test_cli import (assert_one_line_error, run_cli, single_thread, snapshot, tiny_bert3_dir,  # noqa: F401
                      trained_run)

TEXTS = ["a great and lovely film", "the plot was dull", "an okay movie", "terrible acting and a boring story",
         "fine"]


@pytest.fixture(scope="module")
def merged(tmp_path_factory, trained_run):
    import test_cli

    output = tmp_path_factory.mktemp("merge") / "merged"
    with single_thread():
        assert test_cli.main(["merge", "--adapter", str(trained_run.best), "--output", str(output)]) == 0
    return output


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad(), single_thread():
        return model(**batch).logits


def test_merged_model_loads_without_lorafit(merged):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(merged)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert not [type(m).__module__ for m in model.modules() if type(m).__module__.startswith("lorafit")]
    assert not [k for k in model.state_dict() if "lora" in k or "modules_to_save" in k or "base_layer" in k]
    assert model.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert model.config.label2id == {"neg": 0, "neu": 1, "pos": 2}


def test_merged_model_predicts_like_base_plus_adapter(merged, trained_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorafit.inference.loading import load_adapter_for_inference

    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    plain_logits = _logits(plain, AutoTokenizer.from_pretrained(merged))
    loaded = load_adapter_for_inference(trained_run.best)
    adapter_logits = _logits(loaded.model, loaded.tokenizer)
    assert torch.allclose(plain_logits, adapter_logits, atol=1e-5)
    assert plain_logits.argmax(-1).tolist() == adapter_logits.argmax(-1).tolist()
    # and the merge is not a no-op: the plain base model scores differently
    with single_thread():
        base = AutoModelForSequenceClassification.from_pretrained(trained_run.model).eval()
    assert not torch.allclose(_logits(base, loaded.tokenizer), adapter_logits, atol=1e-3)


def test_merged_folder_holds_model_and_tokenizer(merged):
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(name.startswith(".") for name in names)


def test_output_must_be_new(tmp_path, capsys, trained_run):
    output = tmp_path / "taken"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    code, out, err = run_cli(capsys, "merge", "--adapter", trained_run.best, "--output", output)
    assert_one_line_error(code, err, "not empty", "--output")
    assert snapshot(output) == {"keep.txt": b"mine"}


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_output_that_cannot_be_a_folder(tmp_path, capsys, trained_run, where):
    blocker = tmp_path / "model.bin"
    blocker.write_text("mine")
    output = blocker if where == "file" else blocker / "merged"
    code, out, err = run_cli(capsys, "merge", "--adapter", trained_run.best, "--output", output)
    assert_one_line_error(code, err, f"'{blocker}'", "is a file", "--output")
    assert snapshot(tmp_path) == {"model.bin": b"mine"}


def test_full_disk_is_one_line_and_leaves_no_folder(tmp_path, capsys, trained_run, monkeypatch):
    from safetensors import SafetensorError

    def no_space(*args, **kwargs):  # what safetensors raises on a full disk: no OSError, the errno in the text
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", no_space)
    output = tmp_path / "merged"
    code, out, err = run_cli(capsys, "merge", "--adapter", trained_run.best, "--output", output)
    assert_one_line_error(code, err, "No space left on device", f"'{output}'", "free some space")
    assert list(tmp_path.iterdir()) == []


def test_empty_output_folder_is_fine(tmp_path, capsys, trained_run):
    output = tmp_path / "empty"
    output.mkdir()
    code, out, err = run_cli(capsys, "merge", "--adapter", trained_run.best, "--output", output)
    assert code == 0, err
    assert out == f"merged model written to {output}\n"
    assert (output / "config.json").is_file()


def test_missing_adapter(tmp_path, capsys):
    code, out, err = run_cli(capsys, "merge", "--adapter", tmp_path / "nothing", "--output", tmp_path / "out")
    assert_one_line_error(code, err, "nothing", "does not exist")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tensor", ["lora_B", "classifier.weight"])
def test_adapter_holding_nan_is_one_line_naming_it_and_writes_nothing(tmp_path, capsys, trained_run, tensor):
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "diverged"
    shutil.copytree(trained_run.best, adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = sorted(k for k in tensors if tensor in k)[-1]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, adapter / "adapter_model.safetensors")
    before = snapshot(adapter)
    code, out, err = run_cli(capsys, "merge", "--adapter", adapter, "--output", tmp_path / "out")
    assert_one_line_error(code, err, str(adapter), "NaN", "--lr")
    assert not (tmp_path / "out").exists()
    assert snapshot(adapter) == before


def test_a_dora_run_with_loraplus_trains_merges_and_predicts(tmp_path, capsys, tiny_bert3_dir):
    """`lorafit train --use-dora --loraplus-lr-ratio`: the saved adapter is PEFT's DoRA format, `merge` writes a
    model that scores like base + adapter (and like PEFT's loading of it), `predict` loads it."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorafit.inference.loading import load_adapter_for_inference
    from test_cli import make_rows, write_rows

    train = write_rows(tmp_path / "train.jsonl", make_rows(16, ("neg", "neu", "pos"), seed=8))
    code, _, err = run_cli(capsys, "train", "--model", tiny_bert3_dir, "--train-file", train, "--eval-strategy", "no",
                           "--max-steps", "2", "--max-length", "32", "--batch-size", "8", "--lr", "0.01",
                           "--use-dora", "--loraplus-lr-ratio", "4", "--output-dir", tmp_path / "run")
    assert code == 0, err
    best = tmp_path / "run" / "best"
    magnitudes = [k for k in load_file(best / "adapter_model.safetensors") if k.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == 4  # query and value of two layers

    code, _, err = run_cli(capsys, "merge", "--adapter", best, "--output", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    loaded = load_adapter_for_inference(best)
    adapter_logits = _logits(loaded.model, loaded.tokenizer)
    assert torch.allclose(_logits(merged, AutoTokenizer.from_pretrained(tmp_path / "merged")), adapter_logits,
                          atol=1e-5)
    with single_thread():
        base = AutoModelForSequenceClassification.from_pretrained(tiny_bert3_dir).eval()
    assert not torch.allclose(_logits(base, loaded.tokenizer), adapter_logits, atol=1e-4)
    peft = pytest.importorskip("peft")
    with single_thread():
        theirs = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_bert3_dir),
                                                str(best)).eval()
    assert torch.allclose(_logits(theirs, loaded.tokenizer), adapter_logits, atol=1e-5)

    code, out, err = run_cli(capsys, "predict", "--adapter", best, "a great film", "dull")
    assert code == 0, err
    assert len(out.strip().splitlines()) >= 2
