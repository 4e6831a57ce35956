"""LLM instruction tuning: `lorafit train --task causal-lm` against PEFT + Trainer on identical tokens.

Both sides train r=8 LoRA on q_proj/v_proj for one epoch over the same examples, encoded by
``lorafit.data.chat.tokenize_lm`` (loss on response tokens only), batch 4, sequence length <= 256,
lr 2e-4, no warm-up, no evaluation or checkpoints. Tokens/s is the examples' real (non-pad) tokens
over the wall time of the training call, so padding and wasted logits count as cost, not as work.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from bench.common import peak_rss_mb
from bench.fixtures import Setup
from lorafit.data.chat import IGNORE_INDEX


def encoded_examples(setup: Setup) -> tuple[list[dict], object]:
    from lorafit.data.chat import tokenize_lm
    from lorafit.inference.base_models import load_tokenizer

    tokenizer = load_tokenizer(setup.llm_model)
    records = [json.loads(line) for line in Path(setup.llm_train_file).read_text(encoding="utf-8").splitlines()
               if line.strip()]
    examples, _ = tokenize_lm(records, tokenizer, max_length=setup.sizes.llm_max_length)
    return examples, tokenizer


def token_counts(examples: list[dict]) -> dict:
    real = sum(len(e["input_ids"]) for e in examples)
    scored = sum(sum(1 for label in e["labels"][1:] if label != IGNORE_INDEX) for e in examples)
    return {"examples": len(examples), "real_tokens": real, "scored_tokens": scored,
            "mean_length": round(real / max(1, len(examples)), 1)}


def run_lorafit(setup: Setup, options: dict) -> dict:
    from lorafit.tasks.pipeline import run_train
    from lorafit.training.settings import TrainConfig

    s = setup.sizes
    counts = token_counts(encoded_examples(setup)[0])
    with tempfile.TemporaryDirectory(prefix="bench-lorafit-llm-", dir=setup.workdir) as out:
        config = TrainConfig(task="causal-lm", model=setup.llm_model, train_file=setup.llm_train_file,
                             max_length=s.llm_max_length, batch_size=s.llm_batch_size, r=s.r,
                             lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout, target_modules=["q_proj", "v_proj"],
                             lr=s.llm_lr, epochs=1, warmup_ratio=0.0, weight_decay=0.01, seed=s.seed,
                             eval_strategy="no", save_strategy="no", output_dir=str(Path(out) / "run"),
                             **options.get("config", {}))
        started = time.perf_counter()
        final = run_train(config)
        wall = time.perf_counter() - started
    # the loop's own clock (its tokens are the batches' attention-mask sums: the same real tokens)
    if final.get("train_tokens_per_second"):
        rate, timed = final["train_tokens_per_second"], "train loop"
    else:  # a run that reports no rate: the whole call, an upper bound on lorafit's time
        rate, timed = counts["real_tokens"] / wall, "whole run_train call"
    return {"tokens_per_second": round(rate, 2), "train_seconds": round(counts["real_tokens"] / rate, 2),
            "timed": timed, "peak_rss_mb": peak_rss_mb(), "end_to_end_seconds": round(wall, 2), **counts}


def run_peft(setup: Setup, options: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    s = setup.sizes
    examples, tokenizer = encoded_examples(setup)
    counts = token_counts(examples)
    dataset = Dataset.from_list([{k: e[k] for k in ("input_ids", "attention_mask", "labels")} for e in examples])
    model = AutoModelForCausalLM.from_pretrained(setup.llm_model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=s.r, lora_alpha=s.lora_alpha,
                                             lora_dropout=s.lora_dropout, target_modules=["q_proj", "v_proj"]))
    with tempfile.TemporaryDirectory(prefix="bench-peft-llm-", dir=setup.workdir) as out:
        args = TrainingArguments(output_dir=out, learning_rate=s.llm_lr, per_device_train_batch_size=s.llm_batch_size,
                                 num_train_epochs=1, weight_decay=0.01, warmup_steps=0, eval_strategy="no",
                                 save_strategy="no", report_to=[], use_cpu=True, seed=s.seed, disable_tqdm=True,
                                 logging_steps=10_000)
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
        started = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - started
    return {"tokens_per_second": round(counts["real_tokens"] / seconds, 2), "train_seconds": round(seconds, 2),
            "timed": "trainer.train()", "peak_rss_mb": peak_rss_mb(), **counts,
            "train_loss": round(result.training_loss, 4)}
