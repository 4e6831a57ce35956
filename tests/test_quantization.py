"""--quantize: loading base models through bitsandbytes, and the commands on QLoRA adapters (tiny models)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from test_causal_lm import save_tiny_model, todo_records, write_jsonl
from test_cli import assert_one_line_error, build_tiny_bert, make_rows, run_cli, write_rows
from lorafit.errors import LorafitError
from lorafit.inference.loading import load_adapter_for_inference
from lorafit.inference.quantization import check_quantized
from lorafit.quantized import is_quantized
from lorafit.training.settings import QuantizeSettings

pytest.importorskip("bitsandbytes")

STEPS = ["--max-steps", "4", "--batch-size", "8", "--max-length", "48", "--eval-strategy", "no"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A 4-step 4-bit (nf4, double quantization) causal-LM run on a tiny Llama."""
    root = tmp_path_factory.mktemp("qlora-lm")
    model = save_tiny_model(root / "model", "llama")
    train = write_jsonl(root / "train.jsonl", todo_records())
    args = ["train", "--task", "causal-lm", "--model", model, "--train-file", train, "--output-dir", root / "run",
            "--quantize", "4bit", "--bnb-4bit-use-double-quant", "--gradient-checkpointing", "--lr", "0.01", *STEPS]
    code, out, err = run_cli(_NoCapture(), *args)
    assert code == 0, err
    return root


class _NoCapture:
    """run_cli's capsys for a module fixture, which cannot take pytest's function-scoped capsys."""

    def readouterr(self):
        return "", ""


def test_training_records_the_quantization_for_the_other_commands(lm_run):
    info = json.loads((lm_run / "run" / "best" / "lorafit.json").read_text())
    assert info["quantization"] == {"quantize": "4bit", "bnb_4bit_quant_type": "nf4",
                                    "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float32"}
    loaded = load_adapter_for_inference(lm_run / "run" / "best")
    layer = loaded.model.model.model.layers[0].mlp.up_proj
    assert is_quantized(layer.base_layer) and layer.base_layer.weight.quant_state.nested  # double quantization
    plain = load_adapter_for_inference(lm_run / "run" / "best", quantization=QuantizeSettings("none"))
    assert not any(is_quantized(m) for m in plain.model.modules())


def test_eval_and_generate_on_a_qlora_adapter(lm_run, capsys, tmp_path):
    best = lm_run / "run" / "best"
    code, out, err = run_cli(capsys, "eval", "--adapter", best, "--data", lm_run / "train.jsonl")
    assert code == 0, err
    assert "perplexity" in out
    code, out, err = run_cli(capsys, "generate", "--adapter", best, "--quantize", "8bit", "--max-new-tokens", "4",
                             "--output", tmp_path / "out.jsonl", "Ann must call Bob.")
    assert code == 0, err
    assert json.loads((tmp_path / "out.jsonl").read_text())["prompt"] == "Ann must call Bob."


def test_merge_writes_an_fp32_model_and_says_so(lm_run, capsys, tmp_path):
    from transformers import AutoModelForCausalLM

    best = lm_run / "run" / "best"
    code, out, err = run_cli(capsys, "merge", "--adapter", best, "--output", tmp_path / "merged")
    assert code == 0, err
    assert "quantized (4-bit nf4)" in out and "the merged model is fp32" in out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert getattr(merged.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    loaded = load_adapter_for_inference(best)
    ids = torch.tensor([[5, 9, 13, 40, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, loaded.model(input_ids=ids).logits,
                                   atol=1e-4, rtol=0)


def test_classifier_trains_and_predicts_on_an_8bit_base(tmp_path, capsys):
    model = build_tiny_bert(tmp_path / "bert")
    train = write_rows(tmp_path / "train.jsonl", make_rows(16, seed=1))
    code, out, err = run_cli(capsys, "train", "--model", model, "--train-file", train, "--output-dir",
                             tmp_path / "run", "--quantize", "8bit", *STEPS)
    assert code == 0, err
    code, out, err = run_cli(capsys, "predict", "--adapter", tmp_path / "run" / "best", "good film", "awful plot")
    assert code == 0, err
    assert len(out.splitlines()) == 2 and all(line.split("\t")[0] in ("neg", "pos") for line in out.splitlines())


def test_missing_bitsandbytes_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    model = save_tiny_model(tmp_path / "model", "llama")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` meets when not installed
    code, out, err = run_cli(capsys, "train", "--task", "causal-lm", "--model", model, "--train-file",
                             write_jsonl(tmp_path / "train.jsonl", todo_records()), "--quantize", "4bit",
                             "--output-dir", tmp_path / "run", *STEPS)
    assert_one_line_error(code, err, "bitsandbytes", "pip install lorafit[qlora]")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value, fragment", [("--quantize", "3bit", "4bit, 8bit, none"),
                                                   ("--bnb-4bit-quant-type", "int4", "nf4, fp4"),
                                                   ("--bnb-4bit-compute-dtype", "float64", "float32, bfloat16")])
def test_bad_quantization_settings_are_one_line(capsys, flag, value, fragment):
    code, out, err = run_cli(capsys, "train", flag, value)
    assert_one_line_error(code, err, flag, fragment)


def test_a_model_with_nothing_to_quantize_is_refused():
    with pytest.raises(LorafitError, match="no linear layers bitsandbytes can quantize.*without --quantize"):
        check_quantized(nn.Sequential(nn.Embedding(8, 4)), "embeddings-only", QuantizeSettings("4bit"))
