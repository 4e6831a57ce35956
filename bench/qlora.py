"""QLoRA on SmolLM2: an fp32 base against lorafit's and PEFT's 4-bit (nf4) bases, same data and loop.

Each side trains r=8 LoRA on every linear layer (the causal-LM default) over the same encoded examples of
lorafit's built-in instruct set, 48 steps of batch 4, lr 3e-3 decaying linearly, AdamW, gradient checkpointing
(as QLoRA trains: otherwise activations, not weights, dominate the memory of a 135M model), in the same plain
loop (options ``batch_size``, ``steps`` and ``gradient_checkpointing`` change that); lorafit's sides take
lorafit's causal-LM loss, PEFT's side the model's own. Then each answers the built-in held-out prompts
greedily (lorafit's generation path for all) and is scored by exact match. Both 4-bit sides keep bitsandbytes' standard weight layout on the CPU (``lorafit.quantized.keep_standard_layout``).

Memory: ``train_peak_rss_mb`` is the largest resident set sampled during training (every 50 ms), the
figure QLoRA is about, and ``train_peak_over_start_mb`` that peak less the resident set before the model was
loaded (libraries, data); ``peak_rss_mb`` is the whole process's peak, loading included, where transformers
maps the full fp32 checkpoint while it quantizes.
"""

from __future__ import annotations

import json
import math
import threading
import time
from importlib import resources

from bench.common import peak_rss_mb
from bench.fixtures import Setup

BATCH, LR, R, ALPHA, MAX_LENGTH = 4, 3e-3, 8, 16, 256
SMOKE_STEPS, FULL_STEPS = 2, 48
CHECKPOINTING = True


def _rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


class PeakSampler:
    """The largest resident set seen while the block runs, sampled from a thread."""

    def __enter__(self) -> "PeakSampler":
        self.peak, self._stop = _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _records(name: str) -> list[dict]:
    text = resources.files("lorafit").joinpath(f"builtin_data/instruct/{name}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _load(side: str, model_path: str, checkpointing: bool):
    """(model, loss function) for one side: fp32 / lorafit 4-bit through lorafit, PEFT's QLoRA through PEFT."""
    import torch

    if side == "peft":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from lorafit.quantized import keep_standard_layout

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=quant, dtype=torch.float32)
        for module in base.modules():  # the 4-bit kernels lorafit's side runs (see lorafit.quantized)
            keep_standard_layout(module)
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, lora_dropout=0.05,
                                                target_modules="all-linear"))
        return model, lambda m, batch: m(**batch).loss
    from lorafit.config import LoraConfig
    from lorafit.inference.base_models import load_causal_lm
    from lorafit.model import get_lora_model
    from lorafit.tasks.causal_lm import causal_loss
    from lorafit.training.settings import QuantizeSettings

    quantization = QuantizeSettings("4bit") if side == "lorafit-4bit" else None
    base = load_causal_lm(model_path, quantization=quantization)
    model = get_lora_model(base, LoraConfig(task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, lora_dropout=0.05,
                                            target_modules="all-linear"))
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    return model, causal_loss


def run_side(setup: Setup, options: dict) -> dict:
    """One side's training figures and held-out exact match; ``options["side"]``: fp32, lorafit-4bit or peft."""
    import torch
    from lorafit.data.chat import make_lm_collator, tokenize_lm
    from lorafit.inference.base_models import load_tokenizer
    from lorafit.tasks.causal_lm import exact_match, heldout_pairs, reply_budget
    from lorafit.inference.generate import GenerationSettings, generate_replies

    steps = SMOKE_STEPS if setup.smoke else options.get("steps", FULL_STEPS)
    batch_size, checkpointing = options.get("batch_size", BATCH), options.get("gradient_checkpointing", CHECKPOINTING)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(setup.llm_model)
    examples, _ = tokenize_lm(_records("train"), tokenizer, max_length=MAX_LENGTH)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    collate = make_lm_collator(tokenizer.pad_token_id)
    batches = [collate([examples[order[(s * batch_size + i) % len(order)]] for i in range(batch_size)])
               for s in range(steps)]
    before_load = _rss_mb()
    model, loss_fn = _load(options["side"], setup.llm_model, checkpointing)
    loaded = _rss_mb()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    model.train()
    tokens, losses = 0, []
    with PeakSampler() as sampler:
        started = time.perf_counter()
        for batch in batches:
            loss = loss_fn(model, batch)
            loss.backward()
            optimizer.step(), schedule.step(), optimizer.zero_grad(set_to_none=True)
            tokens += int(batch["attention_mask"].sum())
            losses.append(round(loss.item(), 4))
        seconds = time.perf_counter() - started
    model.eval()
    pairs = heldout_pairs(_records("validation"))
    if setup.smoke:
        pairs = pairs[:2]
    references = [ref for _, ref in pairs]
    settings = GenerationSettings(batch_size=32, max_new_tokens=reply_budget(tokenizer, references))
    started = time.perf_counter()
    replies = generate_replies(model, tokenizer, [prompt for prompt, _ in pairs], settings)
    return {"tokens_per_second": round(tokens / seconds, 1), "train_seconds": round(seconds, 1), "steps": steps,
            "batch_size": batch_size, "gradient_checkpointing": checkpointing,
            "first_loss": losses[0], "last_loss": losses[-1], "train_peak_rss_mb": round(sampler.peak, 1),
            "train_peak_over_start_mb": round(sampler.peak - before_load, 1),
            "peak_rss_mb": peak_rss_mb(), "rss_before_load_mb": round(before_load, 1),
            "rss_after_load_mb": round(loaded, 1), "heldout_exact_match": exact_match(replies, references),
            "heldout_prompts": len(pairs), "generate_seconds": round(time.perf_counter() - started, 1),
            "loss_is_finite": all(math.isfinite(x) for x in losses)}


def summary_rows(case: dict) -> list[str]:
    """The case as a markdown table (results.md's QLoRA section)."""
    rows = ["| side | tokens/s | train peak RSS MiB | of which model + training MiB | process peak RSS MiB | "
            "held-out exact match | loss first -> last |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for side, result in case.items():
        figures = result.get("median", result)
        if "error" in result:
            rows.append(f"| {side} | error: {result['error']} | | | | | |")
            continue
        runs = result.get("runs") or [figures]
        rows.append(f"| {side} | {figures.get('tokens_per_second')} | {figures.get('train_peak_rss_mb')} | "
                    f"{figures.get('train_peak_over_start_mb')} | {figures.get('peak_rss_mb')} | {figures.get('heldout_exact_match')} | "
                    f"{runs[0].get('first_loss')} -> {runs[0].get('last_loss')} |")
    return rows

