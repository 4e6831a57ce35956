"""The body's final hidden states for a causal-LM batch, with a prompt prefix all rows share run once.

Chat templates open every example with the same system turn and role markers (24 of SmolLM2's 55
tokens per example in the benchmark). Attention is causal, so those tokens' hidden states are the
same in every row and need computing once. Two layouts do that:

- **tree**: one packed sequence ``[prefix, rest of row 1, rest of row 2, ...]`` without padding,
  whose mask lets each row's tokens see the prefix and their own row's earlier tokens, and whose
  positions continue from the prefix in every row. It is one call through the body, and the prefix
  shares every matmul with the other tokens. A separate 24-token matmul ran at about 70 GFLOP/s on
  the benchmark machine, against about 175 inside the packed one. Attention then spans the whole
  packed length, so this layout is used only while that stays short next to the hidden size.
- **cache**: the prefix runs alone for the first row. Its keys and values are repeated for every
  row, and the rest of the rows runs against that cache.

Either way the loss and the gradients are those of running every row in full. LoRA dropout draws
one mask for the shared prefix instead of one per row.
"""

from __future__ import annotations

import functools
import inspect

import torch

MIN_SHARED_PREFIX = 8
"""Shorter common prefixes are not worth the extra work."""

TREE_MODEL_TYPES = frozenset({"llama", "gpt2"})
"""Models checked to take explicit position_ids with a custom 4-D mask (tests/test_prefix_sharing.py)."""

TREE_ATTENTION = frozenset({"sdpa", "eager"})
"""Attention implementations that apply a 4-D additive mask as given."""

TREE_MAX_LENGTH_PER_HIDDEN = 0.5
"""The tree's packed length at most this times the hidden size. Attention over the packed length
then costs at most about 8% of the body's matmuls (it grows as length / (6 x hidden))."""


def shared_prefix_length(batch: dict, keep: torch.Tensor) -> int:
    """How many leading tokens every row of the batch shares and no row scores (0: nothing to share)."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    if ids.shape[0] < 2 or "position_ids" in batch:
        return 0
    same = (ids == ids[:1]).all(dim=0)
    if mask is not None:
        same &= mask.bool().all(dim=0)
    length = int(same.long().cumprod(dim=0).sum())
    scored = keep.any(dim=0).nonzero()
    if len(scored):  # a position whose hidden state is scored stays with its row (keep[:, t] scores hidden t)
        length = min(length, int(scored[0]))
    length = min(length, ids.shape[1] - 1)
    return length if length >= MIN_SHARED_PREFIX else 0


def body_hidden(base, batch: dict, keep: torch.Tensor, inputs: dict) -> torch.Tensor:
    """Final hidden states at the positions ``keep`` marks (``keep[:, t]``: hidden t is scored), in
    row-major order; ``inputs`` are the batch's plain forward inputs."""
    body = getattr(base, base.base_model_prefix)
    prefix = shared_prefix_length(batch, keep)
    if prefix:
        tree = tree_layout(base, batch, keep, prefix)
        if tree is not None:
            ids, positions, mask, scored = tree
            hidden = body(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False)
            return hidden.last_hidden_state[0, scored]
    # checkpointed layers recompute without a cache, so they can't take the prefix's keys and values
    if not prefix or any(getattr(m, "gradient_checkpointing", False) for m in base.modules()):
        return body(**inputs).last_hidden_state[:, :-1][keep]
    return _cached_prefix_hidden(base, body, batch, keep, prefix)


def tree_layout(base, batch: dict, keep: torch.Tensor, prefix: int):
    """(ids, position_ids, 4-D mask, scored indices) of the packed tree, or None where it does not apply."""
    config = base.config
    if (getattr(config, "model_type", None) not in TREE_MODEL_TYPES
            or getattr(config, "_attn_implementation", None) not in TREE_ATTENTION):
        return None
    ids = batch["input_ids"]
    rows, width = ids.shape
    mask = batch.get("attention_mask")
    lengths = mask.sum(dim=1) if mask is not None else torch.full((rows,), width, device=ids.device)
    if mask is not None and not torch.equal(mask.bool(), torch.arange(width, device=ids.device) < lengths[:, None]):
        return None  # left padding or holes: the rows' tokens are not a prefix of each row
    rests = lengths - prefix  # each row's tokens after the prefix
    packed_length = prefix + int(rests.sum())
    if packed_length > TREE_MAX_LENGTH_PER_HIDDEN * config.hidden_size:
        return None  # attention over the packed length would start to cost more than the prefix saves
    score_rows, score_positions = keep.nonzero(as_tuple=True)
    if len(score_rows) and not bool(((score_positions >= prefix) & (score_positions + 1 < lengths[score_rows])).all()):
        return None  # a scored position inside the prefix, or one whose target is padding, has no single place
    starts = prefix + torch.cumsum(rests, dim=0) - rests  # where each row's rest begins in the packed sequence
    ends = lengths.tolist()
    packed = torch.cat([ids[0, :prefix]] + [ids[r, prefix:end] for r, end in enumerate(ends)])
    positions = torch.cat([torch.arange(prefix, device=ids.device)]
                          + [torch.arange(prefix, end, device=ids.device) for end in ends])
    segment = torch.cat([torch.full((prefix,), -1, device=ids.device)]
                        + [torch.full((end - prefix,), r, device=ids.device) for r, end in enumerate(ends)])
    order = torch.arange(packed_length, device=ids.device)
    visible = (order[None, :] <= order[:, None]) & ((segment[None, :] == -1) | (segment[None, :] == segment[:, None]))
    dtype = base.get_input_embeddings().weight.dtype
    additive = torch.zeros(packed_length, packed_length, dtype=dtype, device=ids.device)
    additive.masked_fill_(~visible, torch.finfo(dtype).min)
    scored = starts[score_rows] + score_positions - prefix
    return packed[None], positions[None], additive[None, None], scored


@functools.cache
def _cache_argument(body_class: type) -> str:
    """transformers 5.24 renamed past_key_values to cache; earlier releases know only the old name."""
    return "cache" if "cache" in inspect.signature(body_class.forward).parameters else "past_key_values"


def _cached_prefix_hidden(base, body, batch: dict, keep: torch.Tensor, prefix: int) -> torch.Tensor:
    """The cache layout: the prefix runs for row 0, its keys and values are repeated per row, so every
    row's gradient flows back through that one computation."""
    from transformers import DynamicCache

    cache = DynamicCache(config=base.config)
    cache_arg = _cache_argument(type(body))
    body(input_ids=batch["input_ids"][:1, :prefix], use_cache=True, **{cache_arg: cache})
    cache.batch_repeat_interleave(batch["input_ids"].shape[0])
    inputs = {"input_ids": batch["input_ids"][:, prefix:], cache_arg: cache, "use_cache": True}
    if "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"]
    hidden = body(**inputs).last_hidden_state  # positions prefix .. T-1
    return hidden[:, :-1][keep[:, prefix:]]
