"""The suite on a CUDA device: roberta-base and a ~1B Llama shape with random weights from configs, bf16,
timed with CUDA events at step level; then instruction tuning of the Llama shape on chat data of realistic
lengths, lorafit's packed loop against PEFT + Trainer over a whole epoch (gpu_instruct.py). On a CPU-only
machine the smoke suite runs the same code on tiny configs in fp32 (``options["device"] == "cpu"``), so this
path is exercised everywhere and cannot rot.
"""

from __future__ import annotations

import tempfile

import torch

from bench import steps
from bench.common import Clock, matmul_peak_gflops
from bench.fixtures import Setup
from bench.gpu_instruct import run_instruct

ROBERTA_TARGETS = ["query", "value"]
LLAMA_TARGETS = ["q_proj", "v_proj"]


def roberta_config(tiny: bool):
    from transformers import RobertaConfig

    if tiny:
        return RobertaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=300, num_labels=2)
    # roberta-base's config.json: position ids start after the padding index, hence 514 positions for 512 tokens
    return RobertaConfig(num_labels=2, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)


def llama_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    # Llama-3.2-1B's shape: 1.24B parameters
    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=True)


def build(config, kind: str, device: str, dtype):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    factory = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    with torch.device(device):
        model = factory.from_config(config, dtype=dtype)
    return model.eval()


def peak_memory(base, task: str, targets: list[str], batch: dict, device: str) -> dict:
    """Peak CUDA memory of two training steps, for each side on its own (None on CPU)."""
    if not device.startswith("cuda"):
        return {"lorafit": None, "peft": None}
    out = {}
    for side, make in (("lorafit", steps.lorafit_model), ("peft", steps.peft_model)):
        model = make(base, task, 8, targets).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        step = steps.train_step(model, batch, optimizer)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        out[side] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        del model, optimizer, step
        torch.cuda.empty_cache()
    return out


def _per_second(pair: dict, items: int) -> dict:
    return {side: round(items / (entry["median_ms"] / 1000), 2) for side, entry in pair.items()}


def run_gpu(setup: Setup, options: dict) -> dict:
    device = options.get("device", "cuda")
    tiny = device == "cpu" or setup.smoke
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    clock = Clock(device)
    rounds, train_steps = (2, 2) if tiny else (30, 10)
    batch_rows, tokens, llm_rows, llm_tokens = (8, 16, 2, 32) if tiny else (64, 64, 4, 256)
    result = {"device": device, "dtype": str(dtype).replace("torch.", ""), "tiny_configs": tiny,
              "matmul_peak": matmul_peak_gflops(n=256 if tiny else 8192, repeats=5 if tiny else 20,
                                                device=device, dtype=dtype)}

    roberta = build(roberta_config(tiny), "cls", device, dtype)
    train_batch = steps.random_batch(roberta, 16, tokens, labels="class")
    pair = steps.training_pair(roberta, "SEQ_CLS", ROBERTA_TARGETS, train_batch, train_steps, clock)
    result["classifier"] = {"step": pair, "samples_per_second": _per_second(pair, 16),
                            "peak_memory_mb": peak_memory(roberta, "SEQ_CLS", ROBERTA_TARGETS, train_batch, device)}
    infer_batch = steps.random_batch(roberta, batch_rows, tokens)
    shape = {"batch": batch_rows, "tokens": tokens}
    result["inference"] = {**shape, "variants": steps.inference(roberta, "SEQ_CLS", ROBERTA_TARGETS, infer_batch,
                                                                rounds, 3, clock)}
    result["mixed"] = {**shape, **steps.mixed_batches(roberta, "SEQ_CLS", ROBERTA_TARGETS, infer_batch, rounds, 3,
                                                      clock)}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-", dir=setup.workdir) as tmp:
        roberta.save_pretrained(f"{tmp}/base")

        def reload():
            from transformers import AutoModelForSequenceClassification

            model = AutoModelForSequenceClassification.from_pretrained(f"{tmp}/base", dtype=dtype).to(device)
            clock.sync()
            return model

        result["switching"] = steps.switching(roberta, reload, "SEQ_CLS", ROBERTA_TARGETS, 50 if tiny else 200,
                                              2 if tiny else 5, f"{tmp}/adapters")
    ranks, lengths = ((1, 64), (8, 32)) if tiny else ((1, 4, 16, 64), (64, 128, 256, 512))
    result["scaling"] = steps.scaling(roberta, "SEQ_CLS", ROBERTA_TARGETS, ranks, lengths, 16, train_steps, clock)
    del roberta

    llama = build(llama_config(tiny), "causal", device, dtype)
    llm_batch = steps.random_batch(llama, llm_rows, llm_tokens, labels="lm")
    pair = steps.training_pair(llama, "CAUSAL_LM", LLAMA_TARGETS, llm_batch, train_steps, clock, lr=2e-4)
    result["llm"] = {"step": pair, "tokens_per_second": _per_second(pair, llm_rows * llm_tokens),
                     "peak_memory_mb": peak_memory(llama, "CAUSAL_LM", LLAMA_TARGETS, llm_batch, device)}
    del llama, llm_batch
    result["instruct"] = run_instruct(setup, llama_config(tiny), device, tiny)
    return result
