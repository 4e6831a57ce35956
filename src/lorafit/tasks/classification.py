"""Text classification: data, loss, evaluation and prediction around a LoRA-adapted classifier."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from lorafit.data import classification as text_data
from lorafit.data.sources import read_splits
from lorafit.errors import LorafitError
from lorafit.fast import fast_section
from lorafit.inference.base_models import load_classifier
from lorafit.model import LoraModel
from lorafit.tasks.task import Task, eval_mode
from lorafit.training.distributed import gather_lists, local_share
from lorafit.training.metrics import classification_report
from lorafit.training.settings import TrainConfig

# The article's six example sentences (SST-2 validation style), printed before and after training.
EXAMPLE_SENTENCES = [
    "a feel-good picture in the best sense of the term .",
    "resourceful and ingenious entertainment .",
    "it 's just incredibly dull .",
    "the movie 's biggest offense is its complete and utter lack of tension .",
    "impresses you with its open-endedness and surprises .",
    "unless you are in dire need of a diesel fix , there is no real reason to see it .",
]


@dataclass
class ClassificationData:
    splits: dict[str, "text_data.datasets.Dataset"]  # prepared: text, [text_pair], label
    labels: text_data.LabelSpace
    description: str


def load_classification_data(config: TrainConfig) -> ClassificationData:
    """Read and validate every split before anything is written; errors name the file and the fix."""
    read = read_splits(config, builtin="sentiment")
    raw, sources = read.tables, read.sources
    if config.dataset and _unlabelled(raw.get("test"), config.label_column):
        del raw["test"]  # GLUE-style hidden test labels (all -1): nothing to score it against
    roles = {"train": "training", "validation": "validation", "test": "test"}
    for split, role in roles.items():
        if split in raw and len(raw[split]) == 0:  # before the labels are read: an empty list has none
            raise LorafitError(f"{role} file '{sources[split]}' has no rows; add examples to it or pass another file")
    labels = text_data.build_label_space(raw["train"], config.label_column, source=sources["train"])
    splits = {}
    for split, role in roles.items():
        if split in raw:
            splits[split] = text_data.prepare_split(raw[split], split=role, source=sources[split],
                                               text_column=config.text_column,
                                               text_pair_column=config.text_pair_column,
                                               label_column=config.label_column, labels=labels)
    return ClassificationData(splits, labels, read.description)


def describe_data(task_data: ClassificationData, shown: int = 12) -> str:
    """What was loaded: examples and label counts per split, and the labels, so a file read wrongly
    (a shifted column, a label missing from a split) shows before any training time is spent."""
    names = task_data.labels.names
    more = f", and {len(names) - shown} more" if len(names) > shown else ""
    lines = [f"Data: {task_data.description}"]
    for split, ds in task_data.splits.items():
        counts = Counter(ds.with_format("arrow")["label"].to_pylist()) if "label" in ds.column_names else None
        per_label = f" ({', '.join(f'{name} {counts[i]}' for i, name in enumerate(names[:shown]))}{more})" if counts else ""
        lines.append(f"  {split}: {len(ds)} examples{per_label}")
    lines.append(f"  {len(names)} labels: {', '.join(names[:shown])}{more}")
    return "\n".join(lines)


def _unlabelled(split, label_column: str) -> bool:
    """A hub split whose labels are all -1 (GLUE and others hide their test labels that way)."""
    if split is None or label_column not in split.column_names or len(split) == 0:
        return False
    return all(value == -1 for value in split.with_format("arrow")[label_column].to_pylist())


def classification_loss(model, batch: dict) -> torch.Tensor:
    return model(**batch).loss


@torch.inference_mode()
def predict_logits(model, examples, collate, batch_size: int) -> tuple[torch.Tensor, float | None]:
    """Logits for every example (and the mean loss when labels are present), in input order.

    Batches are formed longest first, so each pads to nearly its own length (an evaluation set in
    file order pads short texts to their neighbours' length); the logits go back to input order.
    """
    chunks, loss_sum, count = [], 0.0, 0
    device = next(model.parameters()).device
    ids = examples["input_ids"] if hasattr(examples, "column_names") else [e["input_ids"] for e in examples]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    with eval_mode(model), fast_section(model):
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in rows]).items()}
            out = model(**batch)
            chunks.append(out.logits.float().cpu())
            if "labels" in batch:
                loss_sum += out.loss.item() * len(batch["labels"])
                count += len(batch["labels"])
    if not chunks:
        return torch.empty(0), None
    in_batch_order = torch.cat(chunks)
    logits = torch.empty_like(in_batch_order)
    logits[torch.tensor(order)] = in_batch_order
    return logits, (loss_sum / count if count else None)


def evaluate_classifier(model, examples, collate, batch_size: int, names: list[str]) -> dict:
    """Loss, accuracy, macro-F1, per-class precision/recall and the confusion matrix; with several processes
    each predicts its share and the predictions are gathered in order."""
    mine = local_share(examples)
    logits, loss = predict_logits(model, mine, collate, batch_size)
    means = gather_lists([(loss, len(mine))])
    if len(means) > 1:  # one process keeps its own mean as it is
        loss = sum(mean * n for mean, n in means if n) / max(1, sum(n for _, n in means))
    predictions = gather_lists(logits.argmax(-1).tolist() if len(mine) else [])  # a process may have none
    labels = [int(e["labels"]) for e in examples]
    report = classification_report(labels, predictions, names)
    return {"loss": round(loss, 6), **{k: round(v, 6) if isinstance(v, float) else v for k, v in report.items()}}


def predict_texts(model, tokenizer, texts: list[str], *, max_length: int, truncation_side: str = "right",
                  batch_size: int = 64, pairs: list[str] | None = None) -> torch.Tensor:
    """Class probabilities for raw texts, batched."""
    ds = text_data.datasets.Dataset.from_dict({"text": texts, **({"text_pair": pairs} if pairs else {})})
    encoded = text_data.tokenize(ds, tokenizer, max_length=max_length, truncation_side=truncation_side)
    logits, _ = predict_logits(model, encoded, text_data.make_collator(tokenizer), batch_size)
    return logits.softmax(-1)


def print_predictions(title: str, model: LoraModel, tokenizer, id2label: dict[int, str], max_length: int) -> None:
    """The article's before/after check: each example sentence with its predicted label."""
    probabilities = predict_texts(model, tokenizer, EXAMPLE_SENTENCES, max_length=max_length)
    print(f"\n{title}:\n" + "-" * (len(title) + 1))
    for text, p in zip(EXAMPLE_SENTENCES, probabilities):
        print(f"{text} - {id2label[int(p.argmax())]}")


def is_sentiment(id2label: dict[int, str]) -> bool:
    """The article's example sentences only make sense for a sentiment classifier."""
    return {name.lower() for name in id2label.values()} == {"negative", "positive"}


class ClassificationTask(Task):
    """A text (or text-pair) classifier: a sequence-classification head over the base model."""

    name = "classification"
    lora_task_type = "SEQ_CLS"

    def load_data(self) -> None:
        self.data = load_classification_data(self.config)
        self.description = self.data.description

    def tokenize(self, tokenizer) -> dict:
        return {split: text_data.tokenize(ds, tokenizer, max_length=self.config.max_length,
                                     truncation_side=self.config.truncation_side)
                for split, ds in self.data.splits.items()}

    def describe_data(self, tokenized: dict) -> str:
        return describe_data(self.data)

    def load_base(self, model_path: str, tokenizer):
        labels = self.data.labels
        return load_classifier(model_path, num_labels=len(labels.names), id2label=labels.id2label,
                               label2id=labels.label2id, pad_token_id=tokenizer.pad_token_id,
                               quantization=self.config)

    def collator(self, tokenizer):
        return text_data.make_collator(tokenizer)

    def loss(self, model, batch: dict) -> torch.Tensor:
        return classification_loss(model, batch)

    def table_metric(self) -> str:
        return self.config.metric

    def evaluate(self, model, examples, collate) -> dict:
        return evaluate_classifier(model, examples, collate, self.config.eval_batch_size, list(self.data.labels.names))

    def demo(self, stage: str, model, tokenizer) -> dict:
        if is_sentiment(self.data.labels.id2label):
            title = "Untrained model predictions" if stage == "before" else "Trained model predictions"
            print_predictions(title, model, tokenizer, self.data.labels.id2label, self.config.max_length)
        return {}

    def adapter_info(self, tokenizer) -> dict:
        config = self.config
        return {"id2label": self.data.labels.id2label, "max_length": config.max_length,
                "truncation_side": config.truncation_side, "text_column": config.text_column,
                "text_pair_column": config.text_pair_column, "label_column": config.label_column}
