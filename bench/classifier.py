"""Classifier training: `lorafit train` against PEFT + transformers' Trainer configured as in the article.

Both sides train r=8 LoRA on query/value for one epoch with the same data, max length, batch size,
learning rate, warm-up (none), weight decay, alpha, dropout and seed; both evaluate and save once per
epoch (Trainer: eval/save_strategy="epoch", load_best_model_at_end; lorafit: its defaults). Samples/s
is training examples over the wall time of the training call (``trainer.train()``; lorafit's loop).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from bench.common import peak_rss_mb
from bench.fixtures import Setup


def real_tokens(setup: Setup) -> dict:
    """Training tokens (after truncation) and the padding random or length-grouped batches add to them."""
    import torch
    from transformers import AutoTokenizer

    from lorafit.data.classification import length_grouped_order

    tokenizer = AutoTokenizer.from_pretrained(setup.cls_model)
    texts = [json.loads(line)["text"] for line in Path(setup.train_file).read_text(encoding="utf-8").splitlines()
             if line.strip()]
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=setup.sizes.max_length)["input_ids"]]
    batch = setup.sizes.batch_size

    def padded(order: list[int]) -> int:
        return sum(max(lengths[i] for i in order[s:s + batch]) * len(order[s:s + batch])
                   for s in range(0, len(order), batch))

    generator = torch.Generator().manual_seed(setup.sizes.seed)
    shuffled = torch.randperm(len(lengths), generator=generator).tolist()
    grouped = length_grouped_order(lengths, batch, torch.Generator().manual_seed(setup.sizes.seed))
    total = sum(lengths)
    return {"examples": len(lengths), "real_tokens": total, "mean_length": round(total / len(lengths), 1),
            "padded_over_real_random": round(padded(shuffled) / total, 3),
            "padded_over_real_grouped": round(padded(grouped) / total, 3)}


def run_lorafit(setup: Setup, options: dict) -> dict:
    from lorafit.tasks.pipeline import run_train
    from lorafit.training.settings import TrainConfig

    s = setup.sizes
    targets = options.get("targets", ["query", "value"])
    targets = [targets] if isinstance(targets, str) else targets  # TrainConfig takes a list: ["all-linear"]
    with tempfile.TemporaryDirectory(prefix="bench-lorafit-", dir=setup.workdir) as out:
        config = TrainConfig(model=setup.cls_model, train_file=setup.train_file, validation_file=setup.validation_file,
                             max_length=s.max_length, batch_size=s.batch_size, eval_batch_size=s.batch_size,
                             r=s.r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                             target_modules=targets, lr=s.lr, epochs=1, warmup_ratio=0.0,
                             weight_decay=0.01, seed=s.seed, output_dir=str(Path(out) / "run"),
                             **options.get("config", {}))
        started = time.perf_counter()
        final = run_train(config)
        wall = time.perf_counter() - started
    return {"samples_per_second": final["train_samples_per_second"], "train_seconds": final["train_seconds"],
            "accuracy": final.get("validation_accuracy"), "peak_rss_mb": peak_rss_mb(),
            "end_to_end_seconds": round(wall, 2)}


def _peft_data(setup: Setup, tokenizer):
    from datasets import Dataset

    def read(path: str) -> list[dict]:
        return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]

    train, validation = read(setup.train_file), read(setup.validation_file)
    names = sorted({str(r["label"]) for r in train})
    label2id = {name: i for i, name in enumerate(names)}

    def encode(records: list[dict]):
        ds = Dataset.from_dict({"text": [r["text"] for r in records],
                                "label": [label2id[str(r["label"])] for r in records]})
        return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=setup.sizes.max_length),
                      batched=True, remove_columns=["text"])

    return encode(train), encode(validation), label2id


def run_peft(setup: Setup, options: dict) -> dict:
    """The article's recipe; ``options["group_by_length"]`` adds train_sampling_strategy="group_by_length",
    ``options["targets"]`` replaces query/value (PEFT's "all-linear" is a plain string), ``options["bf16"]``
    trains under bf16 autocast."""
    import numpy as np
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    s = setup.sizes
    tokenizer = AutoTokenizer.from_pretrained(setup.cls_model)
    train, validation, label2id = _peft_data(setup, tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(
        setup.cls_model, num_labels=len(label2id), label2id=label2id, id2label={i: n for n, i in label2id.items()})
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=s.r, lora_alpha=s.lora_alpha,
                                             lora_dropout=s.lora_dropout,
                                             target_modules=options.get("targets", ["query", "value"])))

    def accuracy(prediction) -> dict:
        logits, labels = prediction
        return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}

    extra = {"train_sampling_strategy": "group_by_length"} if options.get("group_by_length") else {}
    if options.get("bf16"):
        extra["bf16"] = True  # autocast, as lorafit's --mixed-precision bf16
    with tempfile.TemporaryDirectory(prefix="bench-peft-", dir=setup.workdir) as out:
        args = TrainingArguments(output_dir=out, learning_rate=s.lr, per_device_train_batch_size=s.batch_size,
                                 per_device_eval_batch_size=s.batch_size, num_train_epochs=1, weight_decay=0.01,
                                 warmup_steps=0, eval_strategy="epoch", save_strategy="epoch",
                                 load_best_model_at_end=True, report_to=[], use_cpu=True, seed=s.seed,
                                 disable_tqdm=True, **extra)
        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
                          processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                          compute_metrics=accuracy)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        metrics = trainer.evaluate()
    return {"samples_per_second": round(len(train) / seconds, 2), "train_seconds": round(seconds, 1),
            "accuracy": metrics.get("eval_accuracy"), "peak_rss_mb": peak_rss_mb()}
