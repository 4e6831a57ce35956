"""Tests for `lorafit merge`: a plain transformers model that predicts what base model + adapter predict."""

from __future__ import annotations

import contextlib
import shutil
import warnings

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


# --- combining several adapters into a new one ------------------------------------------------------

peft = pytest.importorskip("peft")

from test_generate import setup  # noqa: E402,F401  (the tiny Llama with causal-LM adapters a and b)


def _peft_combination(setup, adapters: list, seed: int, **kwargs) -> dict[str, torch.Tensor]:
    """PEFT's add_weighted_adapter on the same saved adapters, named as the command names them."""
    from transformers import AutoModelForCausalLM

    with _no_warnings():
        theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["model_dir"]),
                                                adapters[0], adapter_name="adapter1")
        for i, directory in enumerate(adapters[1:], start=2):
            theirs.load_adapter(directory, adapter_name=f"adapter{i}")
        torch.manual_seed(seed)
        theirs.add_weighted_adapter([f"adapter{i + 1}" for i in range(len(adapters))], adapter_name="new", **kwargs)
    return peft.get_peft_model_state_dict(theirs, adapter_name="new"), theirs


@contextlib.contextmanager
def _no_warnings():
    """PEFT's informational warnings off for one block."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("flags, kwargs, seed", [
    (["--weights", "0.6", "-0.4", "--combination", "ties", "--density", "0.5"],
     dict(weights=[0.6, -0.4], combination_type="ties", density=0.5), 0),
    (["--weights", "1", "0.5", "--combination", "dare_linear", "--density", "0.7", "--seed", "3"],
     dict(weights=[1.0, 0.5], combination_type="dare_linear", density=0.7), 3),
    (["--combination", "cat"], dict(weights=[1.0, 1.0], combination_type="cat"), 0),
])
def test_combined_adapter_equals_peft_add_weighted_adapter(setup, tmp_path, capsys, flags, kwargs, seed):
    from transformers import AutoModelForCausalLM

    from lorafit import LoraModel

    out = tmp_path / "combined"
    code, stdout, err = run_cli(capsys, "merge", "--adapter", setup["a"], "--adapter", setup["b"], *flags,
                                "--output", out)
    assert code == 0, err
    assert stdout == f"combined adapter ({kwargs['combination_type']} of 2) written to {out}\n"
    assert {"adapter_config.json", "adapter_model.safetensors", "lorafit.json", "tokenizer"} <= {
        p.name for p in out.iterdir()}
    expected, theirs = _peft_combination(setup, [setup["a"], setup["b"]], seed, **kwargs)
    got = load_file_tensors(out)
    assert sorted(got) == sorted(expected)
    assert max((got[k] - expected[k]).abs().max().item() for k in got) == 0.0
    # PEFT loads the folder, and lorafit and PEFT then give the same logits
    ids = torch.tensor([[5, 9, 12, 7, 30, 8]])
    ours = LoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["model_dir"]), out).eval()
    with _no_warnings():
        loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["model_dir"]), out).eval()
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - loaded(input_ids=ids).logits).abs().max() <= 1e-5


def load_file_tensors(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def test_combined_adapter_generates_and_merges_into_base(setup, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lorafit import LoraModel

    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    common = ["merge", "--adapter", setup["a"], "--adapter", setup["b"], "--weights", "0.5", "0.5",
              "--combination", "svd"]
    assert run_cli(capsys, *common, "--output", adapter)[0] == 0
    code, out, err = run_cli(capsys, *common, "--merge-into-base", "--output", merged)
    assert code == 0 and out == f"merged model written to {merged}\n", err
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert not [k for k in plain.state_dict() if "lora" in k]
    ours = LoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["model_dir"]), adapter).eval()
    ids = torch.tensor([[5, 9, 12, 7, 30, 8]])
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max() <= 1e-5
    code, out, err = run_cli(capsys, "generate", "--adapter", adapter, "--max-new-tokens", "3", "hello world")
    assert code == 0, err


@pytest.mark.parametrize("extra, fragments", [
    (["--weights", "0.5"], ["--weights has 1 value(s) for 2 --adapter(s)"]),
    (["--combination", "ties"], ["needs --density", "(0, 1]"]),
    (["--combination", "dare_ties", "--density", "0"], ["--density must be in (0, 1]"]),
    (["--combination", "mean"], ["--combination must be one of", "ties"]),
    (["--combination", "linear", "--density", "0.5"], ["leave --density out"]),
    (["--weights", "1", "nan"], ["--weights must be finite"]),
    (["--svd-clamp", "2"], ["--svd-clamp", "[0, 1]"]),
])
def test_bad_combination_settings_are_one_line_and_write_nothing(setup, tmp_path, capsys, extra, fragments):
    code, out, err = run_cli(capsys, "merge", "--adapter", setup["a"], "--adapter", setup["b"], *extra,
                             "--output", tmp_path / "out")
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "out").exists()


def test_adapters_of_different_ranks_need_cat_or_svd(setup, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lorafit import LoraConfig, get_lora_model
    from lorafit.inference.adapter_info import save_adapter_info

    low = tmp_path / "low"
    base = AutoModelForCausalLM.from_pretrained(setup["model_dir"])
    get_lora_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                                    task_type="CAUSAL_LM")).save_pretrained(low)
    save_adapter_info(low, {"task": "causal-lm", "base_model": str(setup["model_dir"])})
    code, out, err = run_cli(capsys, "merge", "--adapter", setup["a"], "--adapter", low, "--combination", "linear",
                             "--output", tmp_path / "out")
    assert_one_line_error(code, err, "same r", "adapter1: 4, adapter2: 2", "'cat' or 'svd'")
    assert not (tmp_path / "out").exists()
    assert run_cli(capsys, "merge", "--adapter", setup["a"], "--adapter", low, "--combination", "cat",
                   "--output", tmp_path / "out")[0] == 0
    assert load_file_tensors(tmp_path / "out")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 6


def test_classification_adapters_are_not_combined(tmp_path, capsys, trained_run):
    code, out, err = run_cli(capsys, "merge", "--adapter", trained_run.best, "--adapter", trained_run.best,
                             "--output", tmp_path / "out")
    assert_one_line_error(code, err, str(trained_run.best), "in full", "cannot be combined",
                          f"lorafit merge --adapter {trained_run.best} --output DIR")
    assert not (tmp_path / "out").exists()
