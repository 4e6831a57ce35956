"""Predict labels with a trained classifier adapter.

  lorafit predict --adapter runs/x/best "a wonderful film" "a waste of two hours"
  lorafit predict --adapter runs/x/best --input texts.csv --output predictions.jsonl

Each prediction is the label name and the probability of every class; --output writes JSON Lines."""

from __future__ import annotations

import argparse
import json

from lorafit.cli import add_adapter_arguments, add_dataclass_flags, settings_from_args
from lorafit.errors import LorafitError
from lorafit.inference.loading import load_adapter_for_inference
from lorafit.inference.predict import PredictSettings, pair_column_of, predict_rows, read_texts
from lorafit.files import check_output_file, write_text
from lorafit.training.settings import QuantizeSettings

NAME = "predict"
HELP = "label texts with a trained classifier adapter"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("texts", nargs="*", help="texts to classify (or use --input)")
    add_adapter_arguments(parser)
    parser.add_argument("--input", help="file of texts: CSV, TSV, JSON Lines, JSON, Parquet")
    parser.add_argument("--output", help="write JSON Lines here instead of printing")
    add_dataclass_flags(parser, PredictSettings)
    add_dataclass_flags(parser, QuantizeSettings)
    parser.add_argument("--encoding", help="encoding of --input when not UTF-8")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, PredictSettings)
    if args.output:
        check_output_file(args.output, "--output", "predictions.jsonl", args.input, "texts")
    loaded = load_adapter_for_inference(args.adapter, args.model,
                                        quantization=settings_from_args(args, QuantizeSettings))
    if loaded.task != "classification":
        raise LorafitError(f"'{args.adapter}' is a {loaded.task} adapter; use `lorafit generate` for it")
    texts, pairs = read_texts(args.texts, args.input, settings, loaded.info.get("text_column") or "text",
                              pair_column_of(loaded, settings), args.encoding)
    rows = predict_rows(loaded, texts, pairs, settings)
    if args.output:
        write_text(args.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"wrote {len(rows)} predictions to {args.output}")
    else:
        for row in rows:
            print(f"{row['label']}\t{row['probabilities'][row['label']]:.4f}\t{row['text']}")
    return 0
