"""PEFT's API names on a lorafit model, checked against the real `peft`: disabling adapters (also with
trained biases), base_model, set_requires_grad and the state-dict helpers."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

from conftest import tiny_bert_cls, tiny_llama  # noqa: E402
from test_interop import (ATOL, _quiet, assert_close, batch_for, logits, lorafit_adapter, peft_adapter,  # noqa: E402
                          randomise_)

from lorafit import LoraConfig, LorafitError, get_lora_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_disabled_adapter_with_trained_biases_is_the_base_model(bias):
    """Biases a bias mode trains live in the base model; disabled, they hold their base values (PEFT keeps
    the trained ones and only warns), and come back trained afterwards."""
    model = get_lora_model(tiny_bert_cls(0), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                                        bias=bias))
    randomise_(model)
    batch = batch_for(model.model)
    trained = logits(model, batch)
    base = logits(tiny_bert_cls(0), batch)
    with model.disable_adapter():
        assert_close(logits(model, batch), base)
    assert_close(logits(model, batch), trained)
    model.disable_adapter_layers()
    assert_close(logits(model, batch), base)
    model.enable_adapter_layers()
    assert_close(logits(model, batch), trained)
    # PEFT, for the record: its disabled model still carries the trained biases
    with _quiet():
        theirs = peft.get_peft_model(tiny_bert_cls(0), peft.LoraConfig(task_type="SEQ_CLS", r=4, bias=bias,
                                                                       target_modules=["query", "value"]))
    randomise_(theirs)
    with _quiet(), theirs.disable_adapter():
        assert not torch.allclose(logits(theirs, batch), base, atol=ATOL)


def test_merged_adapter_layers_disable_and_enable():
    model = lorafit_adapter("llama-qv")
    batch = batch_for(model.model)
    expected = logits(model, batch)
    model.merge_adapter()
    model.disable_adapter_layers()
    assert_close(logits(model, batch), logits(tiny_llama(0), batch))
    model.enable_adapter_layers()
    assert_close(logits(model, batch), expected)
    assert all(layer.merged for layer in model.model.modules() if hasattr(layer, "merged_adapters"))


def test_base_model_and_set_requires_grad_as_in_peft():
    ours, theirs = lorafit_adapter("bert-seqcls"), peft_adapter("bert-seqcls")
    assert ours.base_model.model is ours.get_base_model()
    assert type(ours.base_model.model) is type(theirs.base_model.model)
    extra = dict(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["key"])
    ours.add_adapter("other", LoraConfig(**extra))
    theirs.add_adapter("other", peft.LoraConfig(**extra))
    for model in (ours, theirs):
        model.set_requires_grad("other", True)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    for model in (ours, theirs):
        model.set_requires_grad(["default", "other"], False)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] == 0


@pytest.mark.parametrize("case", ["bert-seqcls", "llama-embedding", "gpt2-c_attn"])
def test_state_dict_helpers_match_peft(case):
    from lorafit import get_peft_model_state_dict, set_peft_model_state_dict

    theirs = peft_adapter(case)
    with _quiet():
        expected = peft.get_peft_model_state_dict(theirs)
    ours = lorafit_adapter(case, seed=0)
    randomise_(ours, seed=99)  # different weights, then PEFT's state dict put into them
    set_peft_model_state_dict(ours, expected)
    got = get_peft_model_state_dict(ours)
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    batch = batch_for(ours.model)
    assert_close(logits(ours, batch), logits(theirs, batch))
    bad = {**expected, next(k for k in expected if ".lora_A" in k): torch.zeros(1, 1)}
    with pytest.raises(LorafitError, match="does not fit"):
        set_peft_model_state_dict(ours, bad)
