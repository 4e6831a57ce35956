"""Adapter files: PEFT's names and layout both ways, atomic writes, no pickles, wrong bases refused cleanly."""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import lorafit.serialization
from conftest import make_batch, tiny_bert_cls, tiny_gpt2, tiny_llama
from lorafit import LoraConfig, LoraLayer, LoraModel, LorafitError, get_lora_model
from lorafit.saved_modules import ModulesToSave

CASES = {
    "bert-seq-cls": (tiny_bert_cls, dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])),
    "gpt2-conv1d": (tiny_gpt2, dict(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"])),
    "llama-embedding": (tiny_llama, dict(task_type="CAUSAL_LM", r=4, lora_alpha=2,
                                         target_modules=["q_proj", "v_proj", "embed_tokens"])),
    "bert-bias-all": (tiny_bert_cls, dict(task_type="SEQ_CLS", r=2, target_modules=["query"], bias="all")),
    "llama-bias-lora-only": (tiny_llama, dict(r=2, target_modules=["q_proj", "o_proj"], bias="lora_only",
                                              attention_bias=True)),
}



def _case(key: str):
    builder, config = CASES[key]
    config = dict(config)
    model_kwargs = {"attention_bias": config.pop("attention_bias")} if "attention_bias" in config else {}
    return (lambda: builder(**model_kwargs)), config


def _trained(key: str, seed: int = 0, adapter: str = "default") -> LoraModel:
    """An adapter whose every saved tensor is non-trivial (random factors, perturbed heads and biases)."""
    base, config = _case(key)
    torch.manual_seed(seed)
    lora = get_lora_model(base(), LoraConfig(**config, init_lora_weights=False), adapter)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if param.requires_grad and ".lora_" not in name:  # heads and biases
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return lora.eval()


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _snapshot(model) -> dict:
    return {"modules": [(n, type(m).__name__) for n, m in model.named_modules()],
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "grad": {n: p.requires_grad for n, p in model.named_parameters()}}


def _assert_unchanged(model, snapshot) -> None:
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == snapshot["modules"]
    state = model.state_dict()
    assert list(state) == list(snapshot["state"])
    for key, value in snapshot["state"].items():
        assert torch.equal(state[key], value), key
    assert {n: p.requires_grad for n, p in model.named_parameters()} == snapshot["grad"]
    assert not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in model.modules())


def _files(directory) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(root, f), directory): open(os.path.join(root, f), "rb").read()
            for root, _, names in os.walk(directory) for f in names}


# --- format ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(CASES))
def test_saved_files_have_pefts_names(key, tmp_path):
    base, config = _case(key)
    ours = _trained(key)
    ours.save_pretrained(tmp_path / "ours")
    assert sorted(os.listdir(tmp_path / "ours")) == ["adapter_config.json", "adapter_model.safetensors"]
    theirs = peft.get_peft_model(base(), peft.LoraConfig(**config))
    theirs.save_pretrained(tmp_path / "theirs")
    our_tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    their_tensors = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    # the same names, including the whole embedding matrices PEFT saves when it adapts them
    # (save_embedding_layers) and, with bias="all", the biases of the head's wrapper
    assert sorted(our_tensors) == sorted(their_tensors)
    for name in our_tensors:
        assert our_tensors[name].shape == their_tensors[name].shape, name
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == config["r"] and saved["inference_mode"] is True
    assert saved["task_type"] == config.get("task_type")


@pytest.mark.parametrize("key", ["bert-seq-cls", "gpt2-conv1d", "llama-embedding", "bert-bias-all"])
def test_round_trip_through_lorafit_and_peft(key, tmp_path):
    base, _ = _case(key)
    lora = _trained(key)
    batch = make_batch()
    expected = _logits(lora, batch)
    assert (expected - _logits(base(), batch)).abs().max() > 1e-3
    lora.save_pretrained(tmp_path / "ours")
    again = LoraModel.from_pretrained(base(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(again, batch), expected, rtol=1e-5, atol=1e-5)
    # PEFT reads our files ...
    peft_model = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(peft_model, batch), expected, rtol=1e-5, atol=1e-5)
    # ... and we read PEFT's
    peft_model.save_pretrained(tmp_path / "theirs")
    from_peft = LoraModel.from_pretrained(base(), tmp_path / "theirs").eval()
    torch.testing.assert_close(_logits(from_peft, batch), expected, rtol=1e-5, atol=1e-5)


def test_saved_tensors_equal_the_adapters_weights(tmp_path):
    lora = _trained("bert-seq-cls")
    lora.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    layer = lora.model.bert.encoder.layer[1].attention.self.value
    prefix = "base_model.model.bert.encoder.layer.1.attention.self.value"
    assert torch.equal(tensors[f"{prefix}.lora_A.weight"], layer.lora_A["default"].weight)
    assert torch.equal(tensors[f"{prefix}.lora_B.weight"], layer.lora_B["default"].weight)
    assert torch.equal(tensors["base_model.model.classifier.weight"],
                       lora.model.classifier.modules_to_save["default"].weight)
    assert not torch.equal(tensors["base_model.model.classifier.weight"],
                           lora.model.classifier.original_module.weight)


def test_other_adapters_go_into_sub_folders(tmp_path):
    lora = _trained("bert-seq-cls")
    lora.add_adapter("other", LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["key"], init_lora_weights=False))
    lora.add_adapter("third", LoraConfig(r=2, target_modules=["value"], init_lora_weights=False))
    lora.save_pretrained(tmp_path)
    assert set(_files(tmp_path)) == {
        "adapter_config.json", "adapter_model.safetensors",
        os.path.join("other", "adapter_config.json"), os.path.join("other", "adapter_model.safetensors"),
        os.path.join("third", "adapter_config.json"), os.path.join("third", "adapter_model.safetensors"),
    }
    other = load_file(tmp_path / "other" / "adapter_model.safetensors")
    assert all(".key." in k or ".classifier." in k for k in other)
    assert json.loads((tmp_path / "other" / "adapter_config.json").read_text())["r"] == 2
    # the layout PEFT writes for the same adapter names, and PEFT loads our sub-folder
    batch = make_batch()
    lora.set_adapter("other")
    expected = _logits(lora, batch)
    peft_model = peft.PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)
    peft_model.load_adapter(tmp_path / "other", adapter_name="other")
    peft_model.set_adapter("other")
    torch.testing.assert_close(_logits(peft_model.eval(), batch), expected, rtol=1e-5, atol=1e-5)


def test_selected_adapters_and_a_lone_non_default_adapter(tmp_path):
    lora = _trained("gpt2-conv1d", adapter="mine")
    lora.save_pretrained(tmp_path / "all")
    assert set(_files(tmp_path / "all")) == {os.path.join("mine", "adapter_config.json"),
                                             os.path.join("mine", "adapter_model.safetensors")}
    with pytest.raises(LorafitError, match="nope"):
        lora.save_pretrained(tmp_path / "bad", selected_adapters=["nope"])


# --- atomic writes --------------------------------------------------------------------------------------
def test_crash_during_save_leaves_previous_files_intact(tmp_path, monkeypatch):
    batch = make_batch()
    first = _trained("bert-seq-cls", seed=1)
    first.save_pretrained(tmp_path)
    before = _files(tmp_path)
    expected = _logits(first, batch)

    def crashing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial bytes, then the disk filled up")
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(lorafit.serialization, "save_file", crashing_save_file)
    second = _trained("bert-seq-cls", seed=2)
    with pytest.raises(OSError, match="simulated crash"):
        second.save_pretrained(tmp_path)
    assert _files(tmp_path) == before  # same names (no temp files) and same bytes
    monkeypatch.setattr(lorafit.serialization, "save_file", save_file)
    reloaded = LoraModel.from_pretrained(tiny_bert_cls(), tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, batch), expected, rtol=1e-5, atol=1e-5)


def test_crash_before_any_file_exists_leaves_nothing(tmp_path, monkeypatch):
    def crashing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(lorafit.serialization, "save_file", crashing_save_file)
    with pytest.raises(KeyboardInterrupt):
        _trained("gpt2-conv1d").save_pretrained(tmp_path / "out")
    assert _files(tmp_path) == {}


# --- the check after every save --------------------------------------------------------------------------
def _partial_state(drop: str | None = None, shard: str | None = None):
    """adapter_state_dict as a sharded model gives it unless gathered: one key missing, or one tensor reduced
    to a process's flat shard (FSDP's view of it)."""
    real = lorafit.serialization.adapter_state_dict

    def partial(model, adapter_name, config):
        state = real(model, adapter_name, config)
        key = next(k for k in state if (drop or shard) in k)
        if drop:
            del state[key]
        else:
            state[key] = state[key].flatten()[: state[key].numel() // 2].clone()
        return state

    return partial


@pytest.mark.parametrize("damage, fragment", [
    (dict(drop="value.lora_B"), "attention.self.value.lora_B.weight missing"),
    (dict(shard="query.lora_A"), "query.lora_A.weight has shape [64], expected [4, 32]"),
], ids=["missing-key", "flat-shard"])
def test_a_partial_save_is_an_error_and_keeps_the_previous_adapter(tmp_path, monkeypatch, damage, fragment):
    first = _trained("bert-seq-cls", seed=1)
    first.save_pretrained(tmp_path)
    before = _files(tmp_path)
    second = _trained("bert-seq-cls", seed=2)
    expected = {"default": second.adapter_shapes()}  # taken before the damage, as the training loop does
    monkeypatch.setattr(lorafit.serialization, "adapter_state_dict", _partial_state(**damage))
    with pytest.raises(LorafitError, match="failed the check after writing, so nothing was saved") as err:
        second.save_pretrained(tmp_path, expected_shapes=expected)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert _files(tmp_path) == before  # neither a bad file nor a temporary left behind


def test_an_empty_tensor_is_an_error_even_without_expected_shapes(tmp_path, monkeypatch):
    real = lorafit.serialization.adapter_state_dict

    def emptied(model, adapter_name, config):  # a rank holding no part of a flat parameter saves these
        return {k: v[:0] if "lora_A" in k else v for k, v in real(model, adapter_name, config).items()}

    monkeypatch.setattr(lorafit.serialization, "adapter_state_dict", emptied)
    with pytest.raises(LorafitError, match=r"lora_A.weight is empty"):
        _trained("bert-seq-cls").save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_adapter_shapes_are_the_saved_files_shapes(tmp_path):
    lora = _trained("llama-embedding")
    lora.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert lora.adapter_shapes() == {k: tuple(v.shape) for k, v in saved.items()}


def test_saving_over_an_adapter_replaces_it(tmp_path):
    batch = make_batch()
    _trained("bert-seq-cls", seed=1).save_pretrained(tmp_path)
    second = _trained("bert-seq-cls", seed=2)
    second.save_pretrained(tmp_path)
    assert sorted(_files(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    reloaded = LoraModel.from_pretrained(tiny_bert_cls(), tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, batch), _logits(second, batch), rtol=1e-5, atol=1e-5)


# --- no pickles -----------------------------------------------------------------------------------------
@pytest.fixture
def no_torch_load(monkeypatch):
    def forbidden(*args, **kwargs):
        pytest.fail("torch.load was called on an untrusted file")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.serialization, "load", forbidden)


def test_pickled_only_directory_is_refused_without_unpickling(tmp_path, monkeypatch):
    torch.save({"base_model.model.x.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "adapter_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    monkeypatch.setattr(torch.serialization, "load", lambda *a, **k: pytest.fail("torch.load called"))
    base = tiny_bert_cls()
    snapshot = _snapshot(base)
    with pytest.raises(LorafitError, match="adapter_model.bin"):
        LoraModel.from_pretrained(base, tmp_path)
    _assert_unchanged(base, snapshot)


def test_peft_pickled_adapter_is_refused_without_unpickling(tmp_path, no_torch_load):
    peft_model = peft.get_peft_model(tiny_bert_cls(), peft.LoraConfig(task_type="SEQ_CLS", r=2))
    peft_model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists() and (tmp_path / "adapter_config.json").exists()
    with pytest.raises(LorafitError, match="safetensors"):
        LoraModel.from_pretrained(tiny_bert_cls(), tmp_path)


def test_not_an_adapter_directory(tmp_path, no_torch_load):
    with pytest.raises(LorafitError, match="adapter_config.json"):
        LoraModel.from_pretrained(tiny_bert_cls(), tmp_path)


# --- wrong base -----------------------------------------------------------------------------------------
def test_wrong_hidden_size_names_module_and_shapes_and_changes_nothing(tmp_path):
    _trained("bert-seq-cls").save_pretrained(tmp_path)
    wide = tiny_bert_cls(hidden_size=48)
    snapshot = _snapshot(wide)
    with pytest.raises(LorafitError) as excinfo:
        LoraModel.from_pretrained(wide, tmp_path)
    message = str(excinfo.value)
    assert "bert.encoder.layer.0.attention.self.query" in message
    assert "(4, 32)" in message and "(4, 48)" in message  # lora_A: (r, hidden) in the file and here
    _assert_unchanged(wide, snapshot)


def test_wrong_base_on_a_model_with_an_adapter_changes_nothing(tmp_path):
    source = get_lora_model(tiny_bert_cls(intermediate_size=20),
                            LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "intermediate.dense"]))
    source.save_pretrained(tmp_path)
    lora = _trained("bert-seq-cls")
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    modules = [(n, type(m).__name__) for n, m in lora.named_modules()]
    with pytest.raises(LorafitError) as excinfo:
        lora.load_adapter(tmp_path, "second")
    assert "bert.encoder.layer.0.intermediate.dense" in str(excinfo.value)
    assert "(20, 2)" in str(excinfo.value) and "(37, 2)" in str(excinfo.value)
    assert list(lora.peft_config) == ["default"]
    assert [(n, type(m).__name__) for n, m in lora.named_modules()] == modules
    assert list(lora.state_dict()) == list(before)
    for k, v in lora.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_model_lacking_the_modules_names_them_and_changes_nothing(tmp_path):
    _trained("bert-seq-cls").save_pretrained(tmp_path)
    llama = tiny_llama()
    snapshot = _snapshot(llama)
    with pytest.raises(LorafitError) as excinfo:
        LoraModel.from_pretrained(llama, tmp_path)
    assert "query" in str(excinfo.value)
    _assert_unchanged(llama, snapshot)


def test_model_with_fewer_layers_names_the_missing_module(tmp_path):
    _trained("bert-seq-cls").save_pretrained(tmp_path)
    short = tiny_bert_cls(num_hidden_layers=1)
    snapshot = _snapshot(short)
    with pytest.raises(LorafitError) as excinfo:
        LoraModel.from_pretrained(short, tmp_path)
    assert "bert.encoder.layer.1.attention.self.query" in str(excinfo.value)
    _assert_unchanged(short, snapshot)


def test_head_of_another_size_is_refused(tmp_path):
    _trained("bert-seq-cls").save_pretrained(tmp_path)
    three_labels = tiny_bert_cls(num_labels=3)
    snapshot = _snapshot(three_labels)
    with pytest.raises(LorafitError) as excinfo:
        LoraModel.from_pretrained(three_labels, tmp_path)
    message = str(excinfo.value)
    assert "classifier" in message and "(2" in message and "(3" in message
    _assert_unchanged(three_labels, snapshot)


def test_incomplete_adapter_file_is_refused(tmp_path):
    _trained("gpt2-conv1d").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    dropped = sorted(tensors)[-1]
    del tensors[dropped]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    base = tiny_gpt2()
    snapshot = _snapshot(base)
    with pytest.raises(LorafitError, match="incomplete"):
        LoraModel.from_pretrained(base, tmp_path)
    _assert_unchanged(base, snapshot)


def test_dora_config_without_magnitude_vectors_is_refused_as_incomplete(tmp_path):
    _trained("gpt2-conv1d").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LorafitError, match="incomplete: no tensor '.*c_attn.lora_magnitude_vector'"):
        LoraModel.from_pretrained(tiny_gpt2(), tmp_path)


@pytest.mark.parametrize("config", [
    dict(r=4, target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.up_proj": 6},
         alpha_pattern={"q_proj": 3}, use_rslora=True),
    dict(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
    dict(r=2, target_modules=r".*\.(q|v)_proj", exclude_modules=["layers.0.self_attn.q_proj"]),
], ids=["patterns", "layers", "regex-exclude"])
def test_peft_adapters_with_patterns_and_layers_round_trip(config, tmp_path):
    batch = make_batch()
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(init_lora_weights=False, **config)).eval()
    expected = _logits(peft_model, batch)
    assert (expected - _logits(tiny_llama(), batch)).abs().max() > 1e-3
    peft_model.save_pretrained(tmp_path / "theirs")
    ours = LoraModel.from_pretrained(tiny_llama(), tmp_path / "theirs").eval()
    torch.testing.assert_close(_logits(ours, batch), expected, rtol=1e-5, atol=1e-5)
    their_layers = sorted(n for n, m in peft_model.base_model.model.named_modules()
                          if isinstance(m, peft.tuners.lora.LoraLayer))
    assert sorted(n for n, m in ours.model.named_modules() if isinstance(m, LoraLayer)) == their_layers
    ours.save_pretrained(tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(again, batch), expected, rtol=1e-5, atol=1e-5)
