"""The causal-LM loss, with the LM head run only at scored positions and a shared prompt prefix run once.

Only positions whose next token is trained (the response) need the vocabulary-sized output layer, so
while fast paths are on the loss calls the transformer body itself and applies the head to those
hidden states alone; the body runs a prompt prefix every row shares once (prefix_sharing.py). The
plain path is transformers' own forward over every position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafit.data.chat import IGNORE_INDEX
from lorafit.fast import is_on, unwrapped_base
from lorafit.fast.prefix_sharing import body_hidden

LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
"""Config fields of models whose logits are not plain head(hidden): their loss takes the full forward."""


def model_inputs(batch: dict) -> dict:
    """Forward inputs of a batch; packed batches drop attention_mask so attention stays within each example.

    Without a 2-D mask (and without a cache) transformers' SDPA and eager attention mask each row
    block-diagonally where its position_ids restart; the collator pads on the right, so padding never
    precedes a real token. Flash-attention needs the batch in one row first (``varlen_layout``).
    """
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    elif "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs


def attention_of(model) -> str:
    """The attention implementation of the transformers model inside ``model`` (LoraModel, DDP wrapper)."""
    return str(getattr(getattr(unwrapped_base(model), "config", None), "_attn_implementation", None) or "")


def one_row(batch: dict) -> dict:
    """A packed batch's rows laid end to end in one row, their padding dropped (a pack of packs)."""
    real = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(batch["input_ids"]).bool()
    return {key: value[real][None] for key, value in batch.items()}


def varlen_layout(model, batch: dict) -> dict:
    """The batch as ``model``'s attention keeps packed examples apart.

    Flash-attention runs its varlen kernel from position_ids only for a batch of one row (transformers'
    ``_is_packed_sequence``); a row of a larger packed batch would be one causal sequence across its examples.
    """
    if "position_ids" in batch and batch["input_ids"].shape[0] > 1 and "flash" in attention_of(model):
        return one_row(batch)
    return batch


def _causal_lm_of(model):
    """The transformers CausalLM inside a LoraModel (or the model itself); None when the fast path can't apply."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    config = getattr(base, "config", None)
    if body is None or not hasattr(base, "get_output_embeddings") or base.get_output_embeddings() is None:
        return None
    if any(getattr(config, name, None) not in (None, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    return base


def response_nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss over trained positions (label != -100) and their count."""
    batch = varlen_layout(model, batch)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    base = _causal_lm_of(model) if is_on(model) else None
    if base is None:  # also e.g. DistributedDataParallel, whose forward must be called for gradient sync
        logits = model(**model_inputs(batch)).logits[:, :-1][keep]
    else:
        # The LoRA layers live inside the transformers model, so calling its body directly still applies them.
        logits = base.get_output_embeddings()(body_hidden(base, batch, keep, model_inputs(batch)))
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), keep.sum()


def causal_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over the batch's trained tokens (equal to transformers' ``labels=`` loss)."""
    total, count = response_nll(model, batch)
    return total / count.clamp(min=1)
