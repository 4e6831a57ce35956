"""`lorafit train --task token-classification`: a tag per word (named entities, ...) with a LoRA-adapted tagger.

The model is AutoModelForTokenClassification; its head (``classifier``) trains in full and is saved
with the adapter (PEFT's TOKEN_CLS). Each word is scored at its first word piece (data/tokens.py);
tag sets in an entity scheme (IOB1, IOB2, IOBES) are scored by entity precision, recall and F1 as
seqeval computes them (training/entities.py), every tag set by word accuracy.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch

from lorafit.data import tokens as tagged
from lorafit.data.sources import read_splits
from lorafit.errors import LorafitError
from lorafit.fast import fast_section
from lorafit.inference.base_models import load_classifier
from lorafit.tasks.task import Task, eval_mode
from lorafit.training.entities import entity_scores, extract_entities
from lorafit.training.settings import DEFAULT_MAX_LENGTH, TrainConfig

ENTITY_METRICS = ("f1", "precision", "recall")
DEMO_SENTENCES = 3
_WORD = re.compile(r"\S+")


@dataclass
class TokenData:
    splits: dict[str, tagged.TaggedSentences]
    labels: dict[str, list[list[int]]]  # each split's tags as class ids
    tags: tagged.TagSpace
    description: str


def load_token_data(config: TrainConfig) -> TokenData:
    """Read and check every split (files or a hub dataset) before anything is loaded or written."""
    roles = {"train": "training", "validation": "validation", "test": "test"}
    if config.dataset:
        read = read_splits(config, builtin="")
        splits = {split: tagged.sentences_from_table(table, read.sources[split], config.tokens_column,
                                                     config.tags_column)
                  for split, table in read.tables.items() if split in roles}
        description = read.description
    elif config.train_file:
        files = {"train": config.train_file, "validation": config.validation_file, "test": config.test_file}
        splits = {split: tagged.read_tagged(path, encoding=config.encoding, role=f"{roles[split]} file",
                                            tokens_column=config.tokens_column, tags_column=config.tags_column)
                  for split, path in files.items() if path}
        description = ", ".join(f"{split}: `{path}`" for split, path in files.items() if path)
        for split, limit in (("train", config.max_train_samples), ("validation", config.max_eval_samples)):
            if limit and split in splits:
                splits[split] = splits[split].head(limit)
    else:
        raise LorafitError("token-classification has no built-in data; pass --train-file (a CoNLL file or a table "
                           "with tokens and tags columns), or --dataset")
    space = tagged.build_tag_space(splits["train"], config.tag_names)
    if not space.entities and config.metric in ENTITY_METRICS:
        odd = next(name for name in space.names if not tagged.is_scheme_tag(name))
        raise LorafitError(f"tags such as {odd!r} are not O or B-/I-/E-/S- plus a type, so there are no entities to "
                           f"score by --metric {config.metric}; for tagging without entities (parts of speech, ...) "
                           "pass --metric accuracy, or fix the tags")
    labels = {split: tagged.tag_ids(sentences, space, roles[split]) for split, sentences in splits.items()}
    return TokenData(splits, labels, space, description)


# --- prediction and scores ----------------------------------------------------------------------------
@torch.inference_mode()
def word_probabilities(model, examples: list[dict], collate, batch_size: int) -> tuple[list[torch.Tensor], float]:
    """Per example, the tag probabilities at each word's first piece (words x tags), and the mean loss over
    those pieces. Batches go longest first, so each pads to nearly its own length."""
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]), reverse=True)
    results: list[torch.Tensor] = [torch.empty(0)] * len(examples)
    loss_sum, count = 0.0, 0
    with eval_mode(model), fast_section(model):
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = collate([examples[i] for i in rows])
            labels = batch.pop("labels")
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
            loss_sum += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                          ignore_index=tagged.IGNORED, reduction="sum").item()
            count += int((labels != tagged.IGNORED).sum())
            for j, row in enumerate(rows):
                results[row] = logits[j][labels[j] != tagged.IGNORED].softmax(-1)
    return results, loss_sum / max(1, count)


def evaluate_tagger(model, examples: list[dict], collate, batch_size: int, space: tagged.TagSpace) -> dict:
    """Loss and word accuracy; for an entity tag set also entity precision, recall, F1 and per-type scores.
    Words cut by --max-length are not scored (as in Hugging Face's token-classification examples)."""
    probabilities, loss = word_probabilities(model, examples, collate, batch_size)
    names = space.names
    truth = [[names[label] for label in e["labels"] if label != tagged.IGNORED] for e in examples]
    guess = [[names[i] for i in p.argmax(-1).tolist()] for p in probabilities]
    scores = entity_scores(truth, guess)
    if not space.entities:
        scores = {"accuracy": scores["accuracy"]}
    rounded = {k: round(v, 6) if isinstance(v, float) else v for k, v in scores.items()}
    if "per_type" in rounded:
        rounded["per_type"] = {kind: {k: round(v, 6) if isinstance(v, float) else v for k, v in s.items()}
                               for kind, s in rounded["per_type"].items()}
    return {"loss": round(loss, 6), **rounded}


def tag_texts(model, tokenizer, texts: list[str], space: tagged.TagSpace, *, max_length: int,
              batch_size: int = 64) -> list[dict]:
    """Tag raw texts, split into words at whitespace: each word's tag and probability, and (entity tag sets)
    the entities with their character spans and scores (the mean probability of their words' tags)."""
    spans = [[m.span() for m in _WORD.finditer(text)] for text in texts]
    words = [[text[a:b] for a, b in s] or ["."] for text, s in zip(texts, spans)]  # "." stands in for no words
    sentences = tagged.TaggedSentences(words, [[0] * len(w) for w in words], [""] * len(words), "texts")
    examples = tagged.tokenize_tagged(sentences, sentences.tags, tokenizer, max_length=max_length)
    probabilities, _ = word_probabilities(model, examples, tagged.make_token_collator(tokenizer), batch_size)
    rows = []
    for text, text_spans, example, p in zip(texts, spans, examples, probabilities):
        tags, scores = ["O"] * len(text_spans), [None] * len(text_spans)  # words cut by --max-length stay O
        for word, word_p in zip(example["word_index"], p):
            if word < len(text_spans):
                tags[word], scores[word] = space.names[int(word_p.argmax())], round(float(word_p.max()), 6)
        row = {"text": text, "words": [{"word": text[a:b], "tag": tag, "score": score}
                                       for (a, b), tag, score in zip(text_spans, tags, scores)]}
        if space.entities:
            row["entities"] = [_entity(text, text_spans, scores, kind, first, last)
                               for kind, first, last in extract_entities(tags)]
        rows.append(row)
    return rows


def _entity(text: str, spans: list[tuple[int, int]], scores: list, kind: str, first: int, last: int) -> dict:
    start, end = spans[first][0], spans[last][1]
    scored = [s for s in scores[first:last + 1] if s is not None]
    return {"text": text[start:end], "type": kind, "start": start, "end": end,
            "score": round(sum(scored) / len(scored), 6) if scored else None}


def format_tagged(row: dict) -> str:
    """A tagged text for the terminal: the text, then one line per entity (type, score, span, offsets);
    without an entity scheme, each word with its tag."""
    if "entities" not in row:
        return " ".join(f"{w['word']}/{w['tag']}" for w in row["words"])
    lines = [row["text"]] + [f"  {e['type']}\t{e['score']:.4f}\t{e['text']}\t[{e['start']}:{e['end']}]"
                             for e in row["entities"]]
    return "\n".join(lines if row["entities"] else lines + ["  (no entities)"])


# --- the task -----------------------------------------------------------------------------------------
class TokenClassificationTask(Task):
    """A tagger: a token-classification head over the base model, one tag per word."""

    name = "token-classification"
    lora_task_type = "TOKEN_CLS"

    def load_data(self) -> None:
        self.data = load_token_data(self.config)
        self.description = self.data.description

    def tokenize(self, tokenizer) -> dict:
        return {split: tagged.tokenize_tagged(sentences, self.data.labels[split], tokenizer,
                                              max_length=self.config.max_length)
                for split, sentences in self.data.splits.items()}

    def describe_data(self, tokenized: dict) -> str:
        space = self.data.tags
        lines = [f"Data: {self.data.description}"]
        for split, sentences in self.data.splits.items():
            words = sum(len(tokens) for tokens in sentences.tokens)
            cut = words - sum(len(e["word_index"]) for e in tokenized[split])
            counts = Counter(kind for tags in self.data.labels[split] if space.entities
                             for kind, _, _ in extract_entities([space.names[t] for t in tags]))
            found = f", entities: {', '.join(f'{k} {n}' for k, n in sorted(counts.items()))}" if counts else ""
            note = f" ({cut} words past --max-length {self.config.max_length} are not scored)" if cut else ""
            lines.append(f"  {split}: {len(sentences)} sentences, {words} words{found}{note}")
        scheme = "entity tags" if space.entities else "tags without an entity scheme (scored by word accuracy)"
        lines.append(f"  {len(space.names)} {scheme}: {', '.join(space.names)}")
        return "\n".join(lines)

    def load_base(self, model_path: str, tokenizer):
        space = self.data.tags
        return load_classifier(model_path, num_labels=len(space.names), id2label=space.id2label,
                               label2id=space.label2id, pad_token_id=tokenizer.pad_token_id, per_token=True,
                               quantization=self.config)

    def collator(self, tokenizer):
        return tagged.make_token_collator(tokenizer)

    def loss(self, model, batch: dict) -> torch.Tensor:
        return model(**batch).loss  # cross-entropy over the labelled pieces; -100 is torch's ignore_index

    def loss_weight(self, example: dict) -> int:
        return sum(label != -100 for label in example["labels"])  # the loss is a mean over these

    def table_metric(self) -> str:
        return self.config.metric

    def evaluate(self, model, examples, collate) -> dict:
        return evaluate_tagger(model, examples, collate, self.config.eval_batch_size, self.data.tags)

    def demo(self, stage: str, model, tokenizer) -> dict:
        shown = self.data.splits.get("validation") or self.data.splits["train"]
        texts = [" ".join(tokens) for tokens in shown.tokens[:DEMO_SENTENCES]]
        title = f"Tags {stage} training"
        print(f"\n{title}:\n" + "-" * (len(title) + 1))
        for row in tag_texts(model, tokenizer, texts, self.data.tags, max_length=self.config.max_length):
            print(format_tagged(row))
        return {}

    def adapter_info(self, tokenizer) -> dict:
        config = self.config
        return {"id2label": self.data.tags.id2label, "max_length": config.max_length,
                "tokens_column": config.tokens_column, "tags_column": config.tags_column}


# --- lorafit eval and predict -------------------------------------------------------------------------
def adapter_tags(loaded) -> tagged.TagSpace:
    """A tagger adapter's tags, in class-index order."""
    id2label = loaded.model.config.id2label
    return tagged.TagSpace(tuple(id2label[i] for i in range(len(id2label))))


def evaluate_tagged_file(loaded, sentences: tagged.TaggedSentences, *, batch_size: int,
                         max_length: int | None = None) -> dict:
    """`lorafit eval` for a tagger: loss, word accuracy and (entity tags) entity scores on tagged sentences."""
    space = adapter_tags(loaded)
    labels = tagged.tag_ids(sentences, space, "evaluation")
    max_length = max_length or loaded.info.get("max_length") or DEFAULT_MAX_LENGTH["token-classification"]
    examples = tagged.tokenize_tagged(sentences, labels, loaded.tokenizer, max_length=max_length)
    metrics = evaluate_tagger(loaded.model, examples, tagged.make_token_collator(loaded.tokenizer), batch_size, space)
    metrics["sentences"] = len(examples)
    return metrics


def predict_tags(loaded, texts: list[str], batch_size: int) -> list[dict]:
    """`lorafit predict` for a tagger: one row per text (see ``tag_texts``)."""
    max_length = loaded.info.get("max_length") or DEFAULT_MAX_LENGTH["token-classification"]
    return tag_texts(loaded.model, loaded.tokenizer, texts, adapter_tags(loaded), max_length=max_length,
                     batch_size=batch_size)


def read_tagged_data(path: str, info: dict, *, tokens_column: str | None, tags_column: str | None,
                     encoding: str | None) -> tagged.TaggedSentences:
    """`lorafit eval --data` for a tagger: columns as given, else as in training."""
    return tagged.read_tagged(path, encoding=encoding, role="data file",
                              tokens_column=tokens_column or info.get("tokens_column") or "tokens",
                              tags_column=tags_column or info.get("tags_column"))

