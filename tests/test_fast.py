"""Every fast path against the plain path, and the one switch that chooses between them.

Each case runs twice, once after ``use_fast_paths(model, True)`` and once after ``(model, False)``,
from the same weights and batch. Tolerances (fp32 throughout): outputs, logits and losses
rtol 1e-5 / atol 1e-6; gradients rtol 1e-4 / atol 1e-6 (a fused or reordered matmul rounds differently,
and backward sums more terms). Dropout is 0 where values are compared: the fast masks are other
random draws with the same law, which tests/test_dropout.py checks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import make_batch, tiny_bert_cls, tiny_gpt2, tiny_llama
from lorafit import LoraConfig, get_lora_model
from lorafit import fast
from lorafit.fast import causal_loss as fast_loss
from lorafit.fast import prefix_sharing
from lorafit.fast.dropout import FastDropout
from lorafit.layers import BASE_ADAPTER, LoraLayer
from lorafit.tasks.classification import classification_loss, predict_logits
from lorafit.training.settings import TrainConfig
from test_prefix_sharing import prompt_and_replies

OUT = {"rtol": 1e-5, "atol": 1e-6}
GRAD = {"rtol": 1e-4, "atol": 1e-6}


@pytest.fixture(autouse=True)
def _fast_paths_allowed(monkeypatch):
    """The comparison needs both paths, also where the suite runs under LORAFIT_FAST=0."""
    monkeypatch.delenv(fast.ENV_SWITCH, raising=False)


def both_ways(build, run):
    """``run(model)`` on a fresh ``build()`` with fast paths on, then on another with them off."""
    results = []
    for on in (True, False):
        model = build()
        assert fast.use_fast_paths(model, on) is on
        results.append(run(model))
    return results


def assert_close(fast_result, plain_result, tolerance=OUT):
    if isinstance(fast_result, dict):
        assert fast_result.keys() == plain_result.keys() and fast_result
        for name in fast_result:
            torch.testing.assert_close(fast_result[name], plain_result[name], **tolerance, msg=name)
    else:
        torch.testing.assert_close(fast_result, plain_result, **tolerance)


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --- the LoRA layer -----------------------------------------------------------------------------------
def one_layer(build, dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(build().to(dtype))
    return get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))


@pytest.mark.parametrize("base", [lambda: nn.Linear(12, 6), lambda: Conv1D(6, 12)], ids=["linear", "conv1d"])
def test_layer_forward_and_backward_match(base):
    x = torch.randn(3, 5, 12)

    def run(lora):
        out = lora.get_base_model()(x)
        out.square().sum().backward()
        with torch.no_grad():  # the in-place update of inference
            inference = lora.get_base_model()(x)
        return {"out": out.detach(), "inference": inference} | lora_grads(lora)

    fast_result, plain_result = both_ways(lambda: one_layer(base), run)
    assert any("lora_B" in name for name in fast_result)
    assert_close({k: v for k, v in fast_result.items() if "lora" not in k},
                 {k: v for k, v in plain_result.items() if "lora" not in k})
    assert_close({k: v for k, v in fast_result.items() if "lora" in k},
                 {k: v for k, v in plain_result.items() if "lora" in k}, GRAD)


def test_layer_of_a_half_precision_base_matches():
    x = torch.randn(4, 12, dtype=torch.bfloat16)
    fast_out, plain_out = both_ways(lambda: one_layer(lambda: nn.Linear(12, 6), torch.bfloat16), lambda lora: lora.get_base_model()(x))
    assert fast_out.dtype == torch.bfloat16
    torch.testing.assert_close(fast_out, plain_out, rtol=1.6e-2, atol=1e-2)  # bf16 keeps 8 bits of mantissa


def test_merged_and_unmerged_layers_match_both_ways():
    x = torch.randn(4, 12)

    def run(lora):
        layer = lora.get_base_model()
        unmerged = layer(x).detach()
        lora.merge_adapter()
        merged = layer(x).detach()
        lora.unmerge_adapter()
        return torch.stack([unmerged, merged, layer(x).detach()])

    fast_result, plain_result = both_ways(lambda: one_layer(lambda: nn.Linear(12, 6)), run)
    assert_close(fast_result, plain_result)
    torch.testing.assert_close(plain_result[0], plain_result[1], **OUT)


def test_dora_layers_bypass_the_fused_update_with_equal_results():
    """DoRA rescales the base output, which the fused rank-r addmm cannot: its layers run the plain path
    under both switches, beside a plain adapter that keeps the fast one (single adapter and mixed batch)."""
    x = torch.randn(3, 5, 12)

    def build():
        torch.manual_seed(0)
        lora = get_lora_model(nn.Sequential(nn.Linear(12, 6)), LoraConfig(
            r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False, use_dora=True))
        lora.add_adapter("plain", LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
        return lora

    def run(lora):
        out = lora.get_base_model()(x)
        out.square().sum().backward()
        with torch.no_grad():
            lora.routing.set(["plain", "default", BASE_ADAPTER])
            mixed = lora.get_base_model()(x)
            lora.routing.set(None)
        return {"out": out.detach(), "mixed": mixed} | lora_grads(lora)

    fast_result, plain_result = both_ways(build, run)
    assert any("lora_magnitude_vector" in name for name in fast_result)
    assert_close({k: fast_result[k] for k in ("out", "mixed")}, {k: plain_result[k] for k in ("out", "mixed")})
    assert_close({k: v for k, v in fast_result.items() if "lora" in k},
                 {k: v for k, v in plain_result.items() if "lora" in k}, GRAD)


# --- mixed-adapter batches ----------------------------------------------------------------------------
def two_adapters():
    torch.manual_seed(1)
    lora = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
                          adapter_name="a")
    lora.add_adapter("b", LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "embed_tokens"],
                                     init_lora_weights=False))
    return lora.eval()


def test_mixed_adapter_batch_outputs_match():
    names = ["a", BASE_ADAPTER, "b", "a", "b"]
    batch = make_batch(batch=len(names))

    def run(lora):
        with torch.no_grad():
            first = lora(**batch, adapter_names=names).logits
            again = lora(**batch, adapter_names=names).logits  # the fast path's stacked factors, reused
        graph = lora(**batch, adapter_names=names).logits.detach()
        return torch.stack([first, again, graph])

    fast_result, plain_result = both_ways(two_adapters, run)
    assert_close(fast_result, plain_result)


# --- classifier training step and prediction -----------------------------------------------------------
def classifier():
    torch.manual_seed(0)
    base = tiny_bert_cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return get_lora_model(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value", "dense"],
                                           init_lora_weights=False))


def classifier_batch():
    batch = make_batch(batch=4)
    batch["attention_mask"][1, 5:] = 0
    batch["labels"] = torch.tensor([0, 1, 1, 0])
    return batch


def test_classifier_training_step_loss_and_gradients_match():
    batch = classifier_batch()

    def run(model):
        model.train()
        with fast.fast_section(model):
            loss = classification_loss(model, batch)
            loss.backward()
        return {"loss": loss.detach()} | lora_grads(model)

    fast_result, plain_result = both_ways(classifier, run)
    assert_close({"loss": fast_result.pop("loss")}, {"loss": plain_result.pop("loss")})
    assert any(".lora_B." in name for name in fast_result) and any("classifier" in n for n in fast_result)
    assert_close(fast_result, plain_result, GRAD)


def test_prediction_logits_match():
    batch = classifier_batch()
    examples = [{"input_ids": ids[mask.bool()].tolist()} for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
        return {"input_ids": ids, "attention_mask": (torch.arange(width) < torch.tensor(
            [len(r["input_ids"]) for r in rows])[:, None]).long()}

    fast_logits, plain_logits = both_ways(classifier, lambda model: predict_logits(model, examples, collate, 3)[0])
    assert fast_logits.shape == (4, 2)
    assert_close(fast_logits, plain_logits)


# --- causal-LM loss ------------------------------------------------------------------------------------
def causal_model(arch):
    torch.manual_seed(0)
    builder = {"llama": tiny_llama, "gpt2": tiny_gpt2}[arch]
    base = builder(**({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} if arch == "gpt2" else {}))
    return get_lora_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear",
                                           init_lora_weights=False))


@pytest.mark.parametrize("layout", ["tree", "cache", "no shared prefix"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_loss_and_gradients_match(arch, layout, monkeypatch):
    if layout == "tree":  # tiny models are 32 wide; let the packed tree cover their batch
        monkeypatch.setattr(prefix_sharing, "TREE_MAX_LENGTH_PER_HIDDEN", 4.0)
    batch = prompt_and_replies(prefix=10 if layout != "no shared prefix" else 0)
    layouts = []
    monkeypatch.setattr(prefix_sharing, "tree_layout", spy(prefix_sharing.tree_layout, layouts, "tree"))
    monkeypatch.setattr(prefix_sharing, "_cached_prefix_hidden",
                        spy(prefix_sharing._cached_prefix_hidden, layouts, "cache"))

    def run(model):
        model.train()
        loss = fast_loss.causal_loss(model, batch)
        loss.backward()
        return {"loss": loss.detach()} | lora_grads(model)

    fast_result, plain_result = both_ways(lambda: causal_model(arch), run)
    if layout == "no shared prefix":
        assert layouts == []
    else:  # the fast run really took the layout; the plain run took none
        assert layouts[-1] == layout and layouts.count(layout) == 1
    assert_close({"loss": fast_result.pop("loss")}, {"loss": plain_result.pop("loss")})
    assert_close(fast_result, plain_result, GRAD)


def spy(function, calls: list, label: str):
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        if result is not None:
            calls.append(label)
        return result
    return wrapper


# --- the switch ----------------------------------------------------------------------------------------
def test_off_switch_reaches_every_trick(monkeypatch):
    model = classifier().train()
    last_layer = model.get_base_model().bert.encoder.layer[-1]
    torch.manual_seed(0)
    model.add_adapter("dropped", LoraConfig(task_type="SEQ_CLS", r=2, lora_dropout=0.1, target_modules=["query"]))
    assert fast.use_fast_paths(model)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert "forward" in vars(last_layer) and all(m.fast_update is not None for m in layers if hasattr(m, "lora_A"))
    assert any(type(d) is FastDropout for m in layers for d in m.lora_dropout.values())

    assert not fast.use_fast_paths(model, False)
    assert "forward" not in vars(last_layer) and all(m.fast_update is None for m in layers)
    dropouts = [d for m in layers for d in m.lora_dropout.values() if not isinstance(d, nn.Identity)]
    assert dropouts and all(type(d) is nn.Dropout and d.p == 0.1 and d.training for d in dropouts)
    assert not fast.is_on(model)
    before = torch.backends.mkldnn.enabled
    with fast.fast_section(model):  # neither oneDNN nor base-model dropouts are touched
        assert torch.backends.mkldnn.enabled == before
        assert not any(type(m) is FastDropout for m in model.modules())
    monkeypatch.setattr(fast_loss, "body_hidden", None)  # the plain loss must not reach for it
    llama = causal_model("llama")
    fast.use_fast_paths(llama, False)
    fast_loss.causal_loss(llama, prompt_and_replies()).backward()


def test_environment_switch_turns_everything_off_even_when_asked_on(monkeypatch):
    monkeypatch.setenv(fast.ENV_SWITCH, "0")
    model = classifier()  # LoRA layers made under LORAFIT_FAST=0 start on the plain path
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(m.fast_update is None for m in layers)
    assert not fast.use_fast_paths(model, True) and not fast.is_on(model)
    assert "forward" not in vars(model.get_base_model().bert.encoder.layer[-1])
    monkeypatch.setenv(fast.ENV_SWITCH, "1")
    assert fast.use_fast_paths(model) and fast.is_on(model)


def test_train_takes_a_fast_flag():
    from lorafit.cli import build_parser

    parser = build_parser()
    assert TrainConfig().fast is True
    assert parser.parse_args(["train", "--no-fast"]).fast is False
    assert parser.parse_args(["train", "--fast"]).fast is True
