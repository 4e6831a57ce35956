"""A prompt prefix shared by every row runs once, as a packed tree or through a repeated cache, with
the loss and gradients of running every row in full."""

from __future__ import annotations

import pytest
import torch

from lorafit.fast import prefix_sharing
from test_causal_lm import (assert_checkpointing_keeps_gradients, assert_matches_transformers_loss, lora_wrapped,
                         shared_prefix_batch)


@pytest.fixture
def tree_for_tiny_models(monkeypatch):
    """Tiny models have a 32-wide hidden state; let the tree cover their 30-token packed batches."""
    monkeypatch.setattr(prefix_sharing, "TREE_MAX_LENGTH_PER_HIDDEN", 4.0)


def count_cache_layout(monkeypatch) -> list:
    calls = []
    original = prefix_sharing._cached_prefix_hidden

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(prefix_sharing, "_cached_prefix_hidden", spy)
    return calls


def keep_of(batch: dict) -> torch.Tensor:
    return batch["labels"][:, 1:] != -100


def prompt_and_replies(prefix: int = 10, lengths=(16, 14, 15), seed: int = 5) -> dict:
    """Rows sharing a ``prefix``-token system prompt, then a 2-token user turn and a reply that is
    scored; right-padded, as the LM collator makes them."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, 100, (len(lengths), width), generator=generator)
    ids[:, :prefix] = ids[0, :prefix]
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    ids[mask == 0] = 0
    labels = ids.clone()
    labels[:, :prefix + 2] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tree_layout_gives_the_same_loss_and_gradients(arch, attention, tree_for_tiny_models, monkeypatch):
    model = lora_wrapped(arch)
    model.get_base_model().config._attn_implementation = attention
    batch = prompt_and_replies()
    assert prefix_sharing.shared_prefix_length(batch, keep_of(batch)) == 10
    assert keep_of(batch).any(dim=1).all()  # every row's reply carries gradient
    assert prefix_sharing.tree_layout(model.get_base_model(), batch, keep_of(batch), 10) is not None
    cache_calls = count_cache_layout(monkeypatch)
    assert_matches_transformers_loss(model, batch)
    assert not cache_calls


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cache_layout_where_the_tree_would_be_too_long(arch, monkeypatch):
    monkeypatch.setattr(prefix_sharing, "TREE_MAX_LENGTH_PER_HIDDEN", 0.5)  # 16 tokens for a 32-wide model
    model = lora_wrapped(arch)
    batch = prompt_and_replies()  # 25 tokens packed
    assert prefix_sharing.tree_layout(model.get_base_model(), batch, keep_of(batch), 10) is None
    cache_calls = count_cache_layout(monkeypatch)
    assert_matches_transformers_loss(model, batch)
    assert cache_calls


def test_tree_positions_mask_and_scored_places_by_hand(tree_for_tiny_models):
    # prefix [5, 6]; row 0 continues 7 8 (length 4), row 1 continues 9 4 3 (length 5)
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 0], [5, 6, 9, 4, 3]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])}
    keep = torch.tensor([[False, False, True, False], [False, False, True, True]])  # hidden t predicts token t+1
    ids, positions, mask, scored = prefix_sharing.tree_layout(lora_wrapped("llama").get_base_model(), batch, keep, 2)
    assert ids.tolist() == [[5, 6, 7, 8, 9, 4, 3]]
    assert positions.tolist() == [[0, 1, 2, 3, 2, 3, 4]]
    visible = (mask[0, 0] == 0).int().tolist()
    assert visible == [[1, 0, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0, 0],
                       [1, 1, 0, 0, 1, 0, 0],  # row 1 sees the prefix and its own tokens, never row 0's
                       [1, 1, 0, 0, 1, 1, 0],
                       [1, 1, 0, 0, 1, 1, 1]]
    assert scored.tolist() == [2, 4, 5]
    assert prefix_sharing.tree_layout(lora_wrapped("llama").get_base_model(), batch, keep, 3) is None  # scores inside


def test_no_tree_for_left_padding_unknown_models_or_scored_padding(tree_for_tiny_models):
    base = lora_wrapped("llama").get_base_model()
    batch = prompt_and_replies()
    keep = keep_of(batch)
    left = {**batch, "attention_mask": batch["attention_mask"].flip(1)}
    assert prefix_sharing.tree_layout(base, left, keep, 10) is None
    scored_pad = keep.clone()
    scored_pad[1, -1] = True  # row 1 is padding there (its length is 14 of 16)
    assert prefix_sharing.tree_layout(base, batch, scored_pad, 10) is None
    base.config.model_type = "opt"  # positions from the 2-D mask: a custom 4-D mask would break them
    assert prefix_sharing.tree_layout(base, batch, keep, 10) is None
    assert prefix_sharing.tree_layout(lora_wrapped("llama").get_base_model(), batch, keep, 10) is not None


def test_tree_layout_under_gradient_checkpointing(tree_for_tiny_models):
    assert_checkpointing_keeps_gradients(prompt_and_replies())


def test_shared_prefix_stops_at_padding_scored_tokens_and_short_prefixes():
    batch = shared_prefix_batch(prefix=10)
    keep = keep_of(batch)
    assert prefix_sharing.shared_prefix_length(batch, keep) == 10
    scored_early = batch["labels"].clone()
    scored_early[:, 9] = batch["input_ids"][:, 9]  # hidden 8 predicts token 9, which is now trained
    assert prefix_sharing.shared_prefix_length(batch, scored_early[:, 1:] != -100) == 8
    padded = {**batch, "attention_mask": batch["attention_mask"].clone()}
    padded["attention_mask"][1, 9:] = 0
    assert prefix_sharing.shared_prefix_length(padded, keep) == 9
    assert prefix_sharing.shared_prefix_length(shared_prefix_batch(prefix=5), keep) == 0  # below MIN_SHARED_PREFIX
    one_row = {k: v[:1] for k, v in batch.items()}
    assert prefix_sharing.shared_prefix_length(one_row, keep[:1]) == 0
