"""Per-request decoding: text deltas that never split a character or leak a stop string, and sampling."""

from __future__ import annotations

import pytest
import torch

from test_generate import build_tokenizer

from lorafit.serving.decoding import TextStream, _top_p, sampler


def byte_tokenizer():
    """A byte-level tokenizer with no merges: every UTF-8 byte is its own token, so 'é' is two tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def stream(tokenizer, ids: list[int], stop: list[str]) -> tuple[list[str], bool]:
    text = TextStream(tokenizer, stop)
    deltas = [text.add(token) for token in ids]
    if not text.stopped:
        deltas.append(text.finish())
    return deltas, text.stopped


def test_deltas_never_split_a_character():
    tokenizer = byte_tokenizer()
    words = "naïve café ☕ 日本語 ok"
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(words.encode("utf-8"))
    deltas, stopped = stream(tokenizer, ids, [])
    assert not stopped and "".join(deltas) == words
    assert not any("\ufffd" in delta for delta in deltas)
    # the three bytes of ☕ give nothing, nothing, then the whole character
    start = len("naïve café ".encode("utf-8"))
    assert deltas[start:start + 3] == ["", "", "☕"]


@pytest.mark.parametrize("stop, expected", [
    (["sat"], "the cat "),           # the stop is a whole token
    (["t s"], "the ca"),             # spans two tokens: "t" must be held back until the match is known
    (["xyz", "on"], "the cat sat "),  # the first match of several
    (["mat!"], "the cat sat on the mat"),  # a partial match at the end is released when the reply ends
])
def test_stop_strings_cut_the_text_and_are_not_returned(stop, expected):
    tokenizer = build_tokenizer()
    ids = tokenizer("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    deltas, stopped = stream(tokenizer, ids, stop)
    assert "".join(deltas) == expected
    assert stopped == (stop != ["mat!"])


def test_text_held_for_a_possible_stop_comes_out_once_it_cannot_match():
    tokenizer = build_tokenizer()
    ids = tokenizer("the cat sat", add_special_tokens=False)["input_ids"]
    text = TextStream(tokenizer, ["cat dog"])
    assert [text.add(token) for token in ids] == ["the", " ", "cat sat"]  # "cat" waited for its next word


def test_greedy_is_the_argmax_and_sampling_repeats_with_its_seed():
    logits = torch.tensor([0.1, 2.0, 0.3, 1.9])
    assert sampler(0.0, 1.0, None, torch.device("cpu"))(logits) == 1
    draws = [sampler(1.0, 1.0, seed, torch.device("cpu"))(logits) for seed in range(40)]
    again = [sampler(1.0, 1.0, seed, torch.device("cpu"))(logits) for seed in range(40)]
    assert draws == again and len(set(draws)) > 1
    one = sampler(1.0, 1.0, 3, torch.device("cpu"))
    assert len({one(logits) for _ in range(50)}) > 1  # one generator goes on drawing, it does not restart


def test_top_p_keeps_the_smallest_set_holding_p():
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    assert _top_p(probs.clone(), 0.7).tolist() == pytest.approx([0, 0.5 / 0.75, 0, 0.25 / 0.75])
    assert _top_p(probs.clone(), 0.5).tolist() == pytest.approx([0, 1, 0, 0])
    assert _top_p(probs.clone(), 0.01).tolist() == pytest.approx([0, 1, 0, 0])
    top = sampler(1.0, 0.5, 0, torch.device("cpu"))
    assert {top(probs.log()) for _ in range(30)} == {1}
