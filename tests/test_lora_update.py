"""The fast LoRA update's choice between adding ``B A x`` to the base output and one GEMM on the merged
weight: which it takes, and that either gives the plain path's output (rtol 1e-5 / atol 1e-6, fp32)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorafit import LoraConfig, fast, get_lora_model
from lorafit.fast import lora_update

OUT = {"rtol": 1e-5, "atol": 1e-6}
IN, OUT_FEATURES = 24, 16  # the merged weight pays from 2 * 24 * 16 / 40 = 19.2 tokens on


@pytest.fixture(autouse=True)
def _fast_paths_allowed(monkeypatch):
    monkeypatch.delenv(fast.ENV_SWITCH, raising=False)


@pytest.fixture
def merges(monkeypatch):
    """The layers whose forward took the merged weight."""
    import lorafit.layers

    taken = []

    def recording(layer, x):
        result = lora_update.weight_side_forward(layer, x)
        if result is not None:
            taken.append(layer)
        return result

    monkeypatch.setattr(lorafit.layers, "weight_side_forward", recording)
    return taken


def lora_layer(fast_on: bool = True, dropout: float = 0.0, use_dora: bool = False, base=None, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(base if base is not None else nn.Linear(IN, OUT_FEATURES))
    lora = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0"],
                                            init_lora_weights=False, use_dora=use_dora))
    fast.use_fast_paths(lora, fast_on)
    return lora.eval()


def plain_output(x: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return lora_layer(fast_on=False, **kwargs).get_base_model()(x)


def test_many_tokens_without_a_graph_use_the_merged_weight_and_give_the_plain_output(merges):
    x = torch.randn(4, 10, IN)  # 40 tokens
    lora = lora_layer()
    weight = lora.get_base_model()[0].base_layer.weight.clone()
    with torch.inference_mode():
        out = lora.get_base_model()(x)
    assert len(merges) == 1
    torch.testing.assert_close(out, plain_output(x), **OUT)
    assert torch.equal(lora.get_base_model()[0].base_layer.weight, weight)  # the base weight is left as it was


def test_few_tokens_add_the_update_instead(merges):
    x = torch.randn(2, 5, IN)  # 10 tokens: streaming them costs less than a pass over the weight
    with torch.no_grad():
        out = lora_layer().get_base_model()(x)
    assert merges == []
    torch.testing.assert_close(out, plain_output(x), **OUT)


def test_training_forward_records_its_graph_through_the_factors(merges):
    lora = lora_layer().train()
    x = torch.randn(4, 10, IN)
    lora.get_base_model()(x).sum().backward()
    assert merges == []
    assert lora.get_base_model()[0].lora_B["default"].weight.grad is not None


def test_active_lora_dropout_keeps_the_update_on_its_own_input(merges):
    lora = lora_layer(dropout=0.5).train()
    with torch.no_grad():
        lora.get_base_model()(torch.randn(4, 10, IN))
    assert merges == []


@pytest.mark.parametrize("case", ["dora", "conv1d", "hooked base", "autocast", "fast off"])
def test_cases_it_leaves_to_the_update_give_the_plain_output(case, merges):
    x = torch.randn(4, 10, IN)
    kwargs = {"use_dora": True} if case == "dora" else {"base": Conv1D(OUT_FEATURES, IN)} if case == "conv1d" else {}
    lora = lora_layer(fast_on=case != "fast off", **kwargs)
    layer = lora.get_base_model()[0]
    if case == "hooked base":  # accelerate's offloading, for one, hooks the base layer's forward
        layer.base_layer.register_forward_pre_hook(lambda module, args: None)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        out = layer(x)
    assert merges == []
    if case != "autocast":  # bf16 rounds differently on either path
        torch.testing.assert_close(out, plain_output(x, **kwargs), **OUT)


def classifier_logits(fast_on: bool, adapter_names: list[str] | None = None) -> torch.Tensor:
    from conftest import make_batch, tiny_bert_cls

    model = get_lora_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear",
                                                       init_lora_weights=False))
    model.add_adapter("other", LoraConfig(task_type="SEQ_CLS", r=2, target_modules="all-linear",
                                          init_lora_weights=False))
    model.set_adapter("default")
    fast.use_fast_paths(model, fast_on)
    with torch.inference_mode():
        return model.eval()(**make_batch(batch=8, seq=12), adapter_names=adapter_names).logits


def test_every_linear_of_a_classifier_gives_the_plain_logits(merges):
    fast_logits = classifier_logits(True)
    assert merges  # 96 tokens: the encoder's layers take the merged weight
    torch.testing.assert_close(fast_logits, classifier_logits(False), **OUT)


def test_a_mixed_batch_keeps_each_row_on_its_own_adapter(merges):
    names = ["default", "other", "__base__", "other", "default", "default", "other", "__base__"]
    fast_logits = classifier_logits(True, names)
    assert merges == []
    torch.testing.assert_close(fast_logits, classifier_logits(False, names), **OUT)
