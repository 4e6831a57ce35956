"""Shared test helpers: tiny random transformers models built from configs (no download).

Every builder seeds torch itself, so two calls with the same seed give models with identical
weights: build one for lorafit and one for PEFT (or a fresh base to load an adapter onto) and they
match. Wrapping a model in LoraModel mutates it in place, so never reuse a wrapped model as a base.

Keyword arguments of a builder override its config fields (``tiny_bert_cls(vocab_size=30522,
max_position_embeddings=128)``). Use the plain functions (``tiny_bert_cls(seed=1)``, ``make_batch(...)``) where a test needs several
copies or options, or the fixtures of the same names for one default model.
"""

from __future__ import annotations

import pytest
import torch

TINY_VOCAB = 100


@pytest.fixture(autouse=True)
def _one_torch_thread(request):
    """Tiny models gain nothing from threads, and on a busy machine spinning threads cost seconds a test.
    Tests marked slow run real models and keep torch's default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
TINY_SEQ = 12


def _seeded(seed: int):
    torch.manual_seed(seed)


def tiny_bert_cls(seed: int = 0, vocab_size: int = TINY_VOCAB, num_labels: int = 2, **overrides):
    """BertForSequenceClassification: hidden 32, 2 layers, 4 heads, intermediate 37, in eval mode."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(**{**dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64, num_labels=num_labels),
                           **overrides})
    _seeded(seed)
    return BertForSequenceClassification(config).eval()


def tiny_roberta_cls(seed: int = 0, vocab_size: int = TINY_VOCAB, num_labels: int = 2, **overrides):
    """RobertaForSequenceClassification at BERT's tiny scale (pad_token_id 1; positions start at pad+1)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(**{**dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=37, max_position_embeddings=66,
                                     type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                     num_labels=num_labels),
                              **overrides})
    _seeded(seed)
    return RobertaForSequenceClassification(config).eval()


def tiny_llama(seed: int = 0, vocab_size: int = TINY_VOCAB, **overrides):
    """LlamaForCausalLM: hidden 32, 2 layers, 4 heads, 2 kv heads, intermediate 64, untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                   tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2),
                            **overrides})
    _seeded(seed)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, vocab_size: int = TINY_VOCAB, **overrides):
    """GPT2LMHeadModel: n_embd 32, 2 layers, 4 heads; its attention and MLP are Conv1D layers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**{**dict(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0),
                           **overrides})
    _seeded(seed)
    return GPT2LMHeadModel(config).eval()


TINY_MODELS = {"bert": tiny_bert_cls, "roberta": tiny_roberta_cls, "llama": tiny_llama, "gpt2": tiny_gpt2}


def make_batch(vocab: int = TINY_VOCAB, batch: int = 4, seq: int = TINY_SEQ, seed: int = 123,
               pad_id: int = 0, min_token: int = 3) -> dict[str, torch.Tensor]:
    """Random ``input_ids`` and ``attention_mask`` with right padding: row i has i padded positions
    (at most seq - 2), so every batch of two or more rows has some padding. Ids avoid 0..min_token-1
    (pad / bos / eos in the tiny configs); padded positions hold ``pad_id``."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(min_token, vocab, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(batch):
        pad = min(row, seq - 2)
        if pad:
            attention_mask[row, seq - pad:] = 0
            input_ids[row, seq - pad:] = pad_id
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture
def tiny_bert_cls_model():
    return tiny_bert_cls()


@pytest.fixture
def tiny_roberta_cls_model():
    return tiny_roberta_cls()


@pytest.fixture
def tiny_llama_model():
    return tiny_llama()


@pytest.fixture
def tiny_gpt2_model():
    return tiny_gpt2()


@pytest.fixture(name="make_batch")
def make_batch_fixture():
    """The ``make_batch`` function, for tests that prefer fixtures to imports."""
    return make_batch


@pytest.fixture(name="tiny_models")
def tiny_models_fixture():
    """Name -> builder for the four tiny models (each builder takes ``seed=``)."""
    return dict(TINY_MODELS)
