"""Generation with causal-LM and seq2seq adapters: the one path behind `lorafit train`'s held-out replies,
`lorafit generate` and a server. Plain functions: prompts and settings in, texts out."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from lorafit.data import chat
from lorafit.errors import LorafitError
from lorafit.tasks.task import eval_mode
from lorafit.training.settings import check_number, check_positive_int, check_seed

# Found in the rendered template, so the token after it is the template's own end of turn.
_REPLY_MARKER = "Zq7marker"


@dataclass
class GenerationSettings:
    """How replies are decoded. Every field is also a `lorafit generate` flag."""

    batch_size: int = 8
    """Prompts generated together."""
    max_new_tokens: int = 128
    """Most tokens generated per prompt."""
    temperature: float = 0.0
    """Above 0 samples instead of decoding greedily."""
    top_p: float = 1.0
    """Sample from the likeliest tokens holding this probability."""
    top_k: int = 50
    """Sample among the k likeliest tokens, 0 for all."""
    seed: int | None = None
    """Random seed (0 to 4294967295), for reproducible sampling."""
    system: str | None = None
    """System prompt put before every prompt."""
    chat_template: bool = True
    """Give prompts the chat template (or lorafit's plain template) as in training; off feeds them as raw text."""

    def __post_init__(self) -> None:
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("max_new_tokens", self.max_new_tokens)
        check_number("temperature", self.temperature, ">= 0")
        check_number("top_p", self.top_p, "in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise LorafitError(f"--top-k must be 0 (off) or a positive integer, got {self.top_k}")
        if self.seed is not None:
            check_seed("seed", self.seed)


def _special_tokens(tokenizer) -> set[str]:
    """Named special tokens and added tokens marked special (a template's end-of-turn is often only the latter)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_tokens) | {t.content for t in added.values() if getattr(t, "special", False)}


def stop_token_ids(model, tokenizer) -> list[int]:
    """Ids that end a reply: eos ids, and the token the chat template closes a turn with (which training
    teaches every reply to end with), found by rendering a reply and reading what follows it."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(configured if isinstance(configured, (list, tuple)) else [configured])}
    if chat.has_chat_template(tokenizer):
        full = chat.render_messages(tokenizer, [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": _REPLY_MARKER}])
        end = full.find(_REPLY_MARKER) + len(_REPLY_MARKER)
        token = next((t for t in sorted(_special_tokens(tokenizer), key=len, reverse=True)
                      if t and full.startswith(t, end)), None)
        if token is not None:
            ids.add(tokenizer.convert_tokens_to_ids(token))
    return sorted(i for i in ids if i is not None)


def encode_prompt(tokenizer, prompt: str | list[dict], settings: GenerationSettings,
                  encoder_decoder: bool = False) -> list[int]:
    """Token ids of a prompt (text) or conversation (messages ending before the reply), up to where the
    assistant's reply starts, built as training builds prompts; raw text without the chat template. An
    encoder-decoder's input is its text with the tokenizer's special tokens, as seq2seq training encodes it."""
    if encoder_decoder:
        if not isinstance(prompt, str):
            raise LorafitError("a seq2seq adapter reads plain text, but the input has chat 'messages'; give a "
                               "prompt column")
        return list(tokenizer(prompt)["input_ids"])
    if not settings.chat_template:
        if not isinstance(prompt, str):
            raise LorafitError("--no-chat-template feeds raw prompts, but the input has chat 'messages'; "
                               "drop --no-chat-template or give a prompt column")
        return chat.leading_special_ids(tokenizer) + chat.tokenize_text(tokenizer, prompt)
    if isinstance(prompt, str):
        messages = chat.prompt_messages(prompt, settings.system)
    else:
        messages = list(prompt)
        if settings.system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": settings.system}, *messages]
    text = chat.render_messages(tokenizer, messages, add_generation_prompt=True)
    return chat.text_prefix_ids(tokenizer) + chat.tokenize_text(tokenizer, text)


def check_context(model_config, encoded: list[list[int]], max_new_tokens: int) -> None:
    """Refuse a prompt plus max_new_tokens longer than the positions the model has (an encoder-decoder's
    encoder and decoder each have them all)."""
    context = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if not context:
        return
    longest = max(len(ids) for ids in encoded)
    if longest >= context:
        raise LorafitError(f"a prompt of {longest} tokens fills the model's context of {context} tokens; shorten it")
    if getattr(model_config, "is_encoder_decoder", False):
        if max_new_tokens >= context:
            raise LorafitError(f"--max-new-tokens {max_new_tokens} exceeds the decoder's {context} positions; pass "
                               f"--max-new-tokens {context - 1} or less")
        return
    if longest + max_new_tokens > context:
        raise LorafitError(f"--max-new-tokens {max_new_tokens} plus the longest prompt ({longest} tokens) exceeds "
                           f"the model's context of {context} tokens; pass --max-new-tokens {context - longest} or less")


def generation_config(model, tokenizer, settings: GenerationSettings):
    """The model's generation config with the settings on top."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = copy.deepcopy(base.generation_config)
    stops = stop_token_ids(base, tokenizer)
    config.max_new_tokens = settings.max_new_tokens
    config.eos_token_id = stops
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config.num_beams = 1
    config.do_sample = settings.temperature > 0
    if config.do_sample:
        config.temperature, config.top_p, config.top_k = settings.temperature, settings.top_p, settings.top_k
    else:  # silences warnings about sampling settings a model's config may carry
        config.temperature = config.top_p = config.top_k = None
    return config


def decode_reply(tokenizer, ids: list[int], stops: list[int]) -> str:
    """Generated ids up to the first stop token, as text."""
    end = next((i for i, token in enumerate(ids) if token in stops), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True)


def generate_from_ids(model, tokenizer, encoded: list[list[int]], settings: GenerationSettings,
                      adapter_names: list[str] | None = None, streamer=None,
                      progress: Callable[[int], None] | None = None) -> list[str]:
    """Replies to encoded prompts, ``settings.batch_size`` at a time with left padding, shortest first.

    ``adapter_names`` gives one adapter per prompt (LoraModel's mixed batches); a ``streamer``
    (transformers' streamers take one prompt at a time) sees the tokens as they come; ``progress``
    hears how many prompts are done after each batch.
    """
    config = generation_config(model, tokenizer, settings)
    # a decoder continues its prompt, so prompts line up on the left; an encoder-decoder's output is a new
    # sequence after the decoder's start token, and its encoder takes inputs padded as in training
    encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
    collate = chat.make_lm_collator(config.pad_token_id, padding_side="right" if encoder_decoder else "left")
    if settings.seed is not None:
        from transformers import set_seed

        set_seed(settings.seed)
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # less padding
    replies: list[str] = [""] * len(encoded)
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(order), settings.batch_size):
            rows = order[start:start + settings.batch_size]
            batch = collate([{"input_ids": encoded[i], "attention_mask": [1] * len(encoded[i])} for i in rows])
            names = {"adapter_names": [adapter_names[i] for i in rows]} if adapter_names is not None else {}
            output = model.generate(input_ids=batch["input_ids"].to(device),
                                    attention_mask=batch["attention_mask"].to(device), generation_config=config,
                                    streamer=streamer, **names)
            new = output[:, 1:] if encoder_decoder else output[:, batch["input_ids"].shape[1]:]
            for row, ids in zip(rows, new.tolist()):
                replies[row] = decode_reply(tokenizer, ids, config.eos_token_id)
            if progress is not None:
                progress(min(start + settings.batch_size, len(order)))
    return replies


def generate_replies(model, tokenizer, prompts: list[str | list[dict]], settings: GenerationSettings,
                     adapter_names: list[str] | None = None) -> list[str]:
    """Replies to prompts (texts, or message lists ending before the reply)."""
    encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
    encoded = [encode_prompt(tokenizer, prompt, settings, encoder_decoder) for prompt in prompts]
    return generate_from_ids(model, tokenizer, encoded, settings, adapter_names)
