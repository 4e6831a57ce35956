"""`lorafit train --task seq2seq`: an encoder-decoder (T5, BART) learns to write a target text for an input text.

The model is AutoModelForSeq2SeqLM with PEFT's SEQ_2_SEQ_LM adapter; its loss is the model's own
cross-entropy over the target tokens. Held-out outputs come from inference/generate.py, as
`lorafit generate`'s do, and are scored by exact match as causal-lm's replies are.
"""

from __future__ import annotations

import math

import torch

from lorafit.data.seq2seq import TextPairs, make_seq2seq_collator, pairs_from_table, tokenize_pairs
from lorafit.data.sources import read_splits
from lorafit.errors import LorafitError
from lorafit.inference.base_models import load_seq2seq_lm
from lorafit.inference.generate import GenerationSettings, generate_replies
from lorafit.tasks.causal_lm import GENERATION_BATCH, HELDOUT_LIMIT, MAX_LOG_PERPLEXITY, NEW_TOKEN_MARGIN, \
    SAMPLE_COUNT, exact_match
from lorafit.tasks.task import Task, eval_mode
from lorafit.training.settings import DEFAULT_MAX_LENGTH

_ROLES = {"train": "training", "validation": "validation", "test": "test"}


@torch.inference_mode()
def evaluate_seq2seq(model, examples: list[dict], collate, batch_size: int) -> dict:
    """Loss over every target token (each batch's mean weighted by its token count) and its perplexity."""
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # less padding
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = [examples[i] for i in order[start:start + batch_size]]
            batch = {k: v.to(device) for k, v in collate(rows).items()}
            tokens = int((batch["labels"] != -100).sum())
            total, count = total + model(**batch).loss.item() * tokens, count + tokens
    loss = total / max(1, count)
    return {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, MAX_LOG_PERPLEXITY)), 4), "tokens": count}


def score_outputs(title: str, model, tokenizer, pairs: TextPairs) -> float:
    """Greedy outputs for held-out inputs: print a few beside their targets and return the exact-match score."""
    longest = max(len(ids) for ids in tokenizer(text_target=pairs.targets)["input_ids"])
    settings = GenerationSettings(batch_size=GENERATION_BATCH, max_new_tokens=longest + NEW_TOKEN_MARGIN)
    outputs = generate_replies(model, tokenizer, pairs.inputs, settings)
    print(f"\n{title}:\n" + "-" * (len(title) + 1))
    for text, target, output in list(zip(pairs.inputs, pairs.targets, outputs))[:SAMPLE_COUNT]:
        print(f"input:     {text}\ngenerated: {output.strip()}\nexpected:  {target}\n")
    score = exact_match(outputs, pairs.targets)
    print(f"held-out exact match: {score:.1%} of {len(pairs)}")
    return score


class Seq2SeqTask(Task):
    """An encoder-decoder trained on input/target pairs: loss on the target tokens, greedy held-out outputs."""

    name = "seq2seq"
    lora_task_type = "SEQ_2_SEQ_LM"
    counts_tokens = True

    def load_data(self) -> None:
        config = self.config
        if not config.model:
            raise LorafitError("seq2seq has no built-in model; pass --model with an encoder-decoder: a local T5 or "
                               "BART directory, or a hub id such as google-t5/t5-small")
        if not (config.dataset or config.train_file):
            raise LorafitError("seq2seq has no built-in data; pass --train-file (a table with input and target "
                               "columns) or --dataset")
        read = read_splits(config, builtin="")
        self.splits = {split: pairs_from_table(table, read.sources[split], config.input_column, config.target_column)
                       for split, table in read.tables.items() if split in _ROLES}
        self.description = read.description

    def tokenize(self, tokenizer) -> dict:
        return {split: tokenize_pairs(pairs, tokenizer, role=_ROLES[split], max_length=self.config.max_length)
                for split, pairs in self.splits.items()}

    def describe_data(self, tokenized: dict) -> str:
        lines = [f"Data: {self.description}"]
        for split, examples in tokenized.items():
            inputs = sum(len(e["input_ids"]) for e in examples) / len(examples)
            targets = sum(len(e["labels"]) for e in examples) / len(examples)
            lines.append(f"  {split}: {len(examples)} pairs (mean {inputs:.1f} input and {targets:.1f} target tokens)")
        return "\n".join(lines)

    def load_base(self, model_path: str, tokenizer):
        base = load_seq2seq_lm(model_path, quantization=self.config)
        if not getattr(base.config, "is_encoder_decoder", False):
            raise LorafitError(f"--model {self.config.model} is not an encoder-decoder; seq2seq needs one such as T5 "
                               "or BART (for a decoder-only model use --task causal-lm)")
        if base.generation_config.pad_token_id is None:
            base.generation_config.pad_token_id = tokenizer.pad_token_id
        return base

    def collator(self, tokenizer):
        return make_seq2seq_collator(tokenizer.pad_token_id)

    def loss(self, model, batch: dict) -> torch.Tensor:
        return model(**batch).loss

    def loss_weight(self, example: dict) -> int:
        return len(example["labels"])  # the loss is a mean over the target tokens (padding is added later)

    def table_metric(self) -> str:
        return "perplexity"

    def evaluate(self, model, examples, collate) -> dict:
        metrics = evaluate_seq2seq(model, examples, collate, self.config.eval_batch_size)
        return {"loss": metrics["loss"], "perplexity": metrics["perplexity"]}

    def demo(self, stage: str, model, tokenizer) -> dict:
        held_out = self.splits.get("validation")
        if held_out is None:
            return {}
        pairs = TextPairs(held_out.inputs[:HELDOUT_LIMIT], held_out.targets[:HELDOUT_LIMIT], held_out.source)
        title = f"Sample outputs {stage} training"
        return {f"heldout_exact_match_{stage}": score_outputs(title, model, tokenizer, pairs)}

    def adapter_info(self, tokenizer) -> dict:
        return {"max_length": self.config.max_length, "input_column": self.config.input_column,
                "target_column": self.config.target_column}


# --- lorafit eval -------------------------------------------------------------------------------------
def evaluate_seq2seq_file(loaded, table, *, batch_size: int, max_length: int | None = None,
                          input_column: str | None = None, target_column: str | None = None) -> dict:
    """`lorafit eval` for a seq2seq adapter: loss and perplexity on the file's target tokens."""
    info = loaded.info
    pairs = pairs_from_table(table, "--data", input_column or info.get("input_column", "input"),
                             target_column or info.get("target_column", "target"))
    max_length = max_length or info.get("max_length") or DEFAULT_MAX_LENGTH["seq2seq"]
    examples = tokenize_pairs(pairs, loaded.tokenizer, role="evaluation", max_length=max_length)
    metrics = evaluate_seq2seq(loaded.model, examples, make_seq2seq_collator(loaded.tokenizer.pad_token_id), batch_size)
    metrics["examples"] = len(examples)
    return metrics
