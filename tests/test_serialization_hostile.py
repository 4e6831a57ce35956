"""Hostile adapter files: every tensor checked before the model changes, any failure undone, damaged files
and pickles refused in one line."""

from __future__ import annotations

import json
import pathlib
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_bert_cls
from lorafit import LoraConfig, LoraModel, LorafitError, get_lora_model
from test_serialization import _assert_unchanged, _snapshot, _trained


# --- hostile adapters: every tensor checked before anything changes, every change undone on failure ----------
def _lora_snapshot(lora: LoraModel) -> dict:
    return {**_snapshot(lora), "adapters": list(lora.peft_config), "active": lora.active_adapter}


def _assert_lora_unchanged(lora: LoraModel, snapshot: dict) -> None:
    assert list(lora.peft_config) == snapshot["adapters"] and lora.active_adapter == snapshot["active"]
    assert [(n, type(m).__name__) for n, m in lora.named_modules()] == snapshot["modules"]
    state = lora.state_dict()
    assert list(state) == list(snapshot["state"])
    for key, value in snapshot["state"].items():
        assert torch.equal(state[key], value), key
    assert {n: p.requires_grad for n, p in lora.named_parameters()} == snapshot["grad"]


def test_bias_all_adapter_onto_another_feed_forward_size_is_refused_and_changes_nothing(tmp_path):
    _trained("bert-bias-all").save_pretrained(tmp_path)
    narrow = tiny_bert_cls(intermediate_size=20)
    snapshot = _snapshot(narrow)
    with pytest.raises(LorafitError) as excinfo:
        LoraModel.from_pretrained(narrow, tmp_path)
    message = str(excinfo.value)
    assert "bert.encoder.layer.0.intermediate.dense.bias" in message and "(37,)" in message and "(20,)" in message
    _assert_unchanged(narrow, snapshot)


def test_bias_all_adapter_via_load_adapter_changes_nothing(tmp_path):
    _trained("bert-bias-all").save_pretrained(tmp_path)
    lora = get_lora_model(tiny_bert_cls(intermediate_size=20),
                          LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    snapshot = _lora_snapshot(lora)
    with pytest.raises(LorafitError, match="intermediate.dense.bias"):
        lora.load_adapter(tmp_path, "second")
    _assert_lora_unchanged(lora, snapshot)


def test_a_tensor_for_a_parameter_the_model_lacks_is_refused(tmp_path):
    _trained("bert-bias-all").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.bert.encoder.layer.0.output.gate.bias"] = torch.zeros(32)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    base = tiny_bert_cls()
    snapshot = _snapshot(base)
    with pytest.raises(LorafitError, match=r"bert\.encoder\.layer\.0\.output\.gate"):
        LoraModel.from_pretrained(base, tmp_path)
    _assert_unchanged(base, snapshot)


def test_an_adapter_without_its_trained_head_is_refused(tmp_path):
    _trained("bert-seq-cls").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    del tensors["base_model.model.classifier.weight"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    base = tiny_bert_cls()
    snapshot = _snapshot(base)
    with pytest.raises(LorafitError, match="incomplete.*classifier.weight"):
        LoraModel.from_pretrained(base, tmp_path)
    _assert_unchanged(base, snapshot)


def test_modules_to_save_the_model_lacks_are_refused_before_any_wrapping(tmp_path):
    _trained("bert-seq-cls").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["modules_to_save"] = ["classifier", "ranker"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    base = tiny_bert_cls()
    snapshot = _snapshot(base)
    with pytest.raises(LorafitError, match="ranker"):
        LoraModel.from_pretrained(base, tmp_path, is_trainable=True)
    _assert_unchanged(base, snapshot)


def test_a_failure_while_copying_undoes_everything(tmp_path, monkeypatch):
    """Whatever fails after the checks (here: the fourth tensor copy), the model is put back as it was."""
    _trained("bert-bias-all").save_pretrained(tmp_path)
    lora = get_lora_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["value"]))
    snapshot = _lora_snapshot(lora)
    copies, real_copy = [], torch.Tensor.copy_

    def failing_copy(self, *args, **kwargs):
        copies.append(1)
        if len(copies) == 4:
            raise RuntimeError("disk went away")
        return real_copy(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", failing_copy)
    with pytest.raises(RuntimeError, match="disk went away"):
        lora.load_adapter(tmp_path, "second", is_trainable=True)
    monkeypatch.undo()
    assert len(copies) >= 4
    _assert_lora_unchanged(lora, snapshot)


def test_load_weights_refuses_another_rank_or_alpha(tmp_path):
    lora = get_lora_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    snapshot = _lora_snapshot(lora)
    get_lora_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=1, target_modules=["query"],
                                               init_lora_weights=False)).save_pretrained(tmp_path / "r1")
    with pytest.raises(LorafitError, match=r"\(1, 32\).*\(4, 32\)"):  # r=1 would broadcast into r=4
        lora.load_weights(tmp_path / "r1", "default")
    _assert_lora_unchanged(lora, snapshot)
    get_lora_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=32, target_modules=["query"],
                                               init_lora_weights=False)).save_pretrained(tmp_path / "alpha")
    with pytest.raises(LorafitError, match="lora_alpha"):
        lora.load_weights(tmp_path / "alpha", "default")
    _assert_lora_unchanged(lora, snapshot)


# --- damaged adapter files: one line naming the file and the fix -----------------------------------------
def test_truncated_weights_file_is_one_clear_error(tmp_path):
    _trained("bert-seq-cls").save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    base = tiny_bert_cls()
    snapshot = _snapshot(base)
    with pytest.raises(LorafitError, match="adapter_model.safetensors.*damaged"):
        LoraModel.from_pretrained(base, tmp_path)
    _assert_unchanged(base, snapshot)


@pytest.mark.parametrize("edit, fragment", [
    (lambda text, data: "{\"r\": 4,", "not valid JSON"),
    (lambda text, data: "[1, 2]", "JSON object"),
    (lambda text, data: json.dumps({**data, "r": "4"}), "'r'"),
    (lambda text, data: json.dumps({**data, "target_modules": 5}), "'target_modules'"),
    (lambda text, data: json.dumps({**data, "rank_pattern": []}), "'rank_pattern'"),
    (lambda text, data: json.dumps({**data, "layers_to_transform": "abc"}), "'layers_to_transform'"),
    (lambda text, data: json.dumps({k: v for k, v in data.items() if k != "r"}), "'r'"),
    (lambda text, data: json.dumps({k: v for k, v in data.items() if k != "target_modules"}), "'target_modules'"),
], ids=["invalid-json", "list", "r-string", "targets-int", "rank-pattern-list", "layers-string", "no-r", "no-targets"])
def test_damaged_adapter_config_is_one_clear_error(tmp_path, edit, fragment):
    _trained("bert-seq-cls").save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    text = path.read_text()
    path.write_text(edit(text, json.loads(text)))
    base = tiny_bert_cls()
    snapshot = _snapshot(base)
    with pytest.raises(LorafitError) as excinfo:
        LoraModel.from_pretrained(base, tmp_path)
    assert "adapter_config.json" in str(excinfo.value) and fragment in str(excinfo.value)
    _assert_unchanged(base, snapshot)


class _Payload:
    """Unpickling this creates ``marker``: if the file appears, the loader ran the adapter's pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("with_config", [True, False])
def test_a_pickled_adapter_with_a_payload_never_runs(tmp_path, with_config):
    adapter = tmp_path / "hostile"
    _trained("bert-seq-cls").save_pretrained(adapter)
    (adapter / "adapter_model.safetensors").unlink()
    if not with_config:
        (adapter / "adapter_config.json").unlink()
    marker = tmp_path / "payload-ran"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(LorafitError, match="adapter_model"):
        LoraModel.from_pretrained(tiny_bert_cls(), adapter)
    assert not marker.exists()
