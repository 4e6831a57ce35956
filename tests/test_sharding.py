"""FSDP (lorafit.training.sharding): `lorafit train` under accelerate's FSDP on two CPU processes (gloo), launched as
users launch it (`accelerate launch --use_fsdp`, BERT's layers auto-wrapped), FSDP1 and FSDP2.

A sharded run must train the adapter a one-process run trains (dropout 0), evaluate and end on the
whole model, save whole adapters and checkpoints in the one-process format, write its run folder once,
and resume after SIGKILL to the uninterrupted sharded run's result.
"""

from __future__ import annotations

import contextlib
import functools
import io
import shutil
from pathlib import Path

import pytest
import torch

from test_cli import _train_or_fail, adapter_tensors, read_jsonl
from test_distributed import data  # noqa: F401 (the fixture)
from test_distributed import (ADAPTER_TOLERANCE, kill_at_first_checkpoint, launch, launched, on_two_processes,
                              run_args)

# 30 examples in batches of 8; checkpoints and evaluations every 3 steps
STEPS = 9
EXTRA = ["--lora-dropout", "0", "--max-steps", STEPS, "--save-strategy", "steps", "--save-steps", "3",
         "--keep-checkpoints", "5", "--test-file", None]
FINAL_KEYS = ("validation_loss", "validation_accuracy", "test_loss", "test_accuracy")


def extra(data: dict) -> list:
    return [data["validation"] if value is None else value for value in EXTRA]  # the test split: validation's rows


def summary(out: str) -> dict:
    """The final metrics a run printed (`key: value` lines)."""
    pairs = (line.split(": ", 1) for line in out.splitlines() if ": " in line)
    return {key: float(value) for key, value in pairs if key in FINAL_KEYS}


@pytest.fixture(scope="module")
def one(data, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("one") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _train_or_fail(["train", *run_args(data, output, *extra(data))])
    return output, summary(printed.getvalue())


_RUNS: dict[int, tuple[Path, str]] = {}


def fsdp_run(version: int, data: dict, root: Path) -> tuple[Path, str]:
    """An uninterrupted two-process run under FSDP ``version``, once per session."""
    if version not in _RUNS:
        output = root / f"fsdp{version}"
        _RUNS[version] = output, launched(run_args(data, output, *extra(data)), fsdp=version)
    return _RUNS[version]


def max_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 2])
def test_fsdp_run_trains_the_one_process_adapter(version, data, one, tmp_path_factory):
    (alone, final_alone), (sharded, out) = one, fsdp_run(version, data, tmp_path_factory.mktemp(f"fsdp{version}"))
    assert f"FSDP{version}: each of the 2 processes holds a shard of the model" in out  # accelerate did shard it
    assert out.count("Adapter saved to") == 1  # the main process alone prints
    # the run folder written once, as one process writes it: no second best/, no temporaries
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in alone.iterdir())
    for adapter in ("best", *(f"checkpoint-{step}/adapter" for step in range(3, STEPS + 1, 3))):
        a, b = adapter_tensors(alone / adapter), adapter_tensors(sharded / adapter)
        assert sorted(a) == sorted(b) and all(a[k].shape == b[k].shape for k in a), adapter  # complete, whole
        assert max(b[k].abs().max().item() for k in b if "lora_B" in k) > 1e-3  # B moved from zero
        assert max_difference(a, b) <= ADAPTER_TOLERANCE, f"{adapter}: {max_difference(a, b)}"
    for step in range(3, STEPS + 1, 3):  # optimizer state in the one-process format: same keys, whole shapes
        a = adapter_tensors(alone / f"checkpoint-{step}" / "optimizer.safetensors")
        b = adapter_tensors(sharded / f"checkpoint-{step}" / "optimizer.safetensors")
        assert sorted(a) == sorted(b) and all(a[k].shape == b[k].shape for k in a)
        assert max_difference(a, b) <= ADAPTER_TOLERANCE, f"step {step}: {max_difference(a, b)}"
    for r1, r2 in zip(read_jsonl(alone / "metrics.jsonl"), read_jsonl(sharded / "metrics.jsonl"), strict=True):
        assert (r2["step"], r2["epoch"], r2["accuracy"]) == (r1["step"], r1["epoch"], r1["accuracy"])
        assert r2["loss"] == pytest.approx(r1["loss"], abs=2e-6)
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], abs=2e-6)
    final = summary(out)  # evaluated after best/ was restored into the sharded model
    assert final.keys() == final_alone.keys() == set(FINAL_KEYS)
    for key, value in final_alone.items():
        assert final[key] == pytest.approx(value, abs=2e-6), key


@pytest.mark.slow
def test_killed_fsdp_run_resumes_to_the_uninterrupted_result(data, tmp_path, tmp_path_factory):
    whole, _ = fsdp_run(1, data, tmp_path_factory.mktemp("fsdp1"))
    killed = tmp_path / "killed"
    kill_at_first_checkpoint(launch(run_args(data, killed, *extra(data)), fsdp=1), killed, STEPS)
    on_one = tmp_path / "on-one"  # the same checkpoint, resumed on one process without FSDP
    shutil.copytree(killed, on_one)
    (on_one / ".lorafit.lock").unlink(missing_ok=True)
    launched(["--output-dir", killed, "--resume"], fsdp=1)
    _train_or_fail(["train", "--output-dir", on_one, "--resume"])
    assert read_jsonl(killed / "metrics.jsonl") == read_jsonl(whole / "metrics.jsonl")
    for adapter in ("best", f"checkpoint-{STEPS}/adapter"):
        a, b = adapter_tensors(whole / adapter), adapter_tensors(killed / adapter)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), adapter
        c = adapter_tensors(on_one / adapter)  # the checkpoint's format does not depend on the sharding
        assert sorted(a) == sorted(c) and max_difference(a, c) <= ADAPTER_TOLERANCE, adapter


# --- in-process groups: the whole model and checkpoints under FSDP, on two gloo processes -----------------
SHARDINGS = ("1", "2", "1 checkpointed", "2 checkpointed")  # FSDP versions, activation checkpointing
EVAL_COUNTS = (7, 1)  # shares of 4 and 3 examples; of 1 and none (a process with no batch at all)


def _classifier(num_labels: int = 3):
    """A LoRA classifier with a trained copy of its head (what FSDP2 reshards when its state dict is taken)."""
    from conftest import tiny_bert_cls
    from lorafit import LoraConfig, get_lora_model

    return get_lora_model(tiny_bert_cls(num_labels=num_labels), LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules=["query", "value"], init_lora_weights=False))


def _shard(model, version: int, checkpointed: bool):
    """FSDP as accelerate applies it: each BERT layer wrapped (FSDP1, use_orig_params) or sharded, then the whole;
    ``checkpointed``: with its fsdp_activation_checkpointing, which wraps each layer once more."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl,
                                                                             apply_activation_checkpointing,
                                                                             checkpoint_wrapper)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.bert.modeling_bert import BertLayer

    wrap = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    if version == 1:
        sharded = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({BertLayer}),
                                           use_orig_params=True, device_id=torch.device("cpu"))
        if checkpointed:  # after wrapping, as accelerate does
            apply_activation_checkpointing(sharded, checkpoint_wrapper_fn=wrap,
                                           auto_wrap_policy=ModuleWrapPolicy({BertLayer}))
        return sharded
    mesh = init_device_mesh("cpu", (2,))
    layers = model.model.bert.encoder.layer
    for index, layer in enumerate(layers):
        layers[index] = wrap(layer) if checkpointed else layer  # before sharding, as accelerate's fsdp2_apply_ac
        fully_shard(layers[index], mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _evaluations(model) -> list[dict]:
    from lorafit.tasks.classification import evaluate_classifier
    from test_distributed import _examples, _pad

    return [evaluate_classifier(model, _examples(count, False), _pad, batch_size=2, names=["a", "b", "c"])
            for count in EVAL_COUNTS]


def _adam_step(model, sharded=None) -> torch.optim.Optimizer:
    from conftest import make_batch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    batch = make_batch()
    (sharded or model)(**batch).logits.square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def _sharded_work(tmp_path: Path) -> dict:
    """Per FSDP version: evaluation on the whole model, the optimizer state saved and loaded back, an adapter
    loaded into the sharded model and saved again, and a training step after all that."""
    from lorafit.training.checkpoint import _optimizer_tensors
    from lorafit.training.distributed import on_main_process
    from lorafit.training.sharding import ShardedModel, whole_model
    from safetensors.torch import save_file

    results = {}
    for version in SHARDINGS:
        model = _classifier()
        shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
        sharded = _shard(model, int(version[0]), version.endswith("checkpointed"))
        with whole_model(sharded):
            metrics = _evaluations(model)
        optimizer = _adam_step(model, sharded)
        handle = ShardedModel(sharded, model, shapes)
        state = handle.optimizer_state(optimizer)
        saved = tmp_path / f"optimizer{version}.safetensors"
        on_main_process(lambda: save_file(_optimizer_tensors(state)[0], str(saved)))
        handle.load_optimizer_state(optimizer, state)  # back in from the whole state (resuming is checked above)
        handle.load_adapter(tmp_path / "trained")  # the one-process adapter, into every shard
        with whole_model(sharded):
            on_main_process(lambda: model.save_pretrained(tmp_path / f"loaded{version}"))
            after = _evaluations(model)  # with the loaded adapter
        _adam_step(model, sharded)  # still trains sharded after the blocks
        results[version] = {"metrics": metrics, "after": after}
    return results


def test_whole_model_evaluates_loads_and_saves_under_fsdp(tmp_path):
    from lorafit.training.checkpoint import _optimizer_tensors

    alone = _classifier()
    expected = _evaluations(alone)
    optimizer = _adam_step(alone)
    moments = _optimizer_tensors(optimizer.state_dict())[0]
    alone.save_pretrained(tmp_path / "trained")  # after one step: differs from every process's start
    trained_metrics = _evaluations(alone)
    both = on_two_processes(_sharded_work, tmp_path)
    assert both[0] == both[1]  # every process gets the whole result
    for version in SHARDINGS:
        result = both[0][version]
        # processes with unequal shares (one with none) evaluate without waiting for each other
        for sharded, reference in zip(result["metrics"] + result["after"], expected + trained_metrics, strict=True):
            assert sharded.keys() == reference.keys()
            assert sharded["confusion_matrix"] == reference["confusion_matrix"], version
            assert sharded["loss"] == pytest.approx(reference["loss"], abs=2e-6), version
        saved = adapter_tensors(tmp_path / f"optimizer{version}.safetensors")
        assert sorted(saved) == sorted(moments) and all(saved[k].shape == moments[k].shape for k in saved)
        assert max_difference(saved, moments) <= 1e-6, version
        loaded, reference = adapter_tensors(tmp_path / f"loaded{version}"), adapter_tensors(tmp_path / "trained")
        assert sorted(loaded) == sorted(reference) and all(torch.equal(loaded[k], reference[k]) for k in reference)
