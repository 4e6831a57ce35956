"""The GPU suite's instruction-tuning case: one epoch over chat data with a realistic length spread.

The data is made here, in the built-in instruct set's shape (a system turn, a user prompt, an assistant
reply) but with the spread of real instruction sets: prompt and reply lengths drawn from log-normal
distributions (medians 60 and 180 words, a long tail cut at 1,500 words), rendered with a ChatML template
set on a word-level tokenizer built from the vocabulary on the spot (one token per word, nothing to
download). The model is the Llama-3.2-1B shape with random weights (tiny on the smoke suite), saved once
and loaded by both sides in fp32, with bf16 autocast on CUDA.

- lorafit: ``run_train`` (what ``lorafit train --task causal-lm --pack --mixed-precision bf16`` runs),
  padding-free: examples packed into rows of ``max_length`` whose position_ids restart per example, so
  SDPA masks them block-diagonally (flash-attention would take them in one varlen row); the LM head runs
  at scored positions only.
- PEFT + Trainer: the usual recipe, ``bf16=True``, ``DataCollatorForSeq2Seq`` padding each batch to its
  longest example, on the same ``tokenize_lm`` tokens.

Tokens/s counts the real (non-pad) tokens of the epoch over each side's training time; the sides take
about the same real tokens per optimizer step (lorafit's packed rows are sized to PEFT's batch).
"""

from __future__ import annotations

import gc
import json
import math
import random
import tempfile
import time
from pathlib import Path

import torch

from bench import llm
from bench.fixtures import CHAT_TEMPLATE, Setup, _word_level, write_jsonl
from lorafit.data.chat import IGNORE_INDEX

TARGETS = ["q_proj", "v_proj"]
SPEEDUP_TARGET = 1.5
"""The issue's goal: lorafit's tokens/s at least this times PEFT + Trainer's."""
SYSTEM = "you are a helpful assistant . answer the request in full ."


def shape(tiny: bool) -> dict:
    """Sizes of the case: an epoch of a few hundred thousand tokens on a GPU, seconds of CPU on smoke."""
    if tiny:
        return {"examples": 24, "max_length": 128, "peft_batch": 4, "prompt_median": 6, "reply_median": 18,
                "longest": 150, "words": 300}
    return {"examples": 1200, "max_length": 2048, "peft_batch": 8, "prompt_median": 60, "reply_median": 180,
            "longest": 1500, "words": 8000}


def vocabulary(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct made-up words of two to four syllables."""
    rng, words = random.Random(seed), set()
    syllables = [c + v for c in "bdfghklmnprstvz" for v in "aeiou"]
    while len(words) < count:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def sentence_text(rng: random.Random, words: list[str], length: int) -> str:
    """``length`` tokens of text: Zipf-like word choices, a period every dozen words or so."""
    out = []
    while len(out) < length:
        out.append(words[min(len(words), int(rng.paretovariate(1.1))) - 1])
        if rng.random() < 0.08:
            out.append(".")
    return " ".join(out[:length])


def chat_records(count: int, sizes: dict, words: list[str], seed: int = 0) -> list[dict]:
    """Conversations (system, user, assistant) whose prompt and reply lengths follow log-normal laws."""
    rng = random.Random(seed)

    def length(median: int) -> int:
        return max(2, min(sizes["longest"], round(rng.lognormvariate(math.log(median), 0.8))))

    return [{"messages": [{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": sentence_text(rng, words, length(sizes["prompt_median"]))},
                          {"role": "assistant", "content": sentence_text(rng, words, length(sizes["reply_median"]))}]}
            for _ in range(count)]


def save_chat_model(path: Path, config, words: list[str], device: str, dtype) -> Path:
    """A word-level tokenizer with a ChatML template and the model of ``config`` sized to it, saved like a hub
    model so both sides load the same weights."""
    from transformers import PreTrainedTokenizerFast

    from bench.gpu import build

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"]
    core, _ = _word_level([" ".join(words + [SYSTEM])], specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<|im_start|>", eos_token="<|im_end|>", model_max_length=8192)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    # the largest id, not the count: a word that is also a special (e.g. "assistant") leaves a gap in the ids
    config.vocab_size = max(config.vocab_size, max(tokenizer.get_vocab().values()) + 1)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 2, 3
    model = build(config, "causal", device, dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    release(device)
    return path


def release(device: str) -> None:
    """Free what the previous side left, so each side's peak memory is its own."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def token_counts(examples: list[dict]) -> dict:
    """The CPU LLM case's counts, and the length spread this case is about."""
    lengths = sorted(len(e["input_ids"]) for e in examples)
    return {**llm.token_counts(examples), "median_length": lengths[len(lengths) // 2], "longest": lengths[-1]}


def pack_rows(peft_batch: int, mean_length: float, max_length: int) -> int:
    """lorafit's packed rows per step: about as many real tokens as PEFT's batch holds."""
    return max(1, round(peft_batch * mean_length / max_length))


def run_lorafit(model_dir: Path, train_file: Path, sizes: dict, rows: int, device: str, workdir: str) -> dict:
    from lorafit.tasks.pipeline import run_train
    from lorafit.training.settings import TrainConfig

    release(device)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-instruct-", dir=workdir) as out:
        config = TrainConfig(task="causal-lm", model=str(model_dir), train_file=str(train_file),
                             max_length=sizes["max_length"], pack=True, batch_size=rows, r=8, lora_alpha=16,
                             lora_dropout=0.05, target_modules=TARGETS, lr=2e-4, epochs=1, warmup_ratio=0.0,
                             weight_decay=0.01, seed=42, eval_strategy="no", save_strategy="no",
                             mixed_precision="bf16" if device.startswith("cuda") else "no",
                             output_dir=str(Path(out) / "run"))
        final = run_train(config)
        # the epoch's mean training loss, as Trainer's training_loss (the only record: no evaluation)
        lines = (Path(out) / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        loss = json.loads(lines[-1]).get("train_loss") if lines else None
    return {"tokens_per_second": final["train_tokens_per_second"], "train_seconds": final["train_seconds"],
            "timed": "lorafit's training loop", "peak_memory_mb": final.get("peak_gpu_memory_mb"),
            "batch": f"{rows} packed row(s) of up to {sizes['max_length']} tokens",
            "train_loss": loss}


def run_peft(model_dir: Path, examples: list[dict], real_tokens: int, sizes: dict, device: str,
             workdir: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    release(device)
    cuda = device.startswith("cuda")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = Dataset.from_list([{k: e[k] for k in ("input_ids", "attention_mask", "labels")} for e in examples])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=TARGETS))
    with tempfile.TemporaryDirectory(prefix="bench-gpu-instruct-peft-", dir=workdir) as out:
        args = TrainingArguments(output_dir=out, learning_rate=2e-4, per_device_train_batch_size=sizes["peft_batch"],
                                 num_train_epochs=1, weight_decay=0.01, warmup_steps=0, eval_strategy="no",
                                 save_strategy="no", report_to=[], bf16=cuda, use_cpu=not cuda, seed=42,
                                 disable_tqdm=True, logging_steps=10_000)
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = trainer.train()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    peak = round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None
    del trainer, model
    release(device)
    return {"tokens_per_second": round(real_tokens / seconds, 1), "train_seconds": round(seconds, 2),
            "timed": "trainer.train()", "peak_memory_mb": peak,
            "batch": f"{sizes['peft_batch']} examples padded to the longest",
            "train_loss": round(result.training_loss, 4)}


def run_instruct(setup: Setup, config, device: str, tiny: bool) -> dict:
    """Both sides, one epoch each over the same examples; tokens/s, peak memory and their ratios."""
    from lorafit.data.chat import tokenize_lm
    from transformers import AutoTokenizer

    sizes = shape(tiny)
    words = vocabulary(sizes["words"])
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with tempfile.TemporaryDirectory(prefix="bench-gpu-instruct-data-", dir=setup.workdir) as tmp:
        model_dir = save_chat_model(Path(tmp) / "model", config, words, device, dtype)
        records = chat_records(sizes["examples"], sizes, words)
        train_file = write_jsonl(Path(tmp) / "train.jsonl", records)
        examples, cut = tokenize_lm(records, AutoTokenizer.from_pretrained(model_dir), max_length=sizes["max_length"])
        counts = {**token_counts(examples), "cut_by_max_length": cut}
        rows = pack_rows(sizes["peft_batch"], counts["mean_length"], sizes["max_length"])
        sides = {"lorafit": run_lorafit(model_dir, train_file, sizes, rows, device, setup.workdir),
                 "peft": run_peft(model_dir, examples, counts["real_tokens"], sizes, device, setup.workdir)}
    speedup = sides["lorafit"]["tokens_per_second"] / sides["peft"]["tokens_per_second"]
    memory = sides["lorafit"]["peak_memory_mb"], sides["peft"]["peak_memory_mb"]
    return {"data": counts, "max_length": sizes["max_length"], "chat_template": "ChatML", "lora": "r=8 q_proj/v_proj",
            "precision": "fp32 weights, bf16 autocast" if dtype == torch.bfloat16 else "fp32",
            **sides, "tokens_per_second": {side: sides[side]["tokens_per_second"] for side in sides},
            "speedup_vs_peft": round(speedup, 3),
            "peak_memory_ratio": round(memory[0] / memory[1], 3) if all(memory) else None,
            "target": f">= {SPEEDUP_TARGET}x", "target_met": speedup >= SPEEDUP_TARGET}

