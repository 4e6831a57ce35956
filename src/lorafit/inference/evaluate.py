"""Scoring a loaded adapter on a labelled table: the library side of `lorafit eval`."""

from __future__ import annotations

from dataclasses import dataclass

from lorafit.data import classification as text_data
from lorafit.fast import use_fast_paths
from lorafit.data.readers import read_table
from lorafit.inference.loading import LoadedAdapter, adapter_task, check_adapter_dir
from lorafit.inference.adapter_info import load_adapter_info
from lorafit.tasks.classification import evaluate_classifier
from lorafit.training.settings import DEFAULT_MAX_LENGTH, check_positive_int


@dataclass
class EvalSettings:
    """How an adapter is scored. Every field is also a `lorafit eval` flag; unset ones follow training."""

    batch_size: int = 64
    """Examples per forward pass."""
    max_length: int | None = None
    """Longest input in tokens (default: as in training)."""
    text_column: str | None = None
    """Text column; for a token-classification adapter, its tokens column; for a seq2seq adapter, its input
    column (default: as in training)."""
    text_pair_column: str | None = None
    """Second text column (default: as in training)."""
    label_column: str | None = None
    """Label column; for a token-classification adapter, its tags column; for a seq2seq adapter, its target
    column (default: as in training)."""

    def __post_init__(self) -> None:
        check_positive_int("batch_size", self.batch_size)
        if self.max_length is not None:  # 0 would otherwise read as "not given"
            check_positive_int("max_length", self.max_length)


def evaluate_adapter(loaded: LoadedAdapter, table, settings: EvalSettings, source: str = "data") -> dict:
    """Numbers only. Classifiers: loss, accuracy, macro-F1, per-class scores, confusion matrix.
    Causal LMs (seq2seq models): loss and perplexity on the response (target) tokens, with token and example counts.
    Taggers (``table`` from ``read_eval_data``): loss, word accuracy, entity precision/recall/F1, per-type scores."""
    if loaded.task == "causal-lm":
        from lorafit.tasks.causal_lm import evaluate_causal_file

        return evaluate_causal_file(loaded, table, batch_size=settings.batch_size, max_length=settings.max_length)
    if loaded.task == "seq2seq":
        from lorafit.tasks.seq2seq import evaluate_seq2seq_file

        return evaluate_seq2seq_file(loaded, table, batch_size=settings.batch_size, max_length=settings.max_length,
                                     input_column=settings.text_column, target_column=settings.label_column)
    if loaded.task == "token-classification":
        from lorafit.tasks.token_classification import evaluate_tagged_file

        use_fast_paths(loaded.model)
        return evaluate_tagged_file(loaded, table, batch_size=settings.batch_size, max_length=settings.max_length)
    use_fast_paths(loaded.model)
    info = loaded.info
    prepared = text_data.prepare_split(
        table, split="evaluation", source=source,
        text_column=settings.text_column or info.get("text_column", "text"),
        text_pair_column=settings.text_pair_column or info.get("text_pair_column"),
        label_column=settings.label_column or info.get("label_column", "label"), labels=label_space(loaded))
    max_length = settings.max_length or info.get("max_length") or DEFAULT_MAX_LENGTH["classification"]
    encoded = text_data.tokenize(prepared, loaded.tokenizer, max_length=max_length, truncation_side=info.get("truncation_side", "right"))
    return evaluate_classifier(loaded.model, encoded, text_data.make_collator(loaded.tokenizer), settings.batch_size,
                               list(label_space(loaded).names))


def read_eval_data(adapter, path: str, settings: EvalSettings, encoding: str | None = None):
    """The labelled data for ``evaluate_adapter``, read before the model loads: tagged sentences (a CoNLL file or a
    table) for a token-classification adapter, else a table."""
    adapter_dir = check_adapter_dir(adapter)
    info = load_adapter_info(adapter_dir)
    if adapter_task(adapter_dir, info) == "token-classification":
        from lorafit.tasks.token_classification import read_tagged_data

        return read_tagged_data(path, info, tokens_column=settings.text_column, tags_column=settings.label_column,
                                encoding=encoding)
    return read_table(path, encoding=encoding, role="data file")


def label_space(loaded: LoadedAdapter):
    """A classifier adapter's labels, in class-index order."""
    id2label = loaded.model.config.id2label
    return text_data.LabelSpace(tuple(id2label[i] for i in range(len(id2label))))
