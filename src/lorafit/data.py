"""Read text-classification data files, validate them, tokenise them and batch them.

Row numbers in messages count data records from 1 (a CSV header line is not a row). CSV/TSV columns whose
every non-empty value is a whole number come back as ints (blank cells as None), all-decimal ones as floats,
the rest as str; prepare_split turns text columns back into str.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets.exceptions import DatasetNotFoundError

from lorafit.errors import LorafitError

SUPPORTED_FORMATS = ".csv, .tsv/.tab, .jsonl/.ndjson, .json, .parquet, or a directory written by save_to_disk"
_DELIMITED = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
_JSON = {".json", ".jsonl", ".ndjson"}
_INT = re.compile(r"[+-]?\d{1,18}")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")
_FLAGS = {"text": "--text-column", "text_pair": "--text-pair-column", "label": "--label-column"}
_LIKELY = {
    "text": ("text", "sentence", "review", "content", "document", "comment", "body", "tweet"),
    "text_pair": ("text_pair", "sentence2", "hypothesis", "question2", "text2"),
    "label": ("label", "labels", "class", "category", "target", "sentiment", "intent", "y"),
}


def read_table(path, *, encoding: str | None = None, role: str = "data file") -> datasets.Dataset:
    """Read a local data file or save_to_disk directory into a Dataset (``role`` words the missing-file error)."""
    path = Path(path)
    if not path.exists():
        raise LorafitError(f"{role} '{path}' does not exist")
    if path.is_dir():
        return _read_saved_dataset(path)
    ext = path.suffix.lower()
    if ext not in _DELIMITED and ext not in _JSON and ext != ".parquet":
        raise LorafitError(f"'{path}' has an unsupported file type '{path.suffix}'; supported: {SUPPORTED_FORMATS}")
    if ext == ".parquet":
        return _read_parquet(path)
    text = _decode(path, path.read_bytes(), encoding)
    if ext in _DELIMITED:
        return _to_dataset(path, _parse_delimited(path, text, _DELIMITED[ext]))
    columns = _parse_json(path, text, lines=ext != ".json")
    for name, values in columns.items():
        _check_one_type(path, name, values)
    return _to_dataset(path, columns)


def _decode(path: Path, raw: bytes, encoding: str | None) -> str:
    """Decode bytes (UTF-8 unless told otherwise; UTF-16 when it starts with its BOM)."""
    chosen = encoding or ("utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8")
    try:
        text = raw.decode(chosen)
    except LookupError:
        raise LorafitError(f"unknown encoding '{encoding}'; pass one Python knows, such as utf-8, latin-1 or cp1252") \
            from None
    except UnicodeDecodeError as exc:
        fix = "pass the file's actual encoding with --encoding" if encoding else \
            "pass --encoding latin-1 (or the file's encoding)"
        where = f"byte 0x{raw[exc.start]:02x} at position {exc.start}"
        raise LorafitError(f"'{path}' is not valid {encoding or 'UTF-8'} ({where}); {fix}") from None
    return text.removeprefix("\ufeff")


def _parse_delimited(path: Path, text: str, delimiter: str) -> dict[str, list]:
    """Parse CSV/TSV text (quoted newlines, bare CRs, CRLF) into typed columns."""
    if delimiter == ",":
        delimiter = _sniff_delimiter(text)
    csv.field_size_limit(2**31 - 1)  # the default 128 KiB cap rejects long documents
    # newline="" hands line ends to csv untouched, so quoted \r and \n stay inside fields.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, skipinitialspace=True)
    header, rows = None, []
    try:
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if header is None:
                header = _clean_header(path, row)
            elif len(row) != len(header):
                raise LorafitError(f"line {reader.line_num} of '{path}' has {len(row)} fields but the header has "
                                   f"{len(header)}; quote fields that contain {delimiter!r}, quotes or line breaks")
            else:
                rows.append(row)
    except csv.Error as exc:
        raise LorafitError(f"'{path}' could not be parsed near line {reader.line_num} ({exc}); check its quoting") \
            from None
    if header is None:
        raise LorafitError(f"'{path}' is empty; it needs a header line naming the columns")
    return {name: _infer_type([row[i] for row in rows]) for i, name in enumerate(header)}


def _sniff_delimiter(text: str) -> str:
    """Pick ';' or tab for a .csv whose header has no commas (spreadsheet exports)."""
    first_line = text.split("\n", 1)[0]
    if "," not in first_line:
        for candidate in (";", "\t"):
            if candidate in first_line:
                return candidate
    return ","


def _clean_header(path: Path, row: list[str]) -> list[str]:
    """Strip column names, name blank ones, and refuse duplicates."""
    names = [name.strip() or f"column_{i + 1}" for i, name in enumerate(row)]
    for name in names:
        if names.count(name) > 1:
            raise LorafitError(f"'{path}' has more than one column named '{name}'; rename them")
    return names


def _infer_type(values: list[str]) -> list:
    """Turn an all-whole-number (or all-decimal) column into ints (floats); blanks become None."""
    filled = [v.strip() for v in values if v.strip()]
    for pattern, convert in ((_INT, int), (_FLOAT, float)):
        if filled and all(pattern.fullmatch(v) for v in filled):
            return [convert(v) if v.strip() else None for v in values]
    return values


def _parse_json(path: Path, text: str, *, lines: bool) -> dict[str, list]:
    """Parse JSON Lines, or a .json list of records / {"data": [...]} / column dict."""
    if not lines:
        try:
            return _json_columns(path, json.loads(text))
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data" means JSON Lines in a .json file
                raise LorafitError(f"'{path}' is not valid JSON ({exc.msg} at line {exc.lineno} column "
                                   f"{exc.colno}); fix the file") from None
    records = []
    # split("\n"), not splitlines(): U+2028 and friends may sit unescaped inside strings.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LorafitError(f"line {number} of '{path}' is not valid JSON ({exc.msg} at column {exc.colno}); "
                               "each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise LorafitError(f"line {number} of '{path}' is not a JSON object; each line must look like "
                               '{"text": "...", "label": "..."}')
        records.append(record)
    return _records_to_columns(records)


def _json_columns(path: Path, data) -> dict[str, list]:
    """Accept a list of records, {"data": records}, or {column: [values]} of equal lengths."""
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if isinstance(data, list) and all(isinstance(record, dict) for record in data):
        return _records_to_columns(data)
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        if len({len(v) for v in data.values()}) == 1:
            return data
    raise LorafitError(f"'{path}' must hold a list of objects, {{\"data\": [objects]}} or a dict of equal-length "
                       "column lists; convert it to JSON Lines (one object per line, .jsonl)")


def _records_to_columns(records: list[dict]) -> dict[str, list]:
    """Columns in order of first appearance; a record without a key gets None there."""
    names = list(dict.fromkeys(key for record in records for key in record))
    return {name: [record.get(name) for record in records] for name in names}


def _to_dataset(path: Path, columns: dict[str, list]) -> datasets.Dataset:
    """Build an in-memory Dataset from Python columns."""
    try:
        return datasets.Dataset.from_dict(columns)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise LorafitError(f"'{path}' could not be turned into a table ({exc}); give every column one kind of value") \
            from None


def _kind(value) -> str | None:
    """Name a JSON value's kind for type-mixing checks."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "number"
    return {str: "text", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _check_one_type(path: Path, name: str, values: list) -> None:
    """Refuse a column mixing e.g. text and numbers, quoting one example of each."""
    first: dict[str, tuple[int, object]] = {}
    for row, value in enumerate(values, 1):
        kind = _kind(value)
        if kind is not None and kind not in first:
            first[kind] = (row, value)
        if len(first) > 1:
            (kind_a, (row_a, a)), (kind_b, (row_b, b)) = first.items()
            raise LorafitError(f"column '{name}' of '{path}' mixes {kind_a} (row {row_a}: {a!r}) and {kind_b} "
                               f"(row {row_b}: {b!r}); make every value the same kind, e.g. quote them all")


def _read_parquet(path: Path) -> datasets.Dataset:
    """Read Parquet (keeping datasets' feature metadata such as ClassLabel names)."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise LorafitError(f"'{path}' is not a readable Parquet file ({exc})") from None
    index_columns = [n for n in table.column_names if n.startswith("__index_level_")]
    return datasets.Dataset(table.drop_columns(index_columns))


def _read_saved_dataset(path: Path) -> datasets.Dataset:
    """Load a save_to_disk directory; a DatasetDict must have exactly one split."""
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise LorafitError(f"'{path}' is a directory but not one written by save_to_disk; "
                           f"pass a data file instead ({SUPPORTED_FORMATS})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise LorafitError(f"'{path}' holds several splits ({', '.join(loaded)}); pass the folder of the one "
                               f"you mean, e.g. '{path / next(iter(loaded))}'")
        loaded = next(iter(loaded.values()))
    return loaded


def _builtin_folder():
    """Where the shipped quickstart data lives inside the installed package."""
    return resources.files("lorafit") / "builtin_data" / "sentiment"


def load_builtin_sentiment() -> dict[str, datasets.Dataset]:
    """Load the shipped quickstart sentiment set as {"train": ..., "validation": ...}."""
    splits = {}
    for split in ("train", "validation"):
        resource = _builtin_folder() / f"{split}.jsonl"
        if not resource.is_file():
            raise LorafitError(f"the built-in sentiment data is missing from this installation ({resource}); "
                               "reinstall lorafit or pass --train-file")
        with resources.as_file(resource) as file:
            splits[split] = read_table(file)
    return splits


def load_hub_dataset(name: str, config: str | None) -> dict[str, datasets.Dataset]:
    """Download a dataset from the Hugging Face hub and return its splits by name."""
    try:
        loaded = datasets.load_dataset(name, config)
    except DatasetNotFoundError:
        raise LorafitError(f"dataset '{name}' was not found on the Hugging Face hub (or needs a login); "
                           "check the name, or pass --train-file with a local file") from None
    except (ConnectionError, TimeoutError) as exc:
        raise LorafitError(f"the Hugging Face hub is unreachable ({exc}); pass --train-file with a local file "
                           "instead") from None
    except ValueError as exc:
        if "config" not in str(exc).lower():
            raise
        detail = " ".join(str(exc).split("\n")[:2])
        raise LorafitError(f"dataset '{name}' cannot be loaded with config {config!r} ({detail}); "
                           "pass one of its config names") from None
    return dict(loaded)


@dataclass(frozen=True)
class LabelSpace:
    """The classes: ``names[i]`` names class id ``i``; ``from_ids`` says training labels were integer ids."""

    names: tuple[str, ...]
    from_ids: bool = False

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}


def build_label_space(train: datasets.Dataset, label_column: str, *, source: str | None = None) -> LabelSpace:
    """Derive the classes from the training labels (names sorted; integer ids 0..max)."""
    where = f"training file '{source}'" if source else "the training data"
    _require_columns(train, {"label": label_column}, where)
    values = _column_values(train, label_column)
    feature = train.features[label_column]
    kinds = {_kind(v) for v in values} - {None}
    if kinds - {"number", "text", "true/false"} or len(kinds) > 1:
        raise LorafitError(f"column '{label_column}' of {where} holds {' and '.join(sorted(kinds))} values, not "
                           f"single class labels; pick a column with one name or class id per row ({_FLAGS['label']})")
    example = next((v for v in values if isinstance(v, float)), None)
    if example is not None:
        raise LorafitError(f"labels in column '{label_column}' of {where} are decimal numbers (e.g. {example}); "
                           "classification needs class names or whole-number class ids, so rewrite them as such")
    _refuse_missing_labels(values, label_column, source or "the training data")
    if kinds == {"number"}:
        space = _id_label_space(values, feature, label_column, where)
        distinct = sorted({space.names[v] for v in values})
    else:
        distinct = sorted({str(v).strip() for v in values})
        space = LabelSpace(tuple(distinct))
    if len(distinct) < 2:
        raise LorafitError(f"{where} has only one distinct label ({distinct[0]!r}) in column '{label_column}'; "
                           "a classifier needs at least two, so add examples of other labels or pick another column")
    return space


def _id_label_space(values: list[int], feature, column: str, where: str) -> LabelSpace:
    """Integer labels are class ids; names come from a ClassLabel feature or are str(id)."""
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else []
    names += [str(i) for i in range(len(names), max(values) + 1)]
    for row, value in enumerate(values, 1):
        if not 0 <= value < len(names):
            raise LorafitError(f"label {value} (row {row}) in column '{column}' of {where} is not a class id "
                               f"(ids run 0..{len(names) - 1}); fix or remove the row")
    return LabelSpace(tuple(names), from_ids=True)


def _refuse_missing_labels(values: list, column: str, source: str) -> None:
    """Name the first rows whose label is null or blank."""
    missing = [row for row, v in enumerate(values, 1) if v is None or str(v).strip() == ""]
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
    texts = ["" if v is None else str(v) for v in values]
    empty = [row for row, text in enumerate(texts, 1) if not text.strip()]
    if empty:
        raise LorafitError(f"row {empty[0]} of {source} has an empty text in column '{column}'{_more_rows(empty)}; "
                           "remove the row or fill it in")
    return texts


def _label_ids(values: list, labels: LabelSpace, split: str, source: str, column: str) -> list[int]:
    """Map label names (or ids) to class ids, refusing labels training never had."""
    _refuse_missing_labels(values, column, source)
    lookup, count = labels.label2id, len(labels.names)
    # With no numeric names (e.g. id2label from a saved model), an integer label can only be a class id.
    ids_allowed = labels.from_ids or not any(_INT.fullmatch(name) for name in labels.names)
    ids, unknown = [], {}
    for row, value in enumerate(values, 1):
        class_id = None if labels.from_ids and isinstance(value, int) else lookup.get(str(value).strip())
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
    _check_max_length(tokenizer, max_length, pair)
    # A copy, so the caller's tokenizer keeps its own truncation side.
    tok = copy.deepcopy(tokenizer)
    tok.truncation_side = truncation_side

    def encode(batch):
        return tok(batch["text"], batch["text_pair"] if pair else None, truncation=True, max_length=max_length)

    dropped = [c for c in ds.column_names if c != "label"]
    encoded = ds.map(encode, batched=True, remove_columns=dropped, desc="Tokenising")
    if "label" in encoded.column_names:
        encoded = encoded.rename_column("label", "labels")
    return encoded


def _check_max_length(tokenizer, max_length: int, pair: bool) -> None:
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


def length_grouped_order(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """A random permutation whose consecutive ``batch_size`` chunks hold similar lengths, to cut padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    order = torch.randperm(len(lengths), generator=generator).tolist()
    mega = batch_size * 50
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    # A partial batch must stay last: anywhere else it would shift every later chunk off its batch.
    tail = batches.pop() if batches and len(batches[-1]) < batch_size else []
    batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    # The longest batch goes first so running out of memory shows at step one.
    if batches:
        longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        batches[0], batches[longest] = batches[longest], batches[0]
    return [i for batch in batches for i in batch] + tail
