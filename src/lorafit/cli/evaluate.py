"""Evaluate an adapter on a labelled file.

  lorafit eval --adapter runs/x/best --data test.csv

Classifiers: accuracy, macro-F1, per-class precision/recall and the confusion matrix.
Causal LMs: loss and perplexity on the response tokens."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorafit.data import classification as data
from lorafit.tasks.classification import evaluate_classifier
from lorafit.fast.first_token import first_token_last_layer
from lorafit.inference.loading import add_adapter_arguments, load_adapter_for_inference
from lorafit.training.metrics import format_report
from lorafit.training.settings import DEFAULT_MAX_LENGTH, check_positive_int

NAME = "eval"
HELP = "score an adapter on a labelled data file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_adapter_arguments(parser)
    parser.add_argument("--data", required=True, help="labelled file: CSV, TSV, JSON Lines, JSON, Parquet")
    parser.add_argument("--text-column", help="text column (default: as in training)")
    parser.add_argument("--text-pair-column", help="second text column (default: as in training)")
    parser.add_argument("--label-column", help="label column (default: as in training)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per forward pass (default: 64)")
    parser.add_argument("--max-length", type=int, help="longest input in tokens (default: as in training)")
    parser.add_argument("--encoding", help="encoding of --data when not UTF-8")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args: argparse.Namespace) -> int:
    check_positive_int("batch_size", args.batch_size)
    if args.max_length is not None:  # 0 would otherwise read as "not given"
        check_positive_int("max_length", args.max_length)
    table = data.read_table(args.data, encoding=args.encoding, role="data file")
    loaded = load_adapter_for_inference(args.adapter, args.model)
    if loaded.task == "causal-lm":
        from lorafit.tasks.causal_lm import evaluate_causal_file

        metrics = evaluate_causal_file(loaded, table, args)
    else:
        first_token_last_layer(loaded.model)
        metrics = _evaluate_classifier(loaded, table, args)
    print(json.dumps(metrics, indent=2) if args.json else metrics.pop("_text"))
    return 0


def _evaluate_classifier(loaded, table, args) -> dict:
    info, config = loaded.info, loaded.model.config
    id2label = config.id2label
    labels = data.LabelSpace(tuple(id2label[i] for i in range(len(id2label))))
    prepared = data.prepare_split(
        table, split="evaluation", source=Path(args.data).name,
        text_column=args.text_column or info.get("text_column", "text"),
        text_pair_column=args.text_pair_column or info.get("text_pair_column"),
        label_column=args.label_column or info.get("label_column", "label"), labels=labels)
    max_length = args.max_length or info.get("max_length") or DEFAULT_MAX_LENGTH["classification"]
    encoded = data.tokenize(prepared, loaded.tokenizer, max_length=max_length,
                            truncation_side=info.get("truncation_side", "right"))
    metrics = evaluate_classifier(loaded.model, encoded, data.make_collator(loaded.tokenizer), args.batch_size,
                                  list(labels.names))
    if not args.json:
        metrics["_text"] = f"loss {metrics['loss']:.4f}   " + format_report(metrics, list(labels.names))
    return metrics
