"""The in-process CPU cases on the classifier base model: inference and mixed batches (LoRA on query/value
and on all-linear), switching, scaling, and this machine's fp32 (and, where fast, bf16) matmul peak."""

from __future__ import annotations

import tempfile

from bench import steps
from bench.common import Clock, matmul_peak_gflops
from bench.fixtures import Setup
from lorafit.config import ALL_LINEAR  # measured beside TARGETS (on BERT: query, key, value, every dense layer)

TARGETS = ["query", "value"]
BF16_PROBE_SECONDS = 10.0
"""The most the bf16 matmul probe may take (fp32's is fast on any CPU)."""


def load_base(setup: Setup):
    from lorafit.inference.base_models import load_classifier

    return load_classifier(setup.cls_model, num_labels=2, id2label={0: "negative", 1: "positive"},
                           label2id={"negative": 0, "positive": 1}).eval()


def run_inference(setup: Setup, options: dict) -> dict:
    s = setup.sizes
    base = load_base(setup)
    batch = steps.random_batch(base, s.infer_batch, s.infer_tokens)
    result = steps.inference(base, "SEQ_CLS", TARGETS, batch, s.infer_rounds, warmup=2, clock=Clock(), r=s.r)
    all_linear = steps.inference(base, "SEQ_CLS", ALL_LINEAR, batch, s.infer_rounds, warmup=2, clock=Clock(), r=s.r)
    return {"batch": s.infer_batch, "tokens": s.infer_tokens, "variants": result,
            "all_linear": {"variants": all_linear}}


def run_mixed(setup: Setup, options: dict) -> dict:
    s = setup.sizes
    base = load_base(setup)
    batch = steps.random_batch(base, s.infer_batch, s.infer_tokens)
    result = steps.mixed_batches(base, "SEQ_CLS", TARGETS, batch, s.mixed_rounds, warmup=1, clock=Clock(), r=s.r)
    all_linear = steps.mixed_batches(base, "SEQ_CLS", ALL_LINEAR, batch, s.mixed_rounds, warmup=1, clock=Clock(),
                                     r=s.r)
    return {"batch": s.infer_batch, "tokens": s.infer_tokens, **result, "all_linear": all_linear}


def run_switching(setup: Setup, options: dict) -> dict:
    s = setup.sizes
    base = load_base(setup)
    with tempfile.TemporaryDirectory(prefix="bench-adapters-", dir=setup.workdir) as adapter_dir:
        return steps.switching(base, lambda: load_base(setup), "SEQ_CLS", TARGETS, s.switch_repeats,
                               s.reload_repeats, adapter_dir, r=s.r)


def run_scaling(setup: Setup, options: dict) -> dict:
    s = setup.sizes
    base = load_base(setup)
    return steps.scaling(base, "SEQ_CLS", TARGETS, s.scaling_ranks, s.scaling_lengths, s.batch_size,
                         s.scaling_steps, Clock(), fixed_r=s.r, fixed_length=s.max_length)


def run_matmul(setup: Setup, options: dict) -> dict:
    """fp32 peak (the reference for achieved GFLOP/s), and bf16's for what autocast could reach here.

    The bf16 probe runs only where the CPU has fast bf16 and within BF16_PROBE_SECONDS: without
    AVX512-BF16/AMX one 2048^3 bf16 matmul on one thread took over 8 minutes.
    """
    import torch

    from lorafit.cpu import cpu_has_bf16

    result = matmul_peak_gflops(n=setup.sizes.matmul_n)
    if not cpu_has_bf16():
        result["bf16_skipped"] = "this CPU has no fast bf16 (no avx512_bf16 or amx_bf16 in /proc/cpuinfo)"
        return result
    bf16 = matmul_peak_gflops(n=setup.sizes.matmul_n, dtype=torch.bfloat16, budget_s=BF16_PROBE_SECONDS)
    result["bf16_best_gflops"], result["bf16_n"] = bf16["best_gflops"], bf16["n"]
    return result


def matmul_params(model_dir: str, kind: str) -> dict:
    """Parameters that take part in matmuls per token (embedding lookups excluded; a tied LM head counted)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        if kind == "causal":
            model = AutoModelForCausalLM.from_config(config)
        else:
            config.num_labels = 2
            model = AutoModelForSequenceClassification.from_config(config)
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embed" in n)
    total = sum(p.numel() for p in model.parameters())
    matmul = total - embedding
    head = model.get_output_embeddings() if kind == "causal" else None
    if head is not None and head.weight is model.get_input_embeddings().weight:
        matmul += head.weight.numel()  # a tied LM head multiplies by the embedding table
    return {"total": total, "matmul": matmul, "head": head.weight.numel() if head is not None else 0}
