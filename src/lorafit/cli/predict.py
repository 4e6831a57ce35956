"""Predict labels with a trained classifier or tagger adapter.

  lorafit predict --adapter runs/x/best "a wonderful film" "a waste of two hours"
  lorafit predict --adapter runs/x/best --input texts.csv --output predictions.jsonl
  lorafit predict --adapter runs/ner/best "Angela Merkel visited Paris ."

Classifiers: each prediction is the label name and the probability of every class. Taggers (token
classification): each text is split into words at whitespace (so write "Paris ." rather than
"Paris." if the training data split punctuation off); every word gets a tag and its probability,
and for entity tags the entities are printed with their type, score (the mean probability of their
words' tags), text and character offsets. --output writes JSON Lines."""

from __future__ import annotations

import argparse
import json

from lorafit.cli import add_adapter_arguments, add_dataclass_flags, settings_from_args
from lorafit.errors import LorafitError
from lorafit.inference.loading import load_adapter_for_inference
from lorafit.inference.predict import PredictSettings, pair_column_of, predict_rows, read_texts
from lorafit.files import check_output_file, write_text
from lorafit.tasks.token_classification import format_tagged
from lorafit.training.settings import QuantizeSettings

NAME = "predict"
HELP = "label texts with a trained classifier or tagger adapter"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("texts", nargs="*", help="texts to classify or tag (or use --input); a tagger splits each "
                        "into words at whitespace")
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
    if loaded.task in ("causal-lm", "seq2seq"):
        raise LorafitError(f"'{args.adapter}' is a {loaded.task} adapter; use `lorafit generate` for it")
    texts, pairs = read_texts(args.texts, args.input, settings, loaded.info.get("text_column") or "text",
                              pair_column_of(loaded, settings), args.encoding)
    rows = predict_rows(loaded, texts, pairs, settings)
    if loaded.task == "token-classification":
        return _show_tags(rows, args.output)
    if args.output:
        write_text(args.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"wrote {len(rows)} predictions to {args.output}")
    else:
        for row in rows:
            print(f"{row['label']}\t{row['probabilities'][row['label']]:.4f}\t{row['text']}")
    return 0


def _show_tags(rows: list[dict], output: str | None) -> int:
    if output:
        write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"wrote {len(rows)} tagged texts to {output}")
    else:
        print("\n".join(format_tagged(row) for row in rows))
    return 0
