"""Tests for lorafit.data.readers on files as pandas and spreadsheets write them; the DataFrame written is the reference."""

from __future__ import annotations

import os
import threading

import pandas as pd
import pytest

from lorafit.cli import main
from lorafit.errors import LorafitError
from lorafit.data.readers import read_table

# Every value a writer may leave unquoted or quote: bare carriage returns (pandas' to_csv leaves them
# unquoted in a file whose rows end in "\n"), line ends, quotes, delimiters, leading spaces, unicode.
TEXTS = ["bare\rreturn", "\rstarts with a return", "crlf\r\ninside", "new\nline", 'say "hi", then go',
         "tab\there; semi", "  leading spaces", "ünïcødé 日本語 🙂 \u2028", "plain", "ends in a return\r"]


def frame() -> pd.DataFrame:
    """Text last, so a field ending in "\\r" meets the row end; codes keep their spelling as text."""
    return pd.DataFrame({"label": ["pos", "neg"] * 5, "n": list(range(10)),
                         "code": ["007", "1", "2", "3", "4", "5", "6", "7", "8", "09"], "text": TEXTS})


@pytest.mark.parametrize("name, options", [
    ("pandas.csv", {}),
    ("pandas.tsv", {"sep": "\t"}),
    ("pandas_crlf.csv", {"lineterminator": "\r\n"}),
    ("excel.csv", {"lineterminator": "\r\n", "encoding": "utf-8-sig"}),
    ("excel_semicolons.csv", {"sep": ";", "lineterminator": "\r\n", "encoding": "utf-8-sig"}),
])
def test_delimited_files_written_by_pandas_and_spreadsheets_load_as_written(tmp_path, name, options):
    written = frame()
    written.to_csv(tmp_path / name, index=False, **options)
    loaded = read_table(tmp_path / name)
    assert loaded.column_names == list(written.columns)
    assert loaded.to_list() == written.to_dict("records")


def test_bare_carriage_return_in_a_crlf_file_is_text_and_an_lf_row_end_is_not(tmp_path):
    (tmp_path / "crlf.csv").write_bytes(b"text,label\r\na\rb,x\r\nc,y\r\n")
    assert read_table(tmp_path / "crlf.csv").to_list() == [{"text": "a\rb", "label": "x"},
                                                           {"text": "c", "label": "y"}]
    (tmp_path / "mac.csv").write_bytes(b"text,label\ra,x\rc,y\r")  # old Mac exports end rows in "\r"
    assert read_table(tmp_path / "mac.csv").to_list() == [{"text": "a", "label": "x"}, {"text": "c", "label": "y"}]


def test_hand_written_csv_with_spaces_after_commas_still_loads(tmp_path):
    (tmp_path / "d.csv").write_text('text, label\n"a, b", pos\nc, neg\n')
    assert read_table(tmp_path / "d.csv").to_list() == [{"text": "a, b", "label": "pos"},
                                                        {"text": "c", "label": "neg"}]


@pytest.mark.parametrize("name, options", [
    ("records.jsonl", {"lines": True}),
    ("unescaped.jsonl", {"lines": True, "force_ascii": False}),
    ("records.json", {}),
])
def test_json_written_by_pandas_loads_as_written(tmp_path, name, options):
    written = frame()
    written.to_json(tmp_path / name, orient="records", **options)
    assert read_table(tmp_path / name).to_list() == written.to_dict("records")


@pytest.mark.parametrize("name", ["d.csv", "d.jsonl"])
@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_utf16_without_byte_order_mark_is_named_with_the_flag_that_reads_it(tmp_path, name, codec):
    text = "text,label\nhello,pos\nbye,neg\n" if name.endswith(".csv") else \
        '{"text": "hello", "label": "pos"}\n{"text": "bye", "label": "neg"}\n'
    (tmp_path / name).write_bytes(text.encode(codec))
    with pytest.raises(LorafitError, match=f"looks like UTF-16 text without a byte-order mark.*--encoding {codec}"):
        read_table(tmp_path / name)
    assert read_table(tmp_path / name, encoding=codec).to_list() == [{"text": "hello", "label": "pos"},
                                                                     {"text": "bye", "label": "neg"}]


def test_binary_file_with_a_text_extension_is_not_blamed_on_quoting(tmp_path):
    (tmp_path / "book.csv").write_bytes(b"PK\x03\x04\x14\x00\x06\x00" + bytes(range(256)) * 8)  # an .xlsx header
    with pytest.raises(LorafitError, match=r"holds NUL bytes \(the first at byte 5\), so it is not a text file; "
                                           r"if it is a workbook .* export it as CSV"):
        read_table(tmp_path / "book.csv")


def test_parquet_bytes_column_holding_utf8_is_text(tmp_path):
    pd.DataFrame({"text": ["café".encode(), b"plain"], "label": ["a", "b"]}).to_parquet(tmp_path / "d.parquet")
    assert read_table(tmp_path / "d.parquet").to_list() == [{"text": "café", "label": "a"},
                                                            {"text": "plain", "label": "b"}]


def test_fifo_named_csv_is_refused_on_the_command_line_without_hanging(tmp_path, capsys):
    fifo = tmp_path / "train.csv"
    os.mkfifo(fifo)
    result = {}
    # A thread, so a reader that blocks on the FIFO fails the test instead of hanging it.
    worker = threading.Thread(target=lambda: result.update(
        code=main(["train", "--train-file", str(fifo), "--output-dir", str(tmp_path / "out")])), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "reading a FIFO blocked"
    err = capsys.readouterr().err
    assert result["code"] == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "is not a regular file (a pipe, socket or device); save the data to a file" in err
    assert not (tmp_path / "out").exists()
