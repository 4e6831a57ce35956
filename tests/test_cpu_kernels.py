"""oneDNN is off inside lorafit's loops for fp32 CPU transformers, kept where it is the fast path, always restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_bert_cls
from lorafit import LoraConfig, get_lora_model
from lorafit.tasks.classification import predict_logits
from lorafit.fast.cpu_kernels import shape_free_kernels


@pytest.fixture(autouse=True)
def onednn_on():
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = True
    yield
    torch.backends.mkldnn.enabled = before


def test_fp32_cpu_transformer_runs_without_onednn_and_gets_it_back():
    with shape_free_kernels(tiny_bert_cls()):
        assert not torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled


def test_restored_after_an_error():
    with pytest.raises(RuntimeError, match="boom"):
        with shape_free_kernels(tiny_bert_cls()):
            raise RuntimeError("boom")
    assert torch.backends.mkldnn.enabled


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Conv1d(4, 4, 3), nn.GELU()),  # convolutions are oneDNN's strength
    nn.Linear(4, 4).to(torch.bfloat16),  # so are bf16 matmuls
    nn.GELU(),  # nothing to tell device or precision from
], ids=["conv", "bf16", "no-parameters"])
def test_onednn_stays_on_where_it_is_the_fast_path(model):
    with shape_free_kernels(model):
        assert torch.backends.mkldnn.enabled


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_onednn_stays_on_for_an_fp32_model_that_autocast_runs_in_low_precision(dtype):
    with shape_free_kernels(tiny_bert_cls(), compute_dtype=dtype):
        assert torch.backends.mkldnn.enabled


def test_a_user_who_turned_onednn_off_keeps_it_off():
    torch.backends.mkldnn.enabled = False
    with shape_free_kernels(tiny_bert_cls()):
        assert not torch.backends.mkldnn.enabled
    assert not torch.backends.mkldnn.enabled


def test_gelu_gives_the_same_values_either_way():
    x = torch.randn(3, 17, 37, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with_onednn = nn.functional.gelu(x)
    (grad_with,) = torch.autograd.grad(with_onednn.sum(), x)
    with shape_free_kernels(nn.Linear(2, 2)):
        without = nn.functional.gelu(x)
        (grad_without,) = torch.autograd.grad(without.sum(), x)
    torch.testing.assert_close(without, with_onednn, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_without, grad_with, rtol=1e-6, atol=1e-6)


def test_prediction_runs_inside_it():
    model = get_lora_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(torch.backends.mkldnn.enabled))
    examples = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}]
    collate = lambda rows: {"input_ids": torch.tensor([r["input_ids"] + [0] * (3 - len(r["input_ids"]))  # noqa: E731
                                                       for r in rows])}
    predict_logits(model, examples, collate, batch_size=1)
    assert seen == [False, False] and torch.backends.mkldnn.enabled
