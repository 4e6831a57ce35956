"""Sequence classifiers whose head reads only the first token ([CLS] / <s>) need only that row from
the last encoder layer.

There the layer still attends over every position (keys and values need all of them), but its
attention output projection and feed-forward block, about three quarters of the layer's matmul work,
run on the first position alone. The logits and gradients are exactly those of the full layer; on
MiniLM (6 layers) it removes about an eighth of a training step.
"""

from __future__ import annotations

import types

import transformers

FIRST_TOKEN_HEADS = ("BertForSequenceClassification", "RobertaForSequenceClassification",
                     "XLMRobertaForSequenceClassification")
"""Heads known to read ``hidden[:, 0]`` and nothing else, whose layers share BERT's structure."""


def first_token_last_layer(model) -> bool:
    """Make the last encoder layer of a first-token classifier compute the first position only.

    Returns False, changing nothing, where that does not apply: other heads, decoder or
    cross-attention layers, chunked feed-forward, or transformers before 5 (whose layers differ).
    The parameters and state dict are untouched; only this model instance's last layer changes.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if type(base).__name__ not in FIRST_TOKEN_HEADS or int(transformers.__version__.split(".")[0]) < 5:
        return False
    layer = base.base_model.encoder.layer[-1]
    if layer.is_decoder or layer.add_cross_attention or layer.chunk_size_feed_forward:
        return False
    layer.forward = types.MethodType(_first_position_forward, layer)
    return True


def _first_position_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    attended, _ = self.attention.self(hidden_states, attention_mask=attention_mask)
    first = self.attention.output(attended[:, :1], hidden_states[:, :1])
    return self.feed_forward_chunk(first)
