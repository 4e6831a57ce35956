"""Token-classification data (NER and other tagging): reading tagged sentences, tag sets, word-piece labels.

Two shapes of file hold tagged sentences:

- CoNLL-style text (.conll, .txt, .iob, .bio, .bioes): one token per line, its tag in the last
  whitespace-separated column, blank lines between sentences, ``-DOCSTART-`` lines skipped;
- tables (JSON Lines, JSON, CSV, TSV, Parquet, a ``save_to_disk`` folder) with a tokens column and a
  tags column: lists of strings, or in CSV cells a JSON list, a Python list literal (as pandas' ``to_csv``
  writes list columns) or the words separated by spaces. Tags
  may be class ids (``ner_tags``) whose names come from a ``datasets`` ClassLabel or ``--tag-names``.

Each word's label goes to its first word piece; the other pieces and the special tokens get -100,
which the loss and the metrics skip (as in Hugging Face's token-classification examples).
"""

from __future__ import annotations

import ast
import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import pre_tokenizers

from lorafit.data.classification import LabelSpace, make_collator
from lorafit.data.readers import read_table, read_text
from lorafit.errors import LorafitError

CONLL_SUFFIXES = (".conll", ".txt", ".iob", ".bio", ".bioes")
IGNORED = -100  # the label of positions no loss or metric looks at (torch's cross-entropy ignore_index)
DOCSTART = "-DOCSTART-"
TAG_COLUMNS = ("tags", "ner_tags")  # looked for in this order when --tags-column is not given
_SCHEME_TAG = re.compile(r"[BIES]-.+")
_PREFIX_ORDER = {"B": 0, "I": 1, "E": 2, "S": 3}


@dataclass
class TaggedSentences:
    """Sentences as read: ``tags`` hold names (str) or class ids (int); ``where`` names each one for errors."""

    tokens: list[list[str]]
    tags: list[list]
    where: list[str]  # "line 12" (CoNLL: the sentence's first line) or "row 3" (tables)
    source: str  # the file's name
    id_names: tuple[str, ...] | None = None  # the names of integer tags, from a datasets ClassLabel
    conll: bool = False  # one word per line: word k of a sentence is k lines below its first

    def position(self, sentence: int, word: int) -> str:
        """Where a word is, for messages: "line 14" in a CoNLL file, "row 3, word 2" in a table."""
        where = self.where[sentence]
        if self.conll:
            return f"line {int(where.split()[1]) + word}"
        return f"{where}, word {word + 1}"

    def __len__(self) -> int:
        return len(self.tokens)

    def head(self, count: int) -> "TaggedSentences":
        """The first ``count`` sentences (--max-train-samples, --max-eval-samples)."""
        return TaggedSentences(self.tokens[:count], self.tags[:count], self.where[:count], self.source, self.id_names,
                               self.conll)


@dataclass(frozen=True)
class TagSpace(LabelSpace):
    """The tags: ``names[i]`` is class id ``i``. ``entities`` when every tag is O or B-/I-/E-/S- plus a type."""

    @property
    def entities(self) -> bool:
        return all(is_scheme_tag(name) for name in self.names)


def is_scheme_tag(tag: str) -> bool:
    """O, or an IOB1/IOB2/IOBES prefix and a type: B-PER, I-LOC, E-ORG, S-MISC."""
    return tag == "O" or bool(_SCHEME_TAG.fullmatch(tag))


# --- reading ------------------------------------------------------------------------------------------
def read_tagged(path, *, encoding: str | None = None, role: str = "data file", tokens_column: str = "tokens",
                tags_column: str | None = None) -> TaggedSentences:
    """Tagged sentences from a CoNLL-style file or a table with a tokens and a tags column."""
    path = Path(path)
    if path.suffix.lower() in CONLL_SUFFIXES and path.is_file():
        return _read_conll(path, encoding)
    if not path.exists():
        raise LorafitError(f"{role} '{path}' does not exist")
    table = read_table(path, encoding=encoding, role=role)
    return sentences_from_table(table, path.name, tokens_column, tags_column)


def _read_conll(path: Path, encoding: str | None) -> TaggedSentences:
    text = read_text(path, encoding)
    sentences = TaggedSentences([], [], [], path.name, conll=True)
    tokens, tags, first = [], [], 0
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0] == DOCSTART:
            if tokens:
                sentences.tokens.append(tokens)
                sentences.tags.append(tags)
                sentences.where.append(f"line {first}")
            tokens, tags = [], []
            continue
        if len(fields) < 2:
            raise LorafitError(f"line {number} of '{path.name}' has a token but no tag ({line.strip()!r}); put the "
                               "tag in the last column, after a space or tab (e.g. 'Paris B-LOC')")
        if not tokens:
            first = number
        tokens.append(fields[0])
        tags.append(fields[-1])
    if tokens:
        sentences.tokens.append(tokens)
        sentences.tags.append(tags)
        sentences.where.append(f"line {first}")
    if not sentences.tokens:
        raise LorafitError(f"'{path.name}' holds no tagged tokens; write one token and its tag per line, with a "
                           "blank line between sentences")
    return sentences


def sentences_from_table(table, source: str, tokens_column: str, tags_column: str | None) -> TaggedSentences:
    """Tagged sentences from a table (a file's or a hub dataset's split), one per row, checked row by row."""
    columns = table.column_names
    tags_column = tags_column or next((c for c in TAG_COLUMNS if c in columns), TAG_COLUMNS[0])
    for column, flag in ((tokens_column, "--tokens-column"), (tags_column, "--tags-column")):
        if column not in columns:
            raise LorafitError(f"'{source}' has no column '{column}'; columns found: {', '.join(columns) or 'none'}. "
                               f"Pass {flag} NAME, or give a CoNLL file ({', '.join(CONLL_SUFFIXES)})")
    if len(table) == 0:
        raise LorafitError(f"'{source}' has no rows; add tagged sentences to it or pass another file")
    rows = table.with_format("arrow")
    token_values, tag_values = rows[tokens_column].to_pylist(), rows[tags_column].to_pylist()
    sentences = TaggedSentences([], [], [], source, _class_label_names(table.features[tags_column]))
    for row, (tokens, tags) in enumerate(zip(token_values, tag_values), 1):
        where = f"row {row}"
        tokens = _as_sequence(tokens, source, where, tokens_column)
        tags = _as_sequence(tags, source, where, tags_column)
        if len(tokens) != len(tags):
            raise LorafitError(f"{where} of '{source}' has {len(tokens)} tokens but {len(tags)} tags; give exactly one "
                               "tag per token")
        for i, token in enumerate(tokens):
            if not isinstance(token, str) or not token.strip():
                raise LorafitError(f"token {i + 1} of {where} of '{source}' is {token!r}, not a word; remove it "
                                   "(and its tag) or fill it in")
        sentences.tokens.append(tokens)
        sentences.tags.append(tags)
        sentences.where.append(where)
    return sentences


def _class_label_names(feature) -> tuple[str, ...] | None:
    """A datasets ``List(ClassLabel)`` column's tag names (the convention of the hub's NER sets), else None."""
    inner = getattr(feature, "feature", None)
    names = getattr(inner, "names", None)
    return tuple(names) if names else None


def _as_sequence(value, source: str, where: str, column: str) -> list:
    """A cell as a list: a list as it is; a text holding a list literal, or words separated by spaces, split."""
    if isinstance(value, str):
        text = value.strip()
        value = _list_literal(text, source, where, column) if text.startswith("[") else text.split()
    if not isinstance(value, list) or not value or any(isinstance(item, (list, dict)) for item in value):
        raise LorafitError(f"{where} of '{source}': column '{column}' holds {value!r}, not a list of one or more "
                           "words or tags; give each sentence its tokens and one tag per token")
    return value


def _list_literal(text: str, source: str, where: str, column: str):
    """A JSON list, or the Python list literal pandas' to_csv writes for a list column (['EU', "O'Neil"]).
    ast.literal_eval builds literals only, so a cell can never run code."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise LorafitError(f"{where} of '{source}': column '{column}' starts like a list but is not one; write it "
                           "as [\"a\", \"b\"] or as words separated by spaces") from None


# --- tags ---------------------------------------------------------------------------------------------
def build_tag_space(train: TaggedSentences, tag_names: list[str] | None = None) -> TagSpace:
    """The training data's tags: as --tag-names or a ClassLabel orders them, else O first, then by type and prefix."""
    given = tuple(tag_names) if tag_names else train.id_names
    kinds = {type(tag) for tags in train.tags for tag in tags}
    if kinds - {str, int} or len(kinds) > 1:
        raise LorafitError(f"the tags of '{train.source}' mix {' and '.join(sorted(k.__name__ for k in kinds))}; "
                           "write every tag as a name (B-PER) or every tag as a class id with --tag-names")
    if kinds == {int} and given is None:
        raise LorafitError(f"the tags of '{train.source}' are class ids with no names; pass --tag-names in id order "
                           "(e.g. --tag-names O B-PER I-PER), or save the data with a datasets ClassLabel feature")
    if given is not None:
        if len(set(given)) != len(given):
            raise LorafitError(f"--tag-names lists a tag twice ({', '.join(given)}); name each tag once")
        space = TagSpace(given)
        tag_ids(train, space, "training")  # every tag must be one of them
        return space
    seen = {tag for tags in train.tags for tag in tags}
    if len(seen) < 2:
        raise LorafitError(f"'{train.source}' has only one tag ({next(iter(seen))!r}); a tagger needs at least two, "
                           "so add sentences with other tags")
    return TagSpace(tuple(sorted(seen, key=_tag_order)))


def _tag_order(tag: str) -> tuple:
    if tag == "O":
        return (0, "", 0)
    if is_scheme_tag(tag):
        return (1, tag[2:], _PREFIX_ORDER[tag[0]])
    return (2, tag, 0)


def tag_ids(sentences: TaggedSentences, space: TagSpace, role: str) -> list[list[int]]:
    """Each sentence's tags as class ids; a tag training never had is refused with its line or row."""
    lookup, count = space.label2id, len(space.names)
    ids = []
    for sentence, tags in enumerate(sentences.tags):
        row = []
        for word, tag in enumerate(tags):
            if isinstance(tag, int) and not isinstance(tag, bool) and 0 <= tag < count:
                row.append(tag)
            elif isinstance(tag, str) and tag in lookup:
                row.append(lookup[tag])
            else:
                where = f"{sentences.position(sentence, word)} of '{sentences.source}'"
                if isinstance(tag, int):
                    raise LorafitError(f"{role} tag id {tag} ({where}) is not a class id (ids run 0..{count - 1}: "
                                       f"{', '.join(space.names)}); fix the data")
                raise LorafitError(f"{role} tag {tag!r} ({where}) never occurs in the training data (tags: "
                                   f"{', '.join(space.names)}); fix the data or add examples of it to training")
        ids.append(row)
    return ids


# --- word pieces --------------------------------------------------------------------------------------
def check_fast_tokenizer(tokenizer) -> None:
    """Word-piece labels need the fast tokenizers' word_ids(); a slow (Python) tokenizer has none."""
    if not getattr(tokenizer, "is_fast", False):
        raise LorafitError(f"token classification needs a fast tokenizer (one with tokenizer.json, which maps word "
                           f"pieces back to words), but this model's is the slow {type(tokenizer).__name__}; use a "
                           "model that ships tokenizer.json, or convert it once with AutoTokenizer.from_pretrained"
                           "(dir, use_fast=True).save_pretrained(dir)")


def word_piece_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """The first piece of each word gets the word's label; later pieces and special tokens get -100."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(IGNORED if word is None or word == previous else word_labels[word])
        previous = word
    return labels


def encode_words(tokenizer, words: list[list[str]], *, max_length: int):
    """The tokenizer's encoding of pre-split sentences (truncated to ``max_length`` pieces)."""
    check_fast_tokenizer(tokenizer)
    return _spacing_words(tokenizer)(words, is_split_into_words=True, truncation=True, max_length=max_length)


def _spacing_words(tokenizer):
    """Byte-level BPE tokenizers (RoBERTa, GPT-2) mark a word's leading space in its first piece, and encode
    pre-split words as if each began the text unless told to add that space (Hugging Face's examples load
    them with add_prefix_space=True): a copy that adds it, leaving the caller's tokenizer as it was."""
    pre_tokenizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
    if not isinstance(pre_tokenizer, pre_tokenizers.ByteLevel) or pre_tokenizer.add_prefix_space:
        return tokenizer
    spacing = copy.deepcopy(tokenizer)
    spacing.backend_tokenizer.pre_tokenizer.add_prefix_space = True
    return spacing


def tokenize_tagged(sentences: TaggedSentences, labels: list[list[int]], tokenizer, *,
                    max_length: int) -> list[dict]:
    """Examples for the collator: input ids, attention mask, word-piece labels, and (``word_index``) the word
    each labelled piece starts; words cut by ``max_length``, or with no piece at all, have none."""
    encoded = encode_words(tokenizer, sentences.tokens, max_length=max_length)
    examples = []
    for i, word_labels in enumerate(labels):
        example = {key: values[i] for key, values in encoded.items()}
        word_ids = encoded.word_ids(i)
        example["labels"] = word_piece_labels(word_ids, word_labels)
        example["word_index"] = [w for w, label in zip(word_ids, example["labels"]) if label != IGNORED]
        examples.append(example)
    return examples


def make_token_collator(tokenizer) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Pad a batch as the classification collator does, and its labels with -100 on the same side."""
    pad_inputs = make_collator(tokenizer)
    left = tokenizer.padding_side == "left"

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_inputs([{k: v for k, v in e.items() if k not in ("labels", "word_index")} for e in examples])
        if "labels" in examples[0]:
            longest = batch["input_ids"].shape[1]
            rows = []
            for e in examples:
                padding = [IGNORED] * (longest - len(e["labels"]))
                rows.append(padding + list(e["labels"]) if left else list(e["labels"]) + padding)
            batch["labels"] = torch.tensor(rows, dtype=torch.long)
        return batch

    return collate
