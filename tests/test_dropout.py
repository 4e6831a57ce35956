"""FastDropout: Bernoulli masks with the asked-for rate, unbiased, seedable, identity outside training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafit import LoraConfig, get_lora_model
from lorafit.fast.dropout import FastDropout, fast_dropouts
from conftest import tiny_bert_cls


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drops_each_element_with_probability_p_and_rescales_the_rest(p):
    torch.manual_seed(0)
    dropout = FastDropout(p).train()
    out = dropout(torch.ones(400, 1001))  # an element count that is not a multiple of four
    dropped = out == 0
    n = out.numel()
    tolerance = 5 * (p * (1 - p) / n) ** 0.5  # five standard deviations of the observed rate
    assert abs(dropped.float().mean().item() - p) < tolerance
    kept = out[~dropped]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)), rtol=1e-4, atol=0)
    # the expectation is the input itself: the scale matches the rate actually used
    assert abs(out.mean().item() - 1) < tolerance / (1 - p)


def test_every_one_of_the_four_elements_a_draw_feeds_is_uniform():
    # a draw that left the top bit of its 64 at zero would make every fourth element drop far more often
    torch.manual_seed(1)
    out = FastDropout(0.5).train()(torch.ones(200_000, 4))
    rates = (out == 0).float().mean(dim=0)
    assert ((rates - 0.5).abs() < 0.006).all(), rates


def test_neighbouring_elements_are_independent():
    torch.manual_seed(2)
    dropped = (FastDropout(0.3).train()(torch.ones(1_000_000)) == 0).float()
    both = (dropped[:-1] * dropped[1:]).mean().item()
    assert abs(both - 0.09) < 0.003


def test_seeded_runs_repeat_and_differ_from_other_seeds():
    dropout = FastDropout(0.2).train()
    x = torch.randn(7, 33)
    torch.manual_seed(3)
    first = dropout(x)
    torch.manual_seed(3)
    assert torch.equal(dropout(x), first)
    assert not torch.equal(dropout(x), first)


def test_gradient_is_the_mask_and_eval_mode_is_identity():
    torch.manual_seed(4)
    dropout = FastDropout(0.25).train()
    x = torch.randn(5, 6, 7, requires_grad=True)
    out = dropout(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out.detach(), x.detach() * grad)
    kept = torch.isclose(grad, torch.tensor(1 / 0.75))
    assert ((grad == 0) | kept).all() and kept.any() and not kept.all()
    x = torch.randn(3, 4)
    assert torch.equal(dropout.eval()(x), x)


def test_keeps_dtype_and_shape():
    out = FastDropout(0.1).train()(torch.randn(2, 3, 5, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 5)


def test_lora_layers_use_it_and_it_is_still_a_dropout():
    model = get_lora_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=2, lora_dropout=0.1,
                                                       target_modules=["query"]))
    found = [m for m in model.modules() if isinstance(m, FastDropout)]
    assert found and all(isinstance(m, nn.Dropout) and m.p == 0.1 for m in found)


def test_fast_dropouts_swaps_plain_dropouts_for_the_block_and_puts_the_same_modules_back():
    model = tiny_bert_cls(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0).train()
    before = {name: module for name, module in model.named_modules()}
    plain = [name for name, module in before.items() if type(module) is nn.Dropout and module.p > 0]
    assert plain
    with fast_dropouts(model):
        inside = dict(model.named_modules())
        assert all(type(inside[name]) is FastDropout and inside[name].p == before[name].p for name in plain)
        assert all(inside[name].training for name in plain)
        untouched = [n for n, m in before.items() if type(m) is nn.Dropout and m.p == 0]
        assert untouched and all(inside[n] is before[n] for n in untouched)  # p=0 dropouts do nothing anyway
        model.eval()  # a mode change inside the block carries over to the originals
    after = dict(model.named_modules())
    assert all(after[name] is module for name, module in before.items())
    assert not any(m.training for m in after.values())


def test_fast_dropouts_restores_after_an_error():
    model = tiny_bert_cls(hidden_dropout_prob=0.1)
    before = list(model.modules())
    with pytest.raises(KeyError):
        with fast_dropouts(model):
            raise KeyError("boom")
    assert list(model.modules()) == before
