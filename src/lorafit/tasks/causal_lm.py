"""`lorafit train --task causal-lm`: instruction-tune an LLM with LoRA, evaluate it, generate with it.

The loss applies the LM head only at positions whose next token is trained (the response), so
prompt tokens cost the transformer body but not the vocabulary-sized output layer; a prompt prefix
every row shares runs once (prefix_sharing.py). Held-out replies come from inference/generate.py, as
`lorafit generate`'s do.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from lorafit.data import classification as data

from lorafit.data import chat as lm_data
from lorafit.config import ALL_LINEAR, LoraConfig
from lorafit.errors import LorafitError
from lorafit.tasks.pipeline import _num, _print_summary, default_output_dir, peak_rss_mb
from lorafit.inject import check_each_target_matches
from lorafit.model import get_lora_model
from lorafit.inference.base_models import load_causal_lm, load_tokenizer, model_reference, resolve_model
from lorafit.fast.prefix_sharing import body_hidden
from lorafit.inference.generate import GenerationSettings, generate_replies
from lorafit.training.run_dir import model_card, plot_curves, prepare_run_dir, save_adapter_info, write_text
from lorafit.training.loop import restore_best, run_training, seed_everything
from lorafit.training.settings import TrainConfig

SAMPLE_COUNT = 3
HELDOUT_LIMIT = 100  # generating for every row of a large validation set would dwarf training time
NEW_TOKEN_MARGIN = 8
GENERATION_BATCH = 32
_ROLE = {"train": "training", "test": "test", "validation": "validation"}
# Models whose logits are not plain head(hidden): their loss goes through the full forward.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class LmData:
    splits: dict[str, list[dict]]  # raw records per split
    description: str


# --- data ------------------------------------------------------------------------------------------
def load_lm_data(config: TrainConfig) -> LmData:
    """Read every split and check its record shape before anything is written."""
    if config.dataset:
        raw = data.load_hub_dataset(config.dataset, config.dataset_config)
        description = f"hub dataset `{config.dataset}`"
    elif config.train_file:
        files = {"train": config.train_file, "validation": config.validation_file, "test": config.test_file}
        raw = {split: data.read_table(path, encoding=config.encoding, role=f"{split} file")
               for split, path in files.items() if path}
        description = ", ".join(f"{split}: `{path}`" for split, path in files.items() if path)
    else:
        if config.validation_file or config.test_file:
            raise LorafitError("--validation-file and --test-file need --train-file too")
        raw = load_builtin_instruct()
        description = "lorafit's built-in instruction set (to-do items from requests)"
    if "train" not in raw:
        raise LorafitError(f"no training split found (splits: {', '.join(raw)}); pass --train-file")
    limits = {"train": config.max_train_samples, "validation": config.max_eval_samples}
    splits = {}
    for split, table in raw.items():
        if split not in ("train", "validation", "test"):
            continue
        try:
            lm_data.detect_format(table.column_names)
        except LorafitError as err:
            raise LorafitError(f"{split} data: {err}") from None
        records = table.to_list()
        splits[split] = records[: limits.get(split)] if limits.get(split) else records
    return LmData(splits, description)


def describe_lm_data(lm: LmData, tokenized: dict[str, list[dict]], config: TrainConfig) -> str:
    """What was loaded: examples and record shape per split, so a file read wrongly shows at once."""
    lines = [f"Data: {lm.description}"]
    for split, records in lm.splits.items():
        line = f"  {split}: {len(records)} examples ({lm_data.detect_format(records[0]) if records else 'none'})"
        if config.pack and split == "train":
            line += f", packed into {len(tokenized[split])} sequences of up to {config.max_length} tokens"
        lines.append(line)
    return "\n".join(lines)


def load_builtin_instruct() -> dict:
    """The shipped LLM quickstart set as {"train": Dataset, "validation": Dataset}."""
    folder = resources.files("lorafit") / "builtin_data" / "instruct"
    splits = {}
    for split in ("train", "validation"):
        resource = folder / f"{split}.jsonl"
        if not resource.is_file():
            raise LorafitError(f"the built-in instruction data is missing from this installation ({resource}); "
                               "reinstall lorafit or pass --train-file")
        with resources.as_file(resource) as file:
            splits[split] = data.read_table(file)
    return splits


def tokenize_split(records: list[dict], tokenizer, *, split: str, max_length: int, train_on_prompt: bool = False,
                   pack: bool = False) -> list[dict]:
    """Token ids and response-only labels; warns on stderr about examples cut by max_length."""
    try:
        examples, cut = lm_data.tokenize_lm(records, tokenizer, max_length=max_length,
                                            train_on_prompt=train_on_prompt, pack=pack)
    except LorafitError as err:
        raise LorafitError(f"{split} data: {err}") from None
    if cut:
        print(f"lorafit: {cut} of {len(records)} {_ROLE.get(split, split)} examples were longer than --max-length {max_length} "
              "and were cut", file=sys.stderr)
    if not examples:
        raise LorafitError(f"{split} data has no example with a response token within --max-length {max_length}; "
                           "raise --max-length or check the data")
    return examples


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
def model_inputs(batch: dict) -> dict:
    """Forward inputs of a batch; packed batches drop attention_mask so attention stays within each example.

    Without a 2-D mask transformers builds block-diagonal attention from restarting position_ids;
    the collator pads on the right, so padding never precedes a real token.
    """
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    elif "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs


def _causal_lm_of(model):
    """The transformers CausalLM inside a LoraModel (or the model itself); None when the fast path can't apply."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    config = getattr(base, "config", None)
    if body is None or not hasattr(base, "get_output_embeddings") or base.get_output_embeddings() is None:
        return None
    if any(getattr(config, name, None) not in (None, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return base


def response_nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss over trained positions (label != -100) and their count, the LM head run only there."""
    targets = batch["labels"][:, 1:]
    keep = targets != lm_data.IGNORE_INDEX
    base = _causal_lm_of(model)
    if base is None:  # e.g. DistributedDataParallel, whose forward must be called for gradient sync
        logits = model(**model_inputs(batch)).logits[:, :-1][keep]
    else:
        # The LoRA layers live inside the transformers model, so calling its body directly still applies them.
        logits = base.get_output_embeddings()(body_hidden(base, batch, keep, model_inputs(batch)))
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), keep.sum()


def causal_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over the batch's trained tokens (equal to transformers' ``labels=`` loss)."""
    total, count = response_nll(model, batch)
    return total / count.clamp(min=1)


@torch.inference_mode()
def evaluate_lm(model, examples: list[dict], collate, batch_size: int) -> dict:
    """Token-weighted loss and perplexity over the response tokens of ``examples``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # less padding
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start:start + batch_size]])
        nll, n = response_nll(model, {k: v.to(device) for k, v in batch.items()})
        total, count = total + nll.item(), count + int(n)
    model.train(was_training)
    loss = total / max(1, count)
    return {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, 50.0)), 4), "tokens": count}


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


# --- training -----------------------------------------------------------------------------------------
def lora_targets(config: TrainConfig) -> list[str] | str | None:
    """--target-modules as LoraConfig wants it: the single word all-linear is a keyword, not a module name."""
    targets = config.target_modules
    if targets and len(targets) == 1 and targets[0].lower() == ALL_LINEAR:
        return ALL_LINEAR
    return targets


def train_causal_lm(config: TrainConfig) -> dict:
    """Instruction-tune a causal LM end to end (config already resolved); returns the final metrics."""
    started = time.perf_counter()
    lm = load_lm_data(config)
    model_path = resolve_model(config.model)
    tokenizer = load_tokenizer(model_path)
    tokenized = {split: tokenize_split(records, tokenizer, split=split, max_length=config.max_length,
                                       train_on_prompt=config.train_on_prompt, pack=config.pack and split == "train")
                 for split, records in lm.splits.items()}
    pairs = heldout_pairs(lm.splits.get("validation", []))[:HELDOUT_LIMIT]
    run_dir = Path(config.output_dir) if config.output_dir else default_output_dir(config)
    model = build_model(config, model_path, tokenizer)
    # only now that the data, model and adapter settings have all been checked is anything written
    prepare_run_dir(run_dir, config)
    print(describe_lm_data(lm, tokenized, config))
    model.print_trainable_parameters()
    final: dict = {}
    if pairs:
        final["heldout_exact_match_before"] = score_heldout("Sample generations before training", model, tokenizer, pairs)
    collate = lm_data.make_lm_collator(tokenizer.pad_token_id, padding_side="right")
    counted = {"tokens": 0}

    def collate_counting(features: list[dict]) -> dict:
        batch = collate(features)
        counted["tokens"] += int(batch["attention_mask"].sum())
        return batch

    validation = tokenized.get("validation")

    def evaluate() -> dict:
        metrics = evaluate_lm(model, validation, collate, config.eval_batch_size)
        return {"loss": metrics["loss"], "perplexity": metrics["perplexity"]}

    print(f"\n{'Epoch':>6} {'Step':>6} {'Training Loss':>14} {'Validation Loss':>16} {'Perplexity':>11}")

    def show(record: dict) -> None:
        print(f"{record['epoch']:>6.2f} {record['step']:>6d} {_num(record['train_loss']):>14} "
              f"{_num(record.get('loss')):>16} {_num(record.get('perplexity')):>11}", flush=True)

    result = run_training(model, tokenized["train"], collate_counting, causal_loss,
                          evaluate if validation is not None else None, config, run_dir, show)
    if not restore_best(model, run_dir):
        model.save_pretrained(run_dir / "best")
    info = {"task": "causal-lm", "base_model": model_reference(config.model), "max_length": config.max_length,
            "chat": lm_data.has_chat_template(tokenizer), "train_on_prompt": config.train_on_prompt}
    save_adapter_info(run_dir / "best", info)
    tokenizer.save_pretrained(run_dir / "best" / "tokenizer")
    if pairs:
        final["heldout_exact_match_after"] = score_heldout("Sample generations after training", model, tokenizer, pairs)
    final.update(run_figures(result, counted["tokens"]))
    for split in ("validation", "test"):
        if split in tokenized:
            metrics = evaluate_lm(model, tokenized[split], collate, config.eval_batch_size)
            final.update({f"{split}_loss": metrics["loss"], f"{split}_perplexity": metrics["perplexity"]})
    plot_curves(run_dir, result.state.history, "perplexity")
    write_text(run_dir / "README.md", model_card(base_model=config.model, data=lm.description, config=asdict(config),
                                                 metrics=final, run_dir=run_dir, task="causal-lm"))
    final["total_seconds"] = round(time.perf_counter() - started, 1)
    _print_summary(final, run_dir)
    return final


def build_model(config: TrainConfig, model_path: str, tokenizer):
    """The fp32 base model with a fresh LoRA adapter, seeded, optionally gradient-checkpointed."""
    # before the load: a base saved without its LM head (or any other weight) gets new random ones
    seed_everything(config.seed)
    base = load_causal_lm(model_path)
    if base.generation_config.pad_token_id is None:
        base.generation_config.pad_token_id = tokenizer.pad_token_id
    lora_config = LoraConfig(task_type="CAUSAL_LM", r=config.r, lora_alpha=config.lora_alpha,
                             lora_dropout=config.lora_dropout, target_modules=lora_targets(config))
    check_each_target_matches(base, lora_config.target_modules)
    model = get_lora_model(base, lora_config)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    return model


def run_figures(result, tokens: int) -> dict:
    """Speed and memory of the training loop, for the summary and the model card."""
    figures = {"train_seconds": round(result.seconds, 2),
               "train_samples_per_second": round(result.samples_per_second, 2),
               "train_tokens_per_second": round(tokens / result.seconds, 1) if result.seconds else 0.0,
               "peak_rss_mb": peak_rss_mb()}
    if result.peak_memory_mb is not None:
        figures["peak_gpu_memory_mb"] = round(result.peak_memory_mb, 1)
    return figures


# --- lorafit eval -------------------------------------------------------------------------------------
def evaluate_causal_file(loaded, table, *, batch_size: int, max_length: int | None = None) -> dict:
    """`lorafit eval` for a causal-LM adapter: loss and perplexity on the file's response tokens."""
    try:
        lm_data.detect_format(table.column_names)
    except LorafitError as err:
        raise LorafitError(f"--data: {err}") from None
    max_length = max_length or loaded.info.get("max_length") or 256
    examples = tokenize_split(table.to_list(), loaded.tokenizer, split="evaluation", max_length=max_length)
    collate = lm_data.make_lm_collator(loaded.tokenizer.pad_token_id, padding_side="right")
    metrics = evaluate_lm(loaded.model, examples, collate, batch_size)
    metrics["examples"] = len(examples)
    return metrics
