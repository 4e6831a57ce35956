"""The first-token shortcut for classifiers: same logits and gradients as the full last layer."""

from __future__ import annotations

import pytest
import torch

from conftest import make_batch, tiny_bert_cls, tiny_llama
from conftest import tiny_roberta_cls
from lorafit import LoraConfig, get_lora_model
from lorafit.fast.first_token import first_token_last_layer

BUILDERS = {"bert": tiny_bert_cls, "roberta": tiny_roberta_cls}


def _lora(builder):
    torch.manual_seed(0)
    config = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value", "dense"], init_lora_weights=False)
    return get_lora_model(builder(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), config)


def _logits_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_first_token_layer_gives_the_same_logits_and_gradients(arch):
    model = _lora(BUILDERS[arch]).train()
    batch = make_batch(batch=4)
    batch["attention_mask"][1, 5:] = 0  # padding, so the mask's query-row slicing is exercised
    batch["labels"] = torch.tensor([0, 1, 1, 0])
    full_logits, full_grads = _logits_and_grads(model, batch)
    assert first_token_last_layer(model)
    logits, grads = _logits_and_grads(model, batch)
    torch.testing.assert_close(logits, full_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == full_grads.keys() and any(".lora_B." in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert set(model.state_dict()) == set(_lora(BUILDERS[arch]).state_dict())  # saved files unchanged


def test_last_layer_really_computes_one_position():
    model = _lora(tiny_bert_cls)
    first_token_last_layer(model)
    seen = []
    model.get_base_model().bert.encoder.layer[-1].output.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        model(**make_batch(batch=3))
    assert seen and seen[0][1] == 1


def test_other_heads_are_left_alone():
    from transformers import LlamaForSequenceClassification

    llama = LlamaForSequenceClassification(tiny_llama().config)
    assert not first_token_last_layer(llama)
    assert "forward" not in vars(llama.model.layers[-1])


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_both_attention_implementations(implementation):
    torch.manual_seed(0)
    base = tiny_bert_cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation=implementation)
    model = get_lora_model(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                            init_lora_weights=False))
    batch = make_batch(batch=3)
    batch["attention_mask"][0, 3:] = 0
    with torch.no_grad():
        full = model(**batch).logits
        assert first_token_last_layer(model)
        torch.testing.assert_close(model(**batch).logits, full, rtol=1e-5, atol=1e-6)
