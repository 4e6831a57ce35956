"""Loading an adapter with its base for the inference commands: damaged or unsafe files get one line, exit 2."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from test_cli import assert_one_line_error, run_cli, single_thread, small_run, snapshot, tiny_bert_dir  # noqa: F401


def _damage_json(name: str, text: str):
    def damage(adapter):
        (adapter / name).write_text(text, encoding="utf-8")
    return damage


def _edit_json(name: str, **changes):
    def damage(adapter):
        data = json.loads((adapter / name).read_text(encoding="utf-8"))
        (adapter / name).write_text(json.dumps({**data, **changes}), encoding="utf-8")
    return damage


def _truncate(adapter):
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


DAMAGE = {
    "weights-truncated": (_truncate, "adapter_model.safetensors"),
    "config-invalid-json": (_damage_json("adapter_config.json", "{\"r\": "), "adapter_config.json"),
    "config-not-an-object": (_damage_json("adapter_config.json", "\"LORA\""), "adapter_config.json"),
    "config-wrong-type": (_edit_json("adapter_config.json", lora_alpha="sixteen"), "lora_alpha"),
    "config-base-wrong-type": (_edit_json("adapter_config.json", base_model_name_or_path=["x"]),
                               "base_model_name_or_path"),
    "info-invalid-json": (_damage_json("lorafit.json", "{\"task\": \"classification\""), "lorafit.json"),
    "info-not-an-object": (_damage_json("lorafit.json", "[]"), "lorafit.json"),
    "info-id2label-list": (_edit_json("lorafit.json", id2label=["neg", "pos"]), "id2label"),
    "info-id2label-keys": (_edit_json("lorafit.json", id2label={"neg": "neg"}), "id2label"),
    "info-id2label-gap": (_edit_json("lorafit.json", id2label={"0": "neg", "2": "pos"}), "id2label"),
    "info-task-unknown": (_edit_json("lorafit.json", task=5), "task"),
    "info-max-length": (_edit_json("lorafit.json", max_length="long"), "max_length"),
}


@pytest.mark.parametrize("command", ["merge", "predict"])
@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_adapter_files_are_one_line_and_change_nothing(tmp_path, capsys, small_run, case, command):
    damage, fragment = DAMAGE[case]
    adapter = tmp_path / "adapter"
    shutil.copytree(small_run.best, adapter)
    damage(adapter)
    before = snapshot(adapter)
    out = tmp_path / "out"
    args = ["--output", out] if command == "merge" else ["a great film"]
    code, _, err = run_cli(capsys, command, "--adapter", adapter, *args)
    assert_one_line_error(code, err, str(adapter), fragment)
    assert snapshot(adapter) == before
    assert not out.exists()


# --- pickled base models are refused like pickled adapters -------------------------------------------------
@pytest.fixture
def pickled_base(tmp_path, tiny_bert_dir):
    """The tiny BERT with its weights as pytorch_model.bin only, written here (we trust our own pickle)."""
    from safetensors.torch import load_file

    base = tmp_path / "pickled-base"
    shutil.copytree(tiny_bert_dir, base)
    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    return base


@pytest.fixture
def no_torch_load(monkeypatch):
    def forbidden(*args, **kwargs):
        pytest.fail("torch.load was called on a user's file")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.serialization, "load", forbidden)


@pytest.mark.parametrize("loader", ["load_classifier", "load_causal_lm"])
def test_pickled_base_model_is_refused_without_unpickling(pickled_base, no_torch_load, loader):
    from lorafit import LorafitError
    from lorafit.inference import base_models as models

    kwargs = {"num_labels": 2, "id2label": {0: "neg", 1: "pos"}, "label2id": {"neg": 0, "pos": 1}} \
        if loader == "load_classifier" else {}
    with pytest.raises(LorafitError) as excinfo, single_thread():
        getattr(models, loader)(str(pickled_base), **kwargs)
    message = str(excinfo.value)
    assert str(pickled_base) in message and "pytorch_model.bin" in message and "safetensors" in message
    assert "\n" not in message


def test_pickled_base_model_on_the_command_line(tmp_path, capsys, small_run, pickled_base, no_torch_load):
    before = snapshot(pickled_base)
    code, _, err = run_cli(capsys, "merge", "--adapter", small_run.best, "--model", pickled_base,
                           "--output", tmp_path / "out")
    assert_one_line_error(code, err, str(pickled_base), "pytorch_model.bin", "save_pretrained")
    assert snapshot(pickled_base) == before and not (tmp_path / "out").exists()


class _Payload:
    """Unpickling this creates ``marker``: if the file appears, some loader ran a user's pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_base_with_a_payload_never_runs(tmp_path, capsys, small_run, tiny_bert_dir):
    base = tmp_path / "hostile-base"
    shutil.copytree(tiny_bert_dir, base)
    (base / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    (base / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    code, _, err = run_cli(capsys, "merge", "--adapter", small_run.best, "--model", base, "--output", tmp_path / "out")
    assert_one_line_error(code, err, "pytorch_model.bin")
    assert not marker.exists()



def test_adapters_trained_on_differently_quantized_bases_need_one_quantize(tmp_path):
    """The base is loaded once for every --adapter: quantized as the first was trained, the others would run on a
    base they were not trained on."""
    from test_causal_lm import save_tiny_model

    from lorafit import LoraConfig, LoraModel, LorafitError
    from lorafit.inference.adapter_info import save_adapter_info
    from lorafit.inference.base_models import load_causal_lm
    from lorafit.inference.loading import load_adapters

    base_dir = save_tiny_model(tmp_path / "base", "llama")
    for name, recorded in [("plain", {}), ("qlora", {"quantization": {"quantize": "4bit"}})]:
        LoraModel(load_causal_lm(base_dir), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / name)
        save_adapter_info(tmp_path / name, {"task": "causal-lm", "base_model": base_dir, **recorded})
    with pytest.raises(LorafitError, match=r"'qlora' .*4bit.* but 'plain' .*unquantized.*pass --quantize"):
        load_adapters({"plain": tmp_path / "plain", "qlora": tmp_path / "qlora"}, None)
