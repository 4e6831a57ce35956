"""Reading local data files (CSV, TSV, JSON Lines, JSON, Parquet, save_to_disk folders) into Datasets.

Messy real files load correctly or fail with one clear line: quoted fields holding newlines or
carriage returns, a bare carriage return left unquoted inside a field (pandas' ``to_csv`` writes
them so), a byte-order mark, CRLF line ends, and non-UTF-8 bytes (pass --encoding); UTF-16 without
a byte-order mark, binary files and FIFOs are refused by name. Row numbers in messages count records
from 1 (a CSV header is not a row). Columns whose every non-empty value is a whole number written
plainly come back as ints (blank cells as None; "007" stays text), all-decimal ones as floats, the
rest as str. Parquet bytes columns holding UTF-8 come back as str.
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
    if not path.is_file():  # reading a FIFO or a device would block or never end
        raise LorafitError(f"{role} '{path}' is not a regular file (a pipe, socket or device); "
                           "save the data to a file and pass that")
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


def read_text(path: Path, encoding: str | None = None) -> str:
    """A text file's contents, decoded and checked as the table readers do (BOM, UTF-16, binary, --encoding)."""
    return _decode(path, path.read_bytes(), encoding)


def _decode(path: Path, raw: bytes, encoding: str | None) -> str:
    """Decode bytes (UTF-8 unless told otherwise; UTF-16 when it starts with its BOM)."""
    chosen = encoding or ("utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8")
    if chosen == "utf-8":
        _refuse_nul_bytes(path, raw)
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


def _refuse_nul_bytes(path: Path, raw: bytes) -> None:
    """Name UTF-16 without a byte-order mark, and binary files, instead of failing later on quoting."""
    sample = raw[:65536]
    first = sample.find(b"\0")
    if first < 0:
        return
    nuls = sample.count(b"\0")
    odd = sample[1::2].count(b"\0")  # ASCII text as UTF-16-LE has a NUL after every character
    if nuls >= len(sample) // 4 and min(odd, nuls - odd) <= nuls // 10:
        order = "le" if odd > nuls // 2 else "be"
        raise LorafitError(f"'{path}' looks like UTF-16 text without a byte-order mark (every other byte is 0); "
                           f"pass --encoding utf-16-{order}, or re-save it as UTF-8")
    raise LorafitError(f"'{path}' holds NUL bytes (the first at byte {first}), so it is not a text file; "
                       "if it is a workbook or other binary format, export it as CSV (UTF-8), or pass --encoding "
                       "if it is UTF-16/UTF-32 text")


def _parse_delimited(path: Path, text: str, delimiter: str) -> dict[str, list]:
    """Parse CSV/TSV text (quoted newlines, bare CRs, CRLF) into typed columns."""
    header_line = re.split(r"\r\n|\r|\n", text, maxsplit=1)[0]
    if delimiter == ",":
        delimiter = _sniff_delimiter(header_line)
    text, placeholder = _protect_bare_crs(text)
    csv.field_size_limit(2**31 - 1)  # the default 128 KiB cap rejects long documents
    # newline="" hands line ends to csv untouched, so quoted \r and \n stay inside fields. Spaces after a
    # delimiter are skipped only in hand-written files whose header puts them there ("text, label"):
    # writers such as pandas keep a field's leading spaces unquoted.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter,
                        skipinitialspace=f"{delimiter} " in header_line)
    header, rows = None, []
    try:
        for row in reader:
            if placeholder and any(placeholder in field for field in row):
                row = [field.replace(placeholder, "\r") for field in row]
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


def _protect_bare_crs(text: str) -> tuple[str, str]:
    """Hide the carriage returns that are text from csv, which ends a row at every one; return the stand-in.

    A file whose header ends in "\\n" ends rows in "\\n", so all its "\\r" are text (pandas' to_csv leaves
    them unquoted); one ending in "\\r\\n" keeps a "\\r" not followed by "\\n" as text; a file whose
    header ends in a lone "\\r" (old Mac exports) ends its rows so.
    """
    line_end = re.search(r"\r\n|\r|\n", text)
    if "\r" not in text or line_end.group() == "\r":
        return text, ""
    placeholder = next(chr(c) for c in range(0xE000, 0xF900) if chr(c) not in text)  # a private-use char
    if line_end.group() == "\n":
        return text.replace("\r", placeholder), placeholder
    return re.sub(r"\r(?!\n)", placeholder, text), placeholder


def _sniff_delimiter(header_line: str) -> str:
    """Pick ';' or tab for a .csv whose header has no commas (spreadsheet exports)."""
    if "," not in header_line:
        for candidate in (";", "\t"):
            if candidate in header_line:
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
    """Turn an all-whole-number (or all-decimal) column into ints (floats); blanks become None.

    Whole numbers must be written plainly, so codes such as "007" or "+1" keep their spelling as text.
    """
    filled = [v.strip() for v in values if v.strip()]
    if filled and all(_plain_int(v) for v in filled):
        return [int(v) if v.strip() else None for v in values]
    if filled and all(_FLOAT.fullmatch(v) and (not INT_PATTERN.fullmatch(v) or _plain_int(v)) for v in filled):
        return [float(v) if v.strip() else None for v in values]
    return values


def _plain_int(value: str) -> bool:
    """A whole number written as Python and pandas write one (not "007" or "+1")."""
    return bool(INT_PATTERN.fullmatch(value)) and str(int(value)) == value


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
    return datasets.Dataset(_bytes_as_text(table.drop_columns(index_columns)))


def _bytes_as_text(table: pa.Table) -> pa.Table:
    """Decode bytes columns that hold UTF-8 text to str; others stay bytes, for the columns' users to refuse."""
    for i, field in enumerate(table.schema):
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            text_type = pa.large_string() if pa.types.is_large_binary(field.type) else pa.string()
            try:
                table = table.set_column(i, field.name, table.column(i).cast(text_type))
            except pa.ArrowInvalid:  # not UTF-8: images, pickles, ...
                pass
    return table


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
