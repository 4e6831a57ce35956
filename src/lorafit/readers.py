"""Reading local data files (CSV, TSV, JSON Lines, JSON, Parquet, save_to_disk folders) into Datasets.

Messy real files load correctly or fail with one clear line: quoted fields holding newlines or
carriage returns, a byte-order mark, CRLF line ends, and non-UTF-8 bytes (pass --encoding). Row
numbers in messages count records from 1 (a CSV header is not a row). Columns whose every non-empty
value is a whole number come back as ints (blank cells as None), all-decimal ones as floats, the
rest as str.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from lorafit.errors import LorafitError

SUPPORTED_FORMATS = ".csv, .tsv/.tab, .jsonl/.ndjson, .json, .parquet, or a directory written by save_to_disk"
_DELIMITED = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
_JSON = {".json", ".jsonl", ".ndjson"}
INT_PATTERN = re.compile(r"[+-]?\d{1,18}")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


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
    for pattern, convert in ((INT_PATTERN, int), (_FLOAT, float)):
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


def value_kind(value) -> str | None:
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
        kind = value_kind(value)
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
