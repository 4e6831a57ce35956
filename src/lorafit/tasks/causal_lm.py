"""`lorafit train --task causal-lm`: instruction-tune an LLM with LoRA, evaluate it, generate with it.

The loss applies the LM head only at positions whose next token is trained (the response), so
prompt tokens cost the transformer body but not the vocabulary-sized output layer; a prompt prefix
every row shares runs once (prefix_sharing.py). Held-out replies come from inference/generate.py, as
`lorafit generate`'s do.
"""

from __future__ import annotations

import math

import torch

from lorafit.data import chat as lm_data
from lorafit.errors import LorafitError
from lorafit.fast.causal_loss import causal_loss, response_nll
from lorafit.inference.base_models import load_causal_lm
from lorafit.inference.generate import GenerationSettings, generate_replies
from lorafit.tasks.task import Task, eval_mode
from lorafit.training.distributed import gather_lists, local_share
from lorafit.training.settings import DEFAULT_MAX_LENGTH

SAMPLE_COUNT = 3
HELDOUT_LIMIT = 100  # generating for every row of a large validation set would dwarf training time
NEW_TOKEN_MARGIN = 8
GENERATION_BATCH = 32
# perplexity is exp(loss): a diverged run would overflow exp() (past ~709); e**50 already reads as "diverged"
MAX_LOG_PERPLEXITY = 50.0


def heldout_pairs(records: list[dict]) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference reply) for each record that has a reply to compare against."""
    pairs = []
    for record in records:
        kind = lm_data.detect_format(k for k, v in record.items() if v is not None)
        if kind == "text":
            continue
        messages = lm_data.record_messages(record, kind)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is not None:
            pairs.append((messages[:last], messages[last]["content"]))
    return pairs


# --- loss and evaluation ------------------------------------------------------------------------------
@torch.inference_mode()
def evaluate_lm(model, examples: list[dict], collate, batch_size: int) -> dict:
    """Token-weighted loss and perplexity over the response tokens of ``examples``; with several processes each
    evaluates its share and the sums are gathered."""
    device = next(model.parameters()).device
    examples = local_share(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # less padding
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[start:start + batch_size]])
            nll, n = response_nll(model, {k: v.to(device) for k, v in batch.items()})
            total, count = total + nll.item(), count + int(n)
    sums = gather_lists([(total, count)])
    total, count = sum(part[0] for part in sums), sum(part[1] for part in sums)
    loss = total / max(1, count)
    return {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, MAX_LOG_PERPLEXITY)), 4), "tokens": count}


# --- generation ---------------------------------------------------------------------------------------
def reply_budget(tokenizer, references: list[str]) -> int:
    """max_new_tokens for held-out generation: the longest reference plus a margin."""
    longest = max((len(lm_data.tokenize_text(tokenizer, ref)) for ref in references), default=0)
    return longest + NEW_TOKEN_MARGIN


def exact_match(replies: list[str], references: list[str]) -> float:
    """Fraction of replies equal to their reference, ignoring surrounding whitespace."""
    hits = sum(reply.strip() == ref.strip() for reply, ref in zip(replies, references))
    return round(hits / max(1, len(references)), 4)


def score_heldout(title: str, model, tokenizer, pairs: list[tuple[list[dict], str]]) -> float:
    """Greedy replies to the held-out prompts: print a few samples and return the exact-match score."""
    references = [ref for _, ref in pairs]
    settings = GenerationSettings(batch_size=GENERATION_BATCH, max_new_tokens=reply_budget(tokenizer, references))
    replies = generate_replies(model, tokenizer, [prompt for prompt, _ in pairs], settings)
    print(f"\n{title}:\n" + "-" * (len(title) + 1))
    for (prompt, reference), reply in list(zip(pairs, replies))[:SAMPLE_COUNT]:
        print(f"prompt:    {prompt[-1]['content']}\ngenerated: {reply.strip()}\nexpected:  {reference}\n")
    score = exact_match(replies, references)
    print(f"held-out exact match: {score:.1%} of {len(pairs)}")
    return score


# --- the task -----------------------------------------------------------------------------------------
class CausalLmTask(Task):
    """Instruction-tuning a causal LM: loss on the response tokens, greedy replies to held-out prompts."""

    name = "causal-lm"
    lora_task_type = "CAUSAL_LM"
    counts_tokens = True

    def load_data(self) -> None:
        self.data = lm_data.load_lm_data(self.config)
        self.description = self.data.description

    def tokenize(self, tokenizer) -> dict:
        config = self.config
        tokenized = {split: lm_data.tokenize_split(records, tokenizer, split=split, max_length=config.max_length,
                                                   train_on_prompt=config.train_on_prompt,
                                                   pack=config.pack and split == "train")
                     for split, records in self.data.splits.items()}
        # after tokenizing, whose errors name the split of a malformed record
        self.pairs = heldout_pairs(self.data.splits.get("validation", []))[:HELDOUT_LIMIT]
        return tokenized

    def describe_data(self, tokenized: dict) -> str:
        return lm_data.describe_lm_data(self.data, tokenized, self.config)

    def load_base(self, model_path: str, tokenizer):
        base = load_causal_lm(model_path, quantization=self.config)
        if base.generation_config.pad_token_id is None:
            base.generation_config.pad_token_id = tokenizer.pad_token_id
        return base

    def collator(self, tokenizer):
        return lm_data.make_lm_collator(tokenizer.pad_token_id, padding_side="right")

    def loss(self, model, batch: dict) -> torch.Tensor:
        return causal_loss(model, batch)

    def loss_weight(self, example: dict) -> int:
        return sum(label != lm_data.IGNORE_INDEX for label in example["labels"][1:])  # causal_loss: a mean over these

    def table_metric(self) -> str:
        return "perplexity"

    def evaluate(self, model, examples, collate) -> dict:
        metrics = evaluate_lm(model, examples, collate, self.config.eval_batch_size)
        return {"loss": metrics["loss"], "perplexity": metrics["perplexity"]}

    def demo(self, stage: str, model, tokenizer) -> dict:
        if not self.pairs:
            return {}
        title = f"Sample generations {stage} training"
        return {f"heldout_exact_match_{stage}": score_heldout(title, model, tokenizer, self.pairs)}

    def adapter_info(self, tokenizer) -> dict:
        return {"max_length": self.config.max_length, "chat": lm_data.has_chat_template(tokenizer),
                "train_on_prompt": self.config.train_on_prompt}


# --- lorafit eval -------------------------------------------------------------------------------------
def evaluate_causal_file(loaded, table, *, batch_size: int, max_length: int | None = None) -> dict:
    """`lorafit eval` for a causal-LM adapter: loss and perplexity on the file's response tokens."""
    try:
        lm_data.detect_format(table.column_names)
    except LorafitError as err:
        raise LorafitError(f"--data: {err}") from None
    max_length = max_length or loaded.info.get("max_length") or DEFAULT_MAX_LENGTH["causal-lm"]
    examples = lm_data.tokenize_split(table.to_list(), loaded.tokenizer, split="evaluation", max_length=max_length)
    collate = lm_data.make_lm_collator(loaded.tokenizer.pad_token_id, padding_side="right")
    metrics = evaluate_lm(loaded.model, examples, collate, batch_size)
    metrics["examples"] = len(examples)
    return metrics
