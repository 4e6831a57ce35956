"""Model-level measurements shared by the CPU cases and the GPU suite: inference, mixed batches,
adapter switching and training-step scaling, each with lorafit and PEFT side by side.

Every function takes a ready base model (any device and dtype), times variants interleaved round by
round (``common.interleaved``) and returns medians and per-round ratios.
"""

from __future__ import annotations

import copy
import time

import torch

from bench.common import Clock, interleaved, median, summarize


def random_batch(model, batch: int, tokens: int, seed: int = 0, labels: str | None = None) -> dict:
    """A full (unpadded) batch of random ids; ``labels``: "class" or "lm" adds training labels."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    low = min(1000, config.vocab_size // 2)  # clear of the special tokens
    ids = torch.randint(low, config.vocab_size, (batch, tokens), generator=generator)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels == "class":
        out["labels"] = torch.randint(0, config.num_labels, (batch,), generator=generator)
    elif labels == "lm":
        out["labels"] = ids.clone()
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in out.items()}


def lorafit_config(task: str, r: int, targets: list[str], alpha: float = 16, dropout: float = 0.05):
    from lorafit import LoraConfig

    return LoraConfig(task_type=task, r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)


def peft_config(task: str, r: int, targets: list[str], alpha: float = 16, dropout: float = 0.05):
    from peft import LoraConfig

    return LoraConfig(task_type=task, r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)


def randomize_lora_b(model, seed: int = 0, std: float = 0.02) -> None:
    """Trained adapters have non-zero B: give every B factor random values so updates are real."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator).to(param) * std)


def lorafit_model(base, task: str, r: int, targets: list[str], adapters: int = 1):
    """A copy of ``base`` with ``adapters`` lorafit adapters a0, a1, ... (a0 active), in eval mode."""
    from lorafit import get_lora_model

    model = get_lora_model(copy.deepcopy(base), lorafit_config(task, r, targets), adapter_name="a0")
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", lorafit_config(task, r, targets))
    model.set_adapter("a0")
    randomize_lora_b(model)
    return model.eval()


def peft_model(base, task: str, r: int, targets: list[str], adapters: int = 1):
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base), peft_config(task, r, targets), adapter_name="a0")
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", peft_config(task, r, targets))
    model.set_adapter("a0")
    randomize_lora_b(model)
    return model.eval()


def forward(model, batch: dict, **kwargs):
    def run():
        with torch.inference_mode():
            model(**batch, **kwargs)
    return run


def inference(base, task: str, targets: list[str], batch: dict, rounds: int, warmup: int, clock: Clock,
              r: int = 8) -> dict:
    """Base model vs lorafit unmerged vs lorafit merged (vs PEFT unmerged, for reference).

    Every variant, the base included, is a fresh deep copy: a model loaded from disk can keep its
    weights in file-backed pages, and the comparison should be of the computations alone.
    """
    base = copy.deepcopy(base).eval()
    unmerged = lorafit_model(base, task, r, targets)
    merged = lorafit_model(base, task, r, targets).merge_and_unload().eval()
    peft = peft_model(base, task, r, targets)
    variants = {"base": forward(base, batch), "lorafit_unmerged": forward(unmerged, batch),
                "lorafit_merged": forward(merged, batch), "peft_unmerged": forward(peft, batch)}
    return summarize(interleaved(variants, rounds, warmup, clock), baseline="base")


def _rows(count: int, batch: int) -> list[str]:
    return [f"a{i % count}" for i in range(batch)]


def mixed_batches(base, task: str, targets: list[str], batch: dict, rounds: int, warmup: int, clock: Clock,
                  r: int = 8, counts: tuple = (4, 16)) -> dict:
    """One batch spread over 4 or 16 adapters vs the same batch on the active adapter alone."""
    rows = batch["input_ids"].shape[0]
    adapters = max(counts)
    result = {}
    for side, build in (("lorafit", lorafit_model), ("peft", peft_model)):
        model = build(base, task, r, targets, adapters=adapters)
        variants = {"single": forward(model, batch),
                    "same_adapter_names": forward(model, batch, adapter_names=_rows(1, rows))}
        variants.update({f"mixed_{n}": forward(model, batch, adapter_names=_rows(n, rows)) for n in counts})
        try:
            variants["mixed_4"]()
        except Exception as error:  # PEFT refuses mixed batches through some heads (e.g. RoBERTa's)
            result[side] = {"error": f"{type(error).__name__}: {error}"[:300]}
            continue
        result[side] = summarize(interleaved(variants, rounds, warmup, clock), baseline="single")
        del model
    return result


def switching(base, load_base, task: str, targets: list[str], repeats: int, reload_repeats: int,
              adapter_dir: str, r: int = 8) -> dict:
    """``set_adapter`` between two loaded adapters vs reloading the base model (and the adapter) from disk."""
    from lorafit import LoraModel

    out = {}
    for side, build in (("lorafit", lorafit_model), ("peft", peft_model)):
        model = build(base, task, r, targets, adapters=2)
        times = []
        for i in range(repeats):
            started = time.perf_counter()
            model.set_adapter(f"a{(i + 1) % 2}")
            times.append(time.perf_counter() - started)
        out[f"{side}_set_adapter_ms"] = round(1000 * median(times), 4)
        if side == "lorafit":
            model.save_pretrained(adapter_dir, selected_adapters=["a0"])
        del model
    reload, reload_adapter = [], []
    for _ in range(reload_repeats):
        started = time.perf_counter()
        fresh = load_base()
        reload.append(time.perf_counter() - started)
        LoraModel.from_pretrained(fresh, f"{adapter_dir}/a0")
        reload_adapter.append(time.perf_counter() - started)
        del fresh
    out["reload_base_ms"] = round(1000 * median(reload), 1)
    out["reload_base_and_adapter_ms"] = round(1000 * median(reload_adapter), 1)
    out["reload_over_switch"] = round(out["reload_base_ms"] / max(out["lorafit_set_adapter_ms"], 1e-6), 1)
    return out


def train_step(model, batch: dict, optimizer):
    def run():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run


def training_pair(base, task: str, targets: list[str], batch: dict, steps: int, clock: Clock, r: int = 8,
                  lr: float = 1e-3) -> dict:
    """Step time (forward, backward, AdamW) of lorafit and PEFT on one batch, interleaved."""
    variants = {}
    for side, build in (("lorafit", lorafit_model), ("peft", peft_model)):
        model = build(base, task, r, targets).train()
        params = [p for p in model.parameters() if p.requires_grad]
        variants[side] = train_step(model, batch, torch.optim.AdamW(params, lr=lr, weight_decay=0.01))
    return summarize(interleaved(variants, steps, 1, clock), baseline="peft")


def scaling(base, task: str, targets: list[str], ranks, lengths, batch_size: int, steps: int, clock: Clock,
            fixed_r: int = 8, fixed_length: int = 64) -> dict:
    """Training-step time as the rank grows (at ``fixed_length``) and as the sequence doubles (at ``fixed_r``)."""
    labels = "class" if task == "SEQ_CLS" else "lm"
    by_rank = {}
    for r in ranks:
        batch = random_batch(base, batch_size, fixed_length, labels=labels)
        by_rank[str(r)] = training_pair(base, task, targets, batch, steps, clock, r=r)
    by_length = {}
    for length in lengths:
        batch = random_batch(base, batch_size, length, labels=labels)
        by_length[str(length)] = training_pair(base, task, targets, batch, steps, clock, r=fixed_r)
    return {"batch_size": batch_size, "rank_at_length": fixed_length, "length_at_rank": fixed_r,
            "by_rank": by_rank, "by_length": by_length}
