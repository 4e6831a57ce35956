"""Labelling texts with a loaded classifier adapter: the library side of `lorafit predict`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorafit.data import classification as text_data
from lorafit.errors import LorafitError
from lorafit.fast import use_fast_paths
from lorafit.inference.loading import LoadedAdapter
from lorafit.tasks.classification import predict_texts
from lorafit.training.settings import DEFAULT_MAX_LENGTH, check_positive_int


@dataclass
class PredictSettings:
    """How texts are read and labelled. Every field is also a `lorafit predict` flag."""

    batch_size: int = 64
    """Texts per forward pass."""
    text_column: str | None = None
    """Column of --input holding the texts (default: as in training, else text)."""
    text_pair_column: str | None = None
    """Column of --input holding the second texts, for an adapter trained on text pairs (default: as in training)."""

    def __post_init__(self) -> None:
        check_positive_int("batch_size", self.batch_size)


def pair_column_of(loaded: LoadedAdapter, settings: PredictSettings) -> str | None:
    """The second-text column, when the adapter classifies text pairs."""
    return settings.text_pair_column or loaded.info.get("text_pair_column")


def read_texts(texts: list[str], input_file: str | None, settings: PredictSettings, default_column: str,
               pair_column: str | None = None, encoding: str | None = None) -> tuple[list[str], list[str] | None]:
    """The texts to classify (given, or read from ``input_file``), and their second texts for a pair adapter."""
    if texts and input_file:
        raise LorafitError("pass texts as arguments or --input FILE, not both")
    if texts:
        if pair_column:  # scoring the first texts alone would give confident nonsense
            raise LorafitError(f"this adapter classifies text pairs (training columns {default_column!r} and "
                               f"{pair_column!r}); pass --input FILE with both columns")
        return list(texts), None
    if not input_file:
        raise LorafitError("nothing to predict: pass texts as arguments or --input FILE")
    column = settings.text_column or default_column
    table = text_data.read_table(input_file, encoding=encoding, role="input file")
    prepared = text_data.prepare_split(table, split="input", source=Path(input_file).name, text_column=column,
                                  text_pair_column=pair_column, label_column=None, labels=None)
    return list(prepared["text"]), (list(prepared["text_pair"]) if pair_column else None)


def predict_rows(loaded: LoadedAdapter, texts: list[str], pairs: list[str] | None,
                 settings: PredictSettings) -> list[dict]:
    """One row per text of a classifier adapter: the text (and its pair), the label and every class's probability;
    of a tagger adapter: the text, each word's tag and probability, and its entities (tasks.token_classification)."""
    use_fast_paths(loaded.model)
    if loaded.task == "token-classification":
        from lorafit.tasks.token_classification import predict_tags

        return predict_tags(loaded, texts, settings.batch_size)
    id2label = loaded.model.config.id2label
    probabilities = predict_texts(loaded.model, loaded.tokenizer, texts,
                                  max_length=loaded.info.get("max_length") or DEFAULT_MAX_LENGTH["classification"],
                                  truncation_side=loaded.info.get("truncation_side", "right"),
                                  batch_size=settings.batch_size, pairs=pairs)
    return [{"text": text, **({"text_pair": pairs[i]} if pairs else {}), "label": id2label[int(p.argmax())],
             "probabilities": {id2label[k]: round(float(v), 6) for k, v in enumerate(p)}}
            for i, (text, p) in enumerate(zip(texts, probabilities))]
