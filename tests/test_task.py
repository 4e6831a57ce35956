"""Tests for tasks/task.py: what the one pipeline takes from a task, and the eval-mode helper."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lorafit.tasks.task import eval_mode


def test_eval_mode_restores_the_mode_the_model_had():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    for training in (True, False):
        model.train(training)
        with eval_mode(model):
            assert not model.training and not model[1].training
        assert model.training is training and model[1].training is training
    model.train()
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert model.training  # an evaluation that fails mid-run leaves training in train mode


def test_tasks_do_not_import_the_pipeline():
    """The pipeline imports the tasks; a task importing the pipeline back would be a cycle."""
    code = ("import sys, lorafit.tasks.classification, lorafit.tasks.causal_lm; "
            "print('lorafit.tasks.pipeline' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_each_task_is_registered_under_its_train_config_name():
    from lorafit.tasks.pipeline import TASKS as PIPELINE_TASKS
    from lorafit.training.settings import DEFAULT_MAX_LENGTH, TASKS

    assert set(PIPELINE_TASKS) == set(TASKS) == set(DEFAULT_MAX_LENGTH)


def _padded(examples: list[dict]) -> dict:
    longest = lambda key: max(len(e[key]) for e in examples)  # noqa: E731
    pad = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {key: torch.tensor([e[key] + [fill] * (longest(key) - len(e[key])) for e in examples])
            for key, fill in pad.items()}


def _token_cls_examples() -> tuple[torch.nn.Module, list[dict]]:
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=16, num_labels=3))
    examples = []
    for i in range(4):  # labelled pieces 1, 5, 2, 6: a mean over pieces differs from one over sentences
        ids = torch.randint(3, 50, (7,)).tolist()
        labels = [i % 3 if j <= (1 + 4 * (i % 2) + i // 2) - 1 else -100 for j in range(7)]
        examples.append({"input_ids": ids, "attention_mask": [1] * 7, "labels": labels})
    return model, examples


def _seq2seq_examples() -> tuple[torch.nn.Module, list[dict]]:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=16, num_layers=1,
                                                num_heads=2, decoder_start_token_id=0, pad_token_id=0))
    examples = [{"input_ids": torch.randint(3, 50, (4,)).tolist(), "attention_mask": [1] * 4,
                 "labels": torch.randint(3, 50, (n,)).tolist()} for n in (1, 6, 2, 2)]
    return model, examples


@pytest.mark.parametrize("task_name", ["token-classification", "seq2seq"])
def test_a_tasks_loss_weight_splits_a_batch_without_changing_its_loss(task_name):
    """The training loop splits a batch over processes and micro-batches and weighs each part's mean loss by
    the sum of ``loss_weight``; for a loss that is a mean over tokens that must count those tokens."""
    from lorafit.tasks.pipeline import TASKS

    model, examples = (_token_cls_examples if task_name == "token-classification" else _seq2seq_examples)()
    model.eval()
    task = TASKS[task_name]
    with torch.no_grad():
        whole = model(**_padded(examples)).loss
        parts = [examples[:2], examples[2:]]
        weights = [sum(task.loss_weight(None, e) for e in part) for part in parts]
        split = sum(w * model(**_padded(part)).loss for w, part in zip(weights, parts)) / sum(weights)
    assert split.item() == pytest.approx(whole.item(), abs=1e-6)
