"""Tests for data/tokens.py: CoNLL files and token/tag tables, tag sets, first-piece labels, the collator."""

from __future__ import annotations

import json
from types import SimpleNamespace

import datasets
import pytest

from test_cli import minilm_tokenizer

from lorafit.data import tokens as tagged
from lorafit.errors import LorafitError


def test_conll_file_sentences_docstart_columns_and_line_ends(tmp_path):
    text = ("-DOCSTART- -X- -X- O\r\n\r\nEU NNP B-NP B-ORG\r\nrejects VBZ B-VP O\r\n\r\n\r\n"
            "-DOCSTART- -X- O\r\nPeter\tNNP\tB-PER\r\nBlackburn\tNNP\tI-PER\r\n")
    path = tmp_path / "train.conll"
    path.write_bytes(text.encode("utf-8"))
    read = tagged.read_tagged(path)
    assert read.tokens == [["EU", "rejects"], ["Peter", "Blackburn"]]
    assert read.tags == [["B-ORG", "O"], ["B-PER", "I-PER"]]
    assert read.position(1, 1) == "line 9"  # Blackburn's line in the file


def test_tables_json_lines_csv_of_json_and_spaced_words(tmp_path):
    rows = [{"tokens": ["EU", "rejects", "German"], "tags": ["B-ORG", "O", "B-MISC"]},
            {"tokens": ["Peter"], "tags": ["B-PER"]}]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    csv_file = tmp_path / "t.csv"
    csv_file.write_text('tokens,tags\n"[""EU"", ""rejects"", ""German""]",B-ORG O B-MISC\nPeter,"[""B-PER""]"\n',
                        encoding="utf-8")
    for path in (jsonl, csv_file):
        read = tagged.read_tagged(path)
        assert read.tokens == [r["tokens"] for r in rows] and read.tags == [r["tags"] for r in rows], path


@pytest.mark.parametrize("name, write", [
    ("pandas.csv", lambda df, p: df.to_csv(p, index=False)),  # lists as Python reprs: ['EU', "O'Neil"]
    ("pandas.tsv", lambda df, p: df.to_csv(p, index=False, sep="\t")),
    ("excel.csv", lambda df, p: df.to_csv(p, index=False, sep=";", lineterminator="\r\n", encoding="utf-8-sig")),
    ("pandas.jsonl", lambda df, p: df.to_json(p, orient="records", lines=True, force_ascii=False)),
    ("pandas.json", lambda df, p: df.to_json(p, orient="records")),
    ("pandas.parquet", lambda df, p: df.to_parquet(p)),
])
def test_token_tables_written_by_pandas_load_as_written(tmp_path, name, write):
    import pandas as pd

    written = pd.DataFrame({"tokens": [["EU", "rejects", "German"], ["O'Neil", 'said "hi",', "São", "[1]"]],
                            "tags": [["B-ORG", "O", "B-MISC"], ["B-PER", "O", "B-LOC", "O"]]})
    write(written, tmp_path / name)
    read = tagged.read_tagged(tmp_path / name)
    assert read.tokens == written["tokens"].tolist() and read.tags == written["tags"].tolist()


def test_a_cell_that_is_no_list_literal_is_refused_by_row(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("tokens,tags\n\"['a', b]\",O O\n", encoding="utf-8")
    with pytest.raises(LorafitError, match=r"row 1 of 'bad.csv': column 'tokens' starts like a list but is not one"):
        tagged.read_tagged(path)
    path.write_text("tokens,tags\n\"[['a'], 'b']\",O O\n", encoding="utf-8")
    with pytest.raises(LorafitError, match=r"row 1 of 'bad.csv': column 'tokens' holds"):
        tagged.read_tagged(path)


def test_ner_tags_ids_named_by_a_class_label_or_tag_names(tmp_path):
    names = ["O", "B-PER", "I-PER"]
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"tokens": [["Peter", "Blackburn", "spoke"]], "ner_tags": [[1, 2, 0]]},
                               features=features).save_to_disk(str(folder))
    read = tagged.read_tagged(folder)
    space = tagged.build_tag_space(read)
    assert space.names == tuple(names)
    assert tagged.tag_ids(read, space, "training") == [[1, 2, 0]]

    plain = tmp_path / "ids.jsonl"
    plain.write_text(json.dumps({"tokens": ["Peter", "spoke"], "ner_tags": [1, 0]}) + "\n", encoding="utf-8")
    with pytest.raises(LorafitError, match="--tag-names"):
        tagged.build_tag_space(tagged.read_tagged(plain))
    assert tagged.build_tag_space(tagged.read_tagged(plain), ["O", "B-PER"]).names == ("O", "B-PER")


def test_tag_order_is_o_first_then_type_then_prefix():
    sentences = tagged.TaggedSentences([["a"] * 5], [["I-PER", "B-PER", "O", "S-LOC", "B-LOC"]], ["row 1"], "x")
    assert tagged.build_tag_space(sentences).names == ("O", "B-LOC", "S-LOC", "B-PER", "I-PER")



def test_slow_tokenizer_is_refused():
    with pytest.raises(LorafitError, match="needs a fast tokenizer.*tokenizer.json"):
        tagged.check_fast_tokenizer(SimpleNamespace(is_fast=False))



# --- word pieces --------------------------------------------------------------------------------------
def test_first_piece_gets_the_word_label_and_the_rest_minus_100():
    tokenizer = minilm_tokenizer()
    words = ["Angela", "Merkelization", "visited", "Paris"]
    sentences = tagged.TaggedSentences([words], [["B-PER", "I-PER", "O", "B-LOC"]], ["row 1"], "x")
    (example,) = tagged.tokenize_tagged(sentences, [[1, 2, 0, 3]], tokenizer, max_length=32)
    # the reference: each word's pieces counted on their own, between [CLS] and [SEP]
    expected = [-100]
    for word, label in zip(words, [1, 2, 0, 3]):
        pieces = tokenizer.tokenize(word)
        expected += [label] + [-100] * (len(pieces) - 1)
    expected.append(-100)
    assert len(tokenizer.tokenize("Merkelization")) > 1  # the test needs a word of several pieces
    assert example["labels"] == expected
    assert example["word_index"] == [0, 1, 2, 3]

    (cut,) = tagged.tokenize_tagged(sentences, [[1, 2, 0, 3]], tokenizer, max_length=4)
    assert cut["labels"] == [-100, 1, 2, -100] and cut["word_index"] == [0, 1]  # words past the limit: unscored


def test_collator_pads_labels_with_minus_100():
    tokenizer = minilm_tokenizer()
    sentences = tagged.TaggedSentences([["a", "b", "c"], ["d"]], [[0, 1, 0], [1]], ["row 1", "row 2"], "x")
    examples = tagged.tokenize_tagged(sentences, sentences.tags, tokenizer, max_length=16)
    batch = tagged.make_token_collator(tokenizer)(examples)
    assert batch["labels"].tolist() == [[-100, 0, 1, 0, -100], [-100, 1, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]


def _tiny_roberta_tokenizer():
    """A byte-level BPE tokenizer (RoBERTa's kind) that knows 'paris' with and without its leading-space mark."""
    from transformers import RobertaTokenizer

    vocab = {token: i for i, token in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", *"aiprsĠ",
                                                 "pa", "par", "pari", "paris", "Ġparis"])}
    merges = [("p", "a"), ("pa", "r"), ("par", "i"), ("pari", "s"), ("Ġ", "paris")]
    return RobertaTokenizer(vocab=vocab, merges=merges)


def test_byte_level_tokenizers_encode_each_word_as_after_a_space():
    """Pre-split words must encode as inside running text ('Ġparis'), as Hugging Face's examples get with
    add_prefix_space=True; without it every word would look sentence-initial to the model."""
    tokenizer = _tiny_roberta_tokenizer()
    assert tokenizer("paris paris").tokens() == ["<s>", "paris", "Ġparis", "</s>"]  # the reference: running text
    sentences = tagged.TaggedSentences([["paris", "paris"]], [[1, 0]], ["row 1"], "x")
    (example,) = tagged.tokenize_tagged(sentences, sentences.tags, tokenizer, max_length=8)
    assert tokenizer.convert_ids_to_tokens(example["input_ids"]) == ["<s>", "Ġparis", "Ġparis", "</s>"]
    assert example["labels"] == [-100, 1, 0, -100]
    assert tokenizer("paris paris").tokens() == ["<s>", "paris", "Ġparis", "</s>"]  # the caller's tokenizer unchanged
