"""Turn prompt/response, chat or plain-text records into causal-LM training examples.

Training and generation share ``render_prompt``/``encode_prompt`` so the adapter always sees
the same prompt format. The loss covers only what the assistant says (plus the token that ends
its turn) unless ``train_on_prompt`` is set.

Packing (``--pack``): packed sequences carry ``position_ids`` that restart at 0 for every example,
and each example's first label is masked so no example is trained to follow another. Attention
stays within each example because the causal-LM loss (``lorafit.fast.causal_loss.model_inputs``)
drops the 2-D ``attention_mask`` of a packed batch and runs with ``use_cache=False``: transformers'
SDPA and eager attention then mask each row block-diagonally where its positions restart.
flash-attention does so only for a batch of one row, so for it ``varlen_layout`` lays the packed
rows end to end first (its varlen kernel, no padding at all). A caller running the model on a packed
batch itself must do the same: with the mask (or a cache) later examples see earlier ones and only
the positions restart. tests/test_causal_lm.py checks packed logits against each example alone.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lorafit.data.sources import SPLITS, read_splits
from lorafit.errors import LorafitError, first_line

if TYPE_CHECKING:
    from lorafit.training.settings import TrainConfig

IGNORE_INDEX = -100
_SHAPES = '{"prompt", "response"}, {"messages": [{"role", "content"}, ...]} or {"text"}'
_ROLE = {"train": "training", "test": "test", "validation": "validation"}
_FALLBACK_HEADERS = {"user": "### Instruction:\n", "assistant": "### Response:\n"}


def detect_format(columns) -> str:
    """Name the record shape ("prompt-response", "messages" or "text") from its column names."""
    names = set(columns)
    if "messages" in names:
        return "messages"
    if {"prompt", "response"} <= names:
        return "prompt-response"
    if "text" in names:
        return "text"
    found = ", ".join(sorted(map(str, names))) or "none"
    raise LorafitError(
        f"cannot tell the data format from the columns found ({found}); "
        f"give each record one of these shapes: {_SHAPES}"
    )


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer ships a chat template to render conversations with."""
    return bool(getattr(tokenizer, "chat_template", None))


def end_text(tokenizer) -> str:
    """The text that ends a reply when no chat template does it: eos, else sep, else nothing."""
    return tokenizer.eos_token or getattr(tokenizer, "sep_token", None) or ""


def render_fallback(tokenizer, messages, *, add_generation_prompt: bool = False) -> str:
    """Render a conversation with the plain '### Instruction/### Response' template."""
    parts = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            parts.append(f"{content}\n\n")
        elif role == "assistant":
            parts.append(f"{_FALLBACK_HEADERS['assistant']}{content}{end_text(tokenizer)}\n\n")
        else:
            header = _FALLBACK_HEADERS.get(role, f"### {role.capitalize()}:\n")
            parts.append(f"{header}{content}\n\n")
    if add_generation_prompt:
        parts.append(_FALLBACK_HEADERS["assistant"])
    return "".join(parts)


def render_messages(tokenizer, messages, *, add_generation_prompt: bool = False) -> str:
    """Render a conversation with the tokenizer's chat template, or the fallback without one."""
    if not has_chat_template(tokenizer):
        return render_fallback(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as error:  # jinja raises its own types, e.g. for an unsupported role
        reason = first_line(error)
        raise LorafitError(
            f"the tokenizer's chat template rejected a conversation ({reason}); "
            "fix the roles in the data or train on the plain text format"
        ) from error


def prompt_messages(prompt: str, system: str | None = None) -> list[dict]:
    """The chat messages for one user prompt, with an optional system message first."""
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": "user", "content": prompt}]


def render_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """The text a model is given at generation time; training renders prompts the same way."""
    return render_messages(tokenizer, prompt_messages(prompt, system), add_generation_prompt=True)


def leading_special_ids(tokenizer) -> list[int]:
    """Ids the tokenizer puts before plain text (e.g. BOS); chat templates write their own."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def text_prefix_ids(tokenizer) -> list[int]:
    """Ids placed before rendered text: none for chat templates, the tokenizer's BOS otherwise."""
    return [] if has_chat_template(tokenizer) else leading_special_ids(tokenizer)


def tokenize_text(tokenizer, text: str) -> list[int]:
    """Token ids of text without the tokenizer's own special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of ``render_prompt``, built exactly as training builds its prompt tokens."""
    text = render_prompt(tokenizer, prompt, system)
    return text_prefix_ids(tokenizer) + tokenize_text(tokenizer, text)


def require_strings(record: Mapping, keys) -> None:
    """Raise a LorafitError unless every named field of the record holds a string."""
    for key in keys:
        if not isinstance(record[key], str):
            kind = type(record[key]).__name__
            raise LorafitError(f"'{key}' must be a string, got {kind}; fix that record")


def record_messages(record: Mapping, kind: str) -> list[dict]:
    """The conversation of a prompt-response or messages record, checked for string contents."""
    if kind == "prompt-response":
        require_strings(record, ("prompt", "response"))
        system = record.get("system")
        messages = prompt_messages(record["prompt"], system if isinstance(system, str) else None)
        return messages + [{"role": "assistant", "content": record["response"]}]
    messages = record["messages"]
    if not isinstance(messages, list) or not all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise LorafitError(
            "'messages' must be a list of {\"role\": str, \"content\": str} objects; fix that record"
        )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def find_message_spans(full: str, messages: list[dict]) -> list[tuple[int, int]]:
    """Character spans of each message's content, found in order in the rendered text."""
    spans, cursor = [], 0
    for message in messages:
        start = full.find(message["content"], cursor)
        if start < 0:
            raise LorafitError(
                "the chat template rewrites message contents, so replies cannot be located; "
                "use --train-on-prompt or the text format"
            )
        cursor = start + len(message["content"])
        spans.append((start, cursor))
    return spans


def extend_over_special(tokenizer, full: str, end: int) -> int:
    """Move end past a special token (e.g. <|im_end|>) that directly follows a reply."""
    specials = sorted(getattr(tokenizer, "all_special_tokens", []) or [], key=len, reverse=True)
    for token in specials:
        if token and full.startswith(token, end):
            return end + len(token)
    return end


def assistant_char_spans(tokenizer, messages: list[dict], full: str) -> list[tuple[int, int]]:
    """Character spans of every assistant reply including its end-of-turn token.

    Uses rendered prefixes (generation prompt .. end of the turn); templates that render an
    earlier turn differently from the full conversation fall back to locating the contents.
    """
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_messages(tokenizer, messages[:index], add_generation_prompt=True)
        through = render_messages(tokenizer, messages[: index + 1])
        if not (full.startswith(before) and full.startswith(through) and len(through) >= len(before)):
            return located_assistant_spans(tokenizer, messages, full)
        # The template's trailing newline after the end token is not something the model says.
        spans.append((len(before), max(len(before), len(through.rstrip()))))
    return spans


def located_assistant_spans(tokenizer, messages: list[dict], full: str) -> list[tuple[int, int]]:
    """Assistant spans found by searching for each content, extended over its end token."""
    spans = find_message_spans(full, messages)
    return [
        (start, extend_over_special(tokenizer, full, end))
        for message, (start, end) in zip(messages, spans)
        if message["role"] == "assistant"
    ]


def token_index_at(tokenizer, full: str, full_ids: list[int], char_pos: int, *, is_end: bool) -> int:
    """Index of the first token at or after char_pos in full_ids.

    Tokenises the prefix and checks that its ids prefix the full ids; when a token merges
    across the boundary, uses offset mappings and counts the straddling token as trained.
    """
    prefix_ids = tokenize_text(tokenizer, full[:char_pos])
    if full_ids[: len(prefix_ids)] == prefix_ids:
        return len(prefix_ids)
    if not getattr(tokenizer, "is_fast", False):
        raise LorafitError(
            "this tokenizer merges prompt and reply tokens and has no offset mapping; "
            "use a fast tokenizer or --train-on-prompt"
        )
    offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for index, (start, stop) in enumerate(offsets):
        if (start >= char_pos) if is_end else (stop > char_pos):
            return index
    return len(offsets)


def conversation_text_and_spans(tokenizer, record: Mapping, kind: str, train_on_prompt: bool):
    """Rendered text of a record and its trained character spans (None means train everything)."""
    if kind == "text":
        require_strings(record, ("text",))
        return record["text"] + end_text(tokenizer), None
    messages = record_messages(record, kind)
    full = render_messages(tokenizer, messages)
    if train_on_prompt:
        return full, None
    spans = assistant_char_spans(tokenizer, messages, full)
    if not spans:
        raise LorafitError(
            "a conversation has no assistant message to train on; add one or use --train-on-prompt"
        )
    return full, spans


def encode_example(record, tokenizer, *, max_length: int, train_on_prompt: bool = False) -> dict:
    """Token ids, labels (-100 where not trained), attention mask and whether it was cut."""
    if max_length < 2:
        raise LorafitError(f"--max-length must be at least 2, got {max_length}; raise it")
    kind = detect_format(key for key, value in record.items() if value is not None)
    full, spans = conversation_text_and_spans(tokenizer, record, kind, train_on_prompt)
    prefix = text_prefix_ids(tokenizer)
    body = tokenize_text(tokenizer, full)
    input_ids = prefix + body
    if spans is None:
        labels = list(input_ids)
    else:
        labels = [IGNORE_INDEX] * len(input_ids)
        for start, end in spans:
            first = len(prefix) + token_index_at(tokenizer, full, body, start, is_end=False)
            last = len(prefix) + token_index_at(tokenizer, full, body, end, is_end=True)
            labels[first:last] = input_ids[first:last]
    truncated = len(input_ids) > max_length
    return {
        "input_ids": input_ids[:max_length],
        "labels": labels[:max_length],
        "attention_mask": [1] * min(len(input_ids), max_length),
        "truncated": truncated,
    }


def has_trained_token(labels: list[int]) -> bool:
    """Whether any label contributes to the loss (the first one never does after shifting)."""
    return any(label != IGNORE_INDEX for label in labels[1:])


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate consecutive examples into sequences of at most max_length, never splitting one."""
    packs: list[dict] = []
    for example in examples:
        length = len(example["input_ids"])
        if not packs or len(packs[-1]["input_ids"]) + length > max_length:
            packs.append({"input_ids": [], "labels": [], "attention_mask": [], "position_ids": []})
        pack = packs[-1]
        pack["input_ids"] += example["input_ids"]
        # The first token would otherwise be trained to follow the previous example.
        pack["labels"] += [IGNORE_INDEX] + example["labels"][1:]
        pack["attention_mask"] += [1] * length
        pack["position_ids"] += list(range(length))
    return packs


def tokenize_lm(
    records, tokenizer, *, max_length: int, train_on_prompt: bool = False, pack: bool = False
) -> tuple[list[dict], int]:
    """Encode all records; return the examples and how many were cut (or dropped) by max_length.

    An example left with no trained token after truncation is dropped, and counted.
    """
    examples, truncated = [], 0
    for number, record in enumerate(records, start=1):
        try:
            encoded = encode_example(
                record, tokenizer, max_length=max_length, train_on_prompt=train_on_prompt
            )
        except LorafitError as error:
            raise LorafitError(f"record {number}: {error}") from error
        truncated += encoded.pop("truncated")
        if has_trained_token(encoded["labels"]):
            examples.append(encoded)
    return (pack_examples(examples, max_length) if pack else examples), truncated


def pad_sequence(values: list[int], length: int, pad: int, side: str) -> list[int]:
    """values padded with pad to length on the given side."""
    fill = [pad] * (length - len(values))
    return fill + values if side == "left" else values + fill


def make_lm_collator(pad_token_id: int, *, padding_side: str = "right") -> Callable:
    """A collator that pads a list of examples into a batch of long tensors."""
    if padding_side not in ("left", "right"):
        raise LorafitError(f"padding side must be 'left' or 'right', got {padding_side!r}; pick one")
    if pad_token_id is None:
        raise LorafitError("the tokenizer has no pad token; set one (e.g. the eos token) before training")
    pads = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0, "position_ids": 0}

    def collate(features: list[dict]) -> dict:
        """Pad every known key to the longest example in the batch."""
        length = max(len(feature["input_ids"]) for feature in features)
        keys = [key for key in pads if key in features[0]]
        return {
            key: torch.tensor(
                [pad_sequence(list(feature[key]), length, pads[key], padding_side) for feature in features],
                dtype=torch.long,
            )
            for key in keys
        }

    return collate


# --- training data: every split read and checked before anything is written -------------------------
@dataclass
class LmData:
    splits: dict[str, list[dict]]  # raw records per split
    description: str


def load_lm_data(config: TrainConfig) -> LmData:
    """Read every split and check its record shape before anything is written."""
    raw = read_splits(config, builtin="instruct")
    splits = {}
    for split, table in raw.tables.items():
        if split not in SPLITS:
            continue
        try:
            detect_format(table.column_names)
        except LorafitError as err:
            raise LorafitError(f"{split} data: {err}") from None
        splits[split] = table.to_list()
    return LmData(splits, raw.description)


def describe_lm_data(lm: LmData, tokenized: dict[str, list[dict]], config: TrainConfig) -> str:
    """What was loaded: examples and record shape per split, so a file read wrongly shows at once."""
    lines = [f"Data: {lm.description}"]
    for split, records in lm.splits.items():
        line = f"  {split}: {len(records)} examples ({detect_format(records[0]) if records else 'none'})"
        if config.pack and split == "train":
            line += f", packed into {len(tokenized[split])} sequences of up to {config.max_length} tokens"
        lines.append(line)
    return "\n".join(lines)


def tokenize_split(records: list[dict], tokenizer, *, split: str, max_length: int, train_on_prompt: bool = False,
                   pack: bool = False) -> list[dict]:
    """Token ids and response-only labels; warns on stderr about examples cut by max_length."""
    try:
        examples, cut = tokenize_lm(records, tokenizer, max_length=max_length,
                                            train_on_prompt=train_on_prompt, pack=pack)
    except LorafitError as err:
        raise LorafitError(f"{split} data: {err}") from None
    if cut:
        print(f"lorafit: {cut} of {len(records)} {_ROLE.get(split, split)} examples were longer than --max-length {max_length} "
              "and were cut", file=sys.stderr)
    if not examples:
        raise LorafitError(f"{split} data has no example with a response token within --max-length {max_length}; "
                           "raise --max-length or check the data")
    return examples
