"""LoRA+ (lorafit.training.optimizer) against PEFT's create_loraplus_optimizer, and in the training loop."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer as peft_loraplus  # noqa: E402

from conftest import tiny_bert_cls, tiny_llama  # noqa: E402
from lorafit import LoraConfig, create_loraplus_optimizer, get_lora_model  # noqa: E402
from lorafit.training.optimizer import make_optimizer  # noqa: E402
from lorafit.training.settings import TrainConfig  # noqa: E402
from test_interop import _quiet  # noqa: E402

CASES = {
    # LoRA on an embedding and on linear layers, DoRA magnitudes (1-D), a trained LM head copy
    "llama-embedding-dora-head": (tiny_llama, dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, use_dora=True,
                                                   target_modules=["embed_tokens", "q_proj", "v_proj"],
                                                   modules_to_save=["lm_head"])),
    # trained biases everywhere (bias="all"), a classifier head, LayerNorm weights trained in full
    "bert-biases-head-layernorm": (tiny_bert_cls, dict(task_type="SEQ_CLS", r=2, lora_alpha=4, bias="all",
                                                       target_modules=["query", "value", "dense"],
                                                       modules_to_save=["LayerNorm"])),
}


def _common_name(name: str, prefix: str) -> str:
    name = name.removeprefix(prefix).replace(".default", "")
    return name.removesuffix(".weight") if name.endswith("lora_magnitude_vector.weight") else name


def _groups(model, optimizer, prefix: str) -> list[tuple[list[str], float, float]]:
    names = {id(p): _common_name(n, prefix) for n, p in model.named_parameters()}
    return [(sorted(names[id(p)] for p in group["params"]), group["lr"], group["weight_decay"])
            for group in optimizer.param_groups]


@pytest.mark.parametrize("case", list(CASES))
def test_groups_and_learning_rates_equal_peft(case):
    build, kwargs = CASES[case]
    ours = get_lora_model(build(0), LoraConfig(**kwargs))
    with _quiet():
        theirs = peft.get_peft_model(build(0), peft.LoraConfig(**kwargs))
    options = dict(lr=2e-4, loraplus_lr_ratio=16, loraplus_weight_decay=0.05, loraplus_lr_embedding=3e-6,
                   betas=(0.8, 0.9))
    mine = create_loraplus_optimizer(ours, torch.optim.AdamW, **options)
    reference = peft_loraplus(theirs, torch.optim.AdamW, **options)
    got, expected = _groups(ours, mine, "model."), _groups(theirs, reference, "base_model.model.")
    assert got == expected
    assert [lr for _, lr, _ in got] == pytest.approx([2e-4, 3e-6, 2e-4 * 16, 2e-4 * 16])
    assert all(params for params, _, _ in got[:3]) or case.startswith("bert")  # the llama case fills A, embed, B
    assert mine.defaults["betas"] == (0.8, 0.9)
    trainable = sorted(_common_name(n, "model.") for n, p in ours.named_parameters() if p.requires_grad)
    assert sorted(name for params, _, _ in got for name in params) == trainable


def test_peft_defaults_for_weight_decay_and_embedding_rate():
    build, kwargs = CASES["llama-embedding-dora-head"]
    ours = get_lora_model(build(0), LoraConfig(**kwargs))
    optimizer = create_loraplus_optimizer(ours, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=4)
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [
        (0.1, 0.0), (1e-6, 0.0), (pytest.approx(0.4), 0.0), (pytest.approx(0.4), 0.0)]


def test_training_loop_uses_loraplus_groups_when_asked():
    model = get_lora_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    config = TrainConfig(batch_size=4, loraplus_lr_ratio=8, weight_decay=0.1).resolved()
    optimizer = make_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            by_lr[names[id(param)]] = (group["lr"], group["weight_decay"])
    lr = config.lr
    assert all(by_lr[n] == (lr, 0.1) for n in by_lr if "lora_A" in n)
    assert all(by_lr[n] == (pytest.approx(8 * lr), 0.1) for n in by_lr if "lora_B" in n)
    assert all(by_lr[n] == (pytest.approx(8 * lr), 0.0) for n in by_lr if n.endswith(".bias"))
    assert by_lr.keys() == {n for n, p in model.named_parameters() if p.requires_grad}

    # one step without decay: Adam's first update is about lr * sign(gradient), so B moves 8 times as far as A
    optimizer = make_optimizer(model, TrainConfig(batch_size=4, loraplus_lr_ratio=8, weight_decay=0.0).resolved())
    batch = {"input_ids": torch.randint(3, 100, (4, 8)), "labels": torch.tensor([0, 1, 1, 0])}
    layer = model.model.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # so that A gets a gradient too
    before = {k: getattr(layer, k)["default"].weight.detach().clone() for k in ("lora_A", "lora_B")}
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    moved = {k: (getattr(layer, k)["default"].weight.detach() - before[k]).abs().max().item() for k in before}
    assert moved["lora_B"] / moved["lora_A"] == pytest.approx(8, rel=0.05)


def test_loraplus_settings_are_checked():
    from lorafit import LorafitError

    with pytest.raises(LorafitError, match="--loraplus-lr-ratio must be a number > 0"):
        TrainConfig(loraplus_lr_ratio=0)
    with pytest.raises(LorafitError, match="--loraplus-lr-embedding must be a number > 0"):
        TrainConfig(loraplus_lr_embedding=-1.0)
