"""Classifier evaluation helpers: batched prediction in any order gives each example its own logits."""

from __future__ import annotations

import torch

from conftest import tiny_bert_cls
from lorafit import LoraConfig, get_lora_model
from lorafit.tasks.classification import predict_logits
from lorafit.data.classification import datasets


def _collate(examples: list[dict]) -> dict:
    longest = max(len(e["input_ids"]) for e in examples)
    pad = lambda values, fill: values + [fill] * (longest - len(values))  # noqa: E731
    batch = {"input_ids": torch.tensor([pad(e["input_ids"], 0) for e in examples]),
             "attention_mask": torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in examples])}
    if "labels" in examples[0]:
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
    return batch


def _examples(count: int = 11) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 14, (count,), generator=generator).tolist()
    return [{"input_ids": torch.randint(5, 90, (n,), generator=generator).tolist(), "labels": i % 2}
            for i, n in enumerate(lengths)]


def test_predict_logits_keeps_input_order_and_matches_one_by_one():
    torch.manual_seed(0)
    model = get_lora_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                                       init_lora_weights=False)).eval()
    examples = _examples()
    assert sorted(len(e["input_ids"]) for e in examples) != [len(e["input_ids"]) for e in examples]
    with torch.no_grad():
        alone = torch.cat([model(**_collate([e])).logits for e in examples])
        losses = [model(**_collate([e])).loss.item() for e in examples]
    for container in (examples, datasets.Dataset.from_list(examples)):
        logits, loss = predict_logits(model, container, _collate, batch_size=4)
        torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5)
        assert abs(loss - sum(losses) / len(losses)) < 1e-5
    assert not model.training


def test_predict_logits_of_nothing():
    model = tiny_bert_cls().eval()
    logits, loss = predict_logits(model, [], _collate, batch_size=4)
    assert logits.numel() == 0 and loss is None
