"""Text-classification data: the built-in and hub datasets, label spaces, validation, tokenising, batching.

Files are read by ``lorafit.data.readers``; prepare_split turns numeric text columns back into str.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import datasets
import pyarrow as pa
import torch

from lorafit.errors import LorafitError
from lorafit.data.readers import INT_PATTERN, read_table, value_kind

__all__ = ["read_table", "LabelSpace", "build_label_space",
           "prepare_split", "tokenize", "make_collator", "length_grouped_order"]

_FLAGS = {"text": "--text-column", "text_pair": "--text-pair-column", "label": "--label-column"}
# Spellings of a missing value, not class names: NaN as pandas and numpy print it, pandas' <NA>.
_MISSING_TEXTS = {"", "nan", "<na>"}
_LIKELY = {
    "text": ("text", "sentence", "review", "content", "document", "comment", "body", "tweet"),
    "text_pair": ("text_pair", "sentence2", "hypothesis", "question2", "text2"),
    "label": ("label", "labels", "class", "category", "target", "sentiment", "intent", "y"),
}


@dataclass(frozen=True)
class LabelSpace:
    """The classes: ``names[i]`` names class id ``i``; ``from_ids`` says training labels were ClassLabel ids."""

    names: tuple[str, ...]
    from_ids: bool = False

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}


def build_label_space(train: datasets.Dataset, label_column: str, *, source: str | None = None) -> LabelSpace:
    """Derive the classes from the training labels: names sorted, whole numbers by value.

    Whole numbers are class names like any other, so labels 0..K-1 become class ids 0..K-1 (the
    transformers convention) while 1-5 stars, -1/1, 0/100000 or dates give one class per value seen,
    never a head sized by the largest number. Only a ClassLabel feature maps integers to its names.
    """
    where = f"training file '{source}'" if source else "the training data"
    _require_columns(train, {"label": label_column}, where)
    values = _column_values(train, label_column)
    feature = train.features[label_column]
    _refuse_missing_labels(values, label_column, source or "the training data")
    kinds = {value_kind(v) for v in values} - {None}
    if kinds - {"number", "text", "true/false"} or len(kinds) > 1:
        raise LorafitError(f"column '{label_column}' of {where} holds {' and '.join(sorted(kinds))} values, not "
                           f"single class labels; pick a column with one name or class id per row ({_FLAGS['label']})")
    example = next((v for v in values if isinstance(v, float) and not v.is_integer()), None)
    if example is not None:
        raise LorafitError(f"labels in column '{label_column}' of {where} are decimal numbers (e.g. {example}); "
                           "classification needs class names or whole-number class ids, so rewrite them as such")
    if isinstance(feature, datasets.ClassLabel):
        space = _class_label_space(values, feature, label_column, where)
        distinct = sorted({space.names[v] for v in values})
    else:
        distinct = sorted({_label_name(v) for v in values})
        if kinds == {"number"}:
            distinct.sort(key=int)
        space = LabelSpace(tuple(distinct))
    if len(distinct) < 2:
        raise LorafitError(f"{where} has only one distinct label ({distinct[0]!r}) in column '{label_column}'; "
                           "a classifier needs at least two, so add examples of other labels or pick another column")
    return space


def _label_name(value) -> str:
    """A label's class name: whole numbers without a decimal part (pandas writes 1.0 for 1 in a column with gaps)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _class_label_space(values: list[int], feature: datasets.ClassLabel, column: str, where: str) -> LabelSpace:
    """A ClassLabel column holds ids into its names."""
    for row, value in enumerate(values, 1):
        if not 0 <= value < feature.num_classes:
            raise LorafitError(f"label {value} (row {row}) in column '{column}' of {where} is not a class id "
                               f"(ids run 0..{feature.num_classes - 1}); fix or remove the row")
    return LabelSpace(tuple(feature.names), from_ids=True)


def _is_missing(value) -> bool:
    """Null, blank, a float NaN, or the text pandas and numpy write for one ("NaN", "nan", "<NA>")."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return isinstance(value, str) and value.strip().lower() in _MISSING_TEXTS


def _refuse_missing_labels(values: list, column: str, source: str) -> None:
    """Name the first rows whose label is missing; dropping them silently would change the data unseen."""
    missing = [row for row, v in enumerate(values, 1) if _is_missing(v)]
    if missing:
        raise LorafitError(f"row {missing[0]} of {source} has no label in column '{column}'{_more_rows(missing)}; "
                           "remove the row or fill it in")


def prepare_split(ds: datasets.Dataset, *, split: str, source: str, text_column: str, text_pair_column: str | None,
                  label_column: str | None, labels: LabelSpace | None) -> datasets.Dataset:
    """Validate one split and return it as columns text, [text_pair], [label as class id]."""
    where = f"{split} file '{source}'"
    if len(ds) == 0:
        raise LorafitError(f"{where} has no rows; add examples to it or pass another file")
    wanted = {"text": text_column, "text_pair": text_pair_column, "label": label_column}
    wanted = {role: column for role, column in wanted.items() if column}
    _require_columns(ds, wanted, where)
    columns = {role: pa.array(_texts(ds, wanted[role], source), pa.string())
               for role in ("text", "text_pair") if role in wanted}
    if label_column:
        if labels is None:
            raise ValueError("prepare_split needs `labels` when `label_column` is given")
        ids = _label_ids(_column_values(ds, label_column), labels, split, source, label_column)
        columns["label"] = pa.array(ids, pa.int64())
    return datasets.Dataset(pa.table(columns))  # straight from Arrow: from_dict encodes row by row


def _column_values(ds: datasets.Dataset, column: str) -> list:
    """One column as a Python list (ignoring any torch/numpy format set on the dataset)."""
    return ds.with_format("arrow")[column].to_pylist()  # respects select/shuffle indices; fast


def _require_columns(ds: datasets.Dataset, wanted: dict[str, str], where: str) -> None:
    """Check each wanted column exists, else list the columns found and suggest a flag."""
    found = ds.column_names
    for role, column in wanted.items():
        if column not in found:
            taken = set(wanted.values())
            guess = next((c for c in found if c.lower() in _LIKELY[role] and c not in taken), None)
            if guess is None and role == "text":
                guess = next((c for c in found if c not in taken and ds.features[c] == datasets.Value("string")), None)
            raise LorafitError(f"{where} has no column '{column}'; columns found: {_name_list(found) or 'none'}. "
                               f"Pass {_FLAGS[role]} {guess or 'NAME'}")


def _texts(ds: datasets.Dataset, column: str, source: str) -> list[str]:
    """Text values as str, refusing null, blank and non-scalar ones with their rows."""
    values = _column_values(ds, column)
    if any(isinstance(v, list | dict) for v in values):
        raise LorafitError(f"column '{column}' of {source} holds lists or objects, not text; "
                           f"pick the text column with {_FLAGS['text']}")
    texts = [_as_text(v) for v in values]
    binary = [row for row, text in enumerate(texts, 1) if text is None]
    if binary:
        raise LorafitError(f"column '{column}' of {source} holds bytes that are not UTF-8 text in row {binary[0]}"
                           f"{_more_rows(binary)}; pick a text column with {_FLAGS['text']} or store the text as "
                           "UTF-8 strings")
    empty = [row for row, text in enumerate(texts, 1) if not text.strip()]
    if empty:
        raise LorafitError(f"row {empty[0]} of {source} has an empty text in column '{column}'{_more_rows(empty)}; "
                           "remove the row or fill it in")
    return texts


def _as_text(value) -> str | None:
    """A text value as str: missing ones empty, UTF-8 bytes decoded, other bytes None."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return str(value)


def _label_ids(values: list, labels: LabelSpace, split: str, source: str, column: str) -> list[int]:
    """Map label names (or ids) to class ids, refusing labels training never had."""
    _refuse_missing_labels(values, column, source)
    lookup, count = labels.label2id, len(labels.names)
    # With no numeric names (e.g. id2label from a saved model), an integer label can only be a class id.
    ids_allowed = labels.from_ids or not any(INT_PATTERN.fullmatch(name) for name in labels.names)
    ids, unknown = [], {}
    for row, value in enumerate(values, 1):
        class_id = None if labels.from_ids and isinstance(value, int) else lookup.get(_label_name(value))
        if class_id is None and ids_allowed and type(value) is int and 0 <= value < count:
            class_id = value
        if class_id is None:
            unknown.setdefault(value if isinstance(value, str | int | float) else str(value), row)
        ids.append(class_id)
    if unknown:
        (value, row), *others = unknown.items()
        also = f"; other unknown labels: {_name_list([str(v) for v, _ in others])}" if others else ""
        raise LorafitError(f"{split} label {value!r} (row {row}) never occurs in the training data (labels seen: "
                           f"{_name_list(labels.names)}{also}); fix the data or add examples of it to training")
    return ids


def _more_rows(rows: list[int]) -> str:
    """' (and N more rows: a, b, ...)' for messages about the first of several bad rows."""
    if len(rows) < 2:
        return ""
    return f" (and {len(rows) - 1} more rows: {_name_list([str(r) for r in rows[1:]])})"


def _name_list(names, limit: int = 20) -> str:
    """Comma-separated names, cut short after ``limit``."""
    names = list(names)
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def tokenize(ds: datasets.Dataset, tokenizer, *, max_length: int, truncation_side: str = "right") -> datasets.Dataset:
    """Tokenise a prepared split to input_ids/attention_mask[/token_type_ids][/labels], unpadded, texts dropped."""
    if truncation_side not in ("left", "right"):
        raise LorafitError(f"truncation side must be 'left' or 'right', not {truncation_side!r}")
    pair = "text_pair" in ds.column_names
    check_max_length(tokenizer, max_length, pair)
    # A copy, so the caller's tokenizer keeps its own truncation side.
    tok = copy.deepcopy(tokenizer)
    tok.truncation_side = truncation_side

    # One batched call instead of Dataset.map, which spends seconds hashing the tokenizer for a cache key.
    texts = _column_values(ds, "text")
    pairs = _column_values(ds, "text_pair") if pair else None
    columns = dict(tok(texts, pairs, truncation=True, max_length=max_length))
    if "label" in ds.column_names:
        columns["labels"] = _column_values(ds, "label")
    return datasets.Dataset.from_dict(columns)


def check_max_length(tokenizer, max_length: int, pair: bool) -> None:
    """Refuse a max length that leaves no room for text or exceeds the model's limit."""
    specials = tokenizer.num_special_tokens_to_add(pair=pair)
    if max_length <= specials:
        raise LorafitError(f"--max-length {max_length} leaves no room for text (the tokenizer adds {specials} "
                           "special tokens); pass a larger --max-length, e.g. 128")
    limit = tokenizer.model_max_length
    if limit and limit < 1_000_000 and max_length > limit:  # unset limits are huge sentinels
        raise LorafitError(f"--max-length {max_length} exceeds the model's limit of {limit} tokens; "
                           f"pass --max-length {limit} or less")


def make_collator(tokenizer, *, pad_to_multiple_of: int | None = None) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Make a collate function padding to the batch's longest example (on the tokenizer's side)."""
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    fills = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0}
    left = tokenizer.padding_side == "left"

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        if pad_to_multiple_of:
            longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
        batch = {}
        for key, fill in fills.items():
            if key in examples[0]:
                rows = [_pad(_as_list(e[key]), longest, fill, left) for e in examples]
                batch[key] = torch.tensor(rows, dtype=torch.long)
        if "labels" in examples[0]:
            batch["labels"] = torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
        return batch

    return collate


def _as_list(values) -> list[int]:
    """A token sequence as a plain list, whether it came as a list or a tensor."""
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _pad(values: list[int], length: int, fill: int, left: bool) -> list[int]:
    """Pad a sequence with ``fill`` up to ``length`` on the left or right."""
    padding = [fill] * (length - len(values))
    return padding + values if left else values + padding


# Length grouping sorts windows of this many shuffled batches, not the whole epoch: a wider window pads
# less, a narrower one keeps batches more random (sorting the whole epoch would give every epoch nearly
# the same batches). 50 is the most transformers' length-grouped sampler uses ("mega-batches").
BATCHES_PER_SORT_WINDOW = 50


def length_grouped_order(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """A random permutation whose consecutive ``batch_size`` chunks hold similar lengths, to cut padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * BATCHES_PER_SORT_WINDOW
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    # A partial batch must stay last: anywhere else it would shift every later chunk off its batch.
    tail = batches.pop() if batches and len(batches[-1]) < batch_size else []
    batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    # The longest batch goes first so running out of memory shows at step one.
    if batches:
        longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        batches[0], batches[longest] = batches[longest], batches[0]
    return [i for batch in batches for i in batch] + tail
