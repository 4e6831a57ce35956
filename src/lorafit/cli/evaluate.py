"""Evaluate an adapter on a labelled file.

  lorafit eval --adapter runs/x/best --data test.csv

Classifiers: accuracy, macro-F1, per-class precision/recall and the confusion matrix.
Causal LMs: loss and perplexity on the response tokens.
Taggers (token classification): entity precision, recall and F1 as seqeval computes them, per entity
type, and word accuracy; --data may also be a CoNLL file (.conll, .txt, .iob, .bio, .bioes)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorafit.cli import add_adapter_arguments, add_dataclass_flags, settings_from_args
from lorafit.inference.evaluate import EvalSettings, evaluate_adapter, label_space, read_eval_data
from lorafit.inference.loading import load_adapter_for_inference
from lorafit.training.entities import format_entity_report
from lorafit.training.metrics import format_report
from lorafit.training.settings import QuantizeSettings

NAME = "eval"
HELP = "score an adapter on a labelled data file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_adapter_arguments(parser)
    parser.add_argument("--data", required=True, help="labelled file: CSV, TSV, JSON Lines, JSON, Parquet; for a "
                        "token-classification adapter also CoNLL (.conll, .txt, .iob, .bio, .bioes)")
    add_dataclass_flags(parser, EvalSettings)
    add_dataclass_flags(parser, QuantizeSettings)
    parser.add_argument("--encoding", help="encoding of --data when not UTF-8")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, EvalSettings)
    table = read_eval_data(args.adapter, args.data, settings, args.encoding)
    loaded = load_adapter_for_inference(args.adapter, args.model,
                                        quantization=settings_from_args(args, QuantizeSettings))
    metrics = evaluate_adapter(loaded, table, settings, source=Path(args.data).name)
    print(json.dumps(metrics, indent=2) if args.json else describe(metrics, loaded))
    return 0


def describe(metrics: dict, loaded) -> str:
    """The metrics as the terminal shows them."""
    if loaded.task in ("causal-lm", "seq2seq"):
        tokens = "response" if loaded.task == "causal-lm" else "target"
        return (f"loss {metrics['loss']:.4f}   perplexity {metrics['perplexity']:.2f}   "
                f"({metrics['tokens']} {tokens} tokens in {metrics['examples']} examples)")
    if loaded.task == "token-classification":
        return f"loss {metrics['loss']:.4f}   " + format_entity_report(metrics)
    return f"loss {metrics['loss']:.4f}   " + format_report(metrics, list(label_space(loaded).names))
