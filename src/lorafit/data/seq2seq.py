"""Sequence-to-sequence data: input/target text pairs, tokenized for an encoder-decoder, and their collator.

The encoder reads the input's ids and the decoder learns the target's: the target's ids are the
labels, from which T5 and BART build the decoder's inputs themselves (shifted right after the start
token). Labels are padded with -100, which the loss skips.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorafit.data.chat import IGNORE_INDEX, make_lm_collator, pad_sequence
from lorafit.errors import LorafitError


@dataclass
class TextPairs:
    """One split's pairs; ``source`` names the file or dataset split in messages."""

    inputs: list[str]
    targets: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.inputs)


def pairs_from_table(table, source: str, input_column: str, target_column: str) -> TextPairs:
    """The pairs of a table, checked row by row: both columns present, every cell a non-empty text."""
    for column, flag in ((input_column, "--input-column"), (target_column, "--target-column")):
        if column not in table.column_names:
            raise LorafitError(f"'{source}' has no column '{column}'; columns found: "
                               f"{', '.join(table.column_names) or 'none'}. Pass {flag} NAME")
    if len(table) == 0:
        raise LorafitError(f"'{source}' has no rows; add input/target pairs to it or pass another file")
    pairs = TextPairs([], [], source)
    columns = table.with_format("arrow")
    for row, (text, target) in enumerate(zip(columns[input_column].to_pylist(), columns[target_column].to_pylist()), 1):
        for value, column in ((text, input_column), (target, target_column)):
            # a reader makes a column of plain numbers ints or floats: as text they are still a target
            if value is None or isinstance(value, (bool, list, dict)) or not str(value).strip():
                raise LorafitError(f"row {row} of '{source}' has no text in '{column}' ({value!r}); fill it in or "
                                   "remove the row")
        pairs.inputs.append(str(text))
        pairs.targets.append(str(target))
    return pairs


def tokenize_pairs(pairs: TextPairs, tokenizer, *, role: str, max_length: int) -> list[dict]:
    """Input ids, attention mask and target ids (the labels), each cut to ``max_length`` tokens keeping the
    tokenizer's end token; says on stderr how many inputs or targets were cut."""
    inputs = tokenizer(pairs.inputs)["input_ids"]
    targets = tokenizer(text_target=pairs.targets)["input_ids"]
    cut = sum(len(i) > max_length or len(t) > max_length for i, t in zip(inputs, targets))
    if cut:
        inputs = tokenizer(pairs.inputs, truncation=True, max_length=max_length)["input_ids"]
        targets = tokenizer(text_target=pairs.targets, truncation=True, max_length=max_length)["input_ids"]
        print(f"lorafit: {cut} of {len(pairs)} {role} pairs had an input or target longer than --max-length "
              f"{max_length} tokens, which was cut", file=sys.stderr)
    return [{"input_ids": list(i), "attention_mask": [1] * len(i), "labels": list(t)} for i, t in zip(inputs, targets)]


def make_seq2seq_collator(pad_token_id: int) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Pad inputs on the right with the pad id, and labels to their own longest with -100."""
    pad_inputs = make_lm_collator(pad_token_id, padding_side="right")

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_inputs([{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for e in examples])
        if "labels" in examples[0]:
            longest = max(len(e["labels"]) for e in examples)
            batch["labels"] = torch.tensor([pad_sequence(list(e["labels"]), longest, IGNORE_INDEX, "right")
                                            for e in examples], dtype=torch.long)
        return batch

    return collate
