"""Predict labels with a trained classifier adapter.

  lorafit predict --adapter runs/x/best "a wonderful film" "a waste of two hours"
  lorafit predict --adapter runs/x/best --input texts.csv --output predictions.jsonl

Each prediction is the label name and the probability of every class; --output writes JSON Lines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorafit.data import classification as data
from lorafit.tasks.classification import predict_texts
from lorafit.errors import LorafitError
from lorafit.fast.first_token import first_token_last_layer
from lorafit.inference.loading import add_adapter_arguments, load_adapter_for_inference
from lorafit.output_paths import check_output_file
from lorafit.serialization import atomic_path
from lorafit.training.settings import check_positive_int

NAME = "predict"
HELP = "label texts with a trained classifier adapter"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("texts", nargs="*", help="texts to classify (or use --input)")
    add_adapter_arguments(parser)
    parser.add_argument("--input", help="file of texts: CSV, TSV, JSON Lines, JSON, Parquet")
    parser.add_argument("--text-column", help="column of --input holding the texts (default: as in training, else text)")
    parser.add_argument("--text-pair-column",
                        help="column of --input holding the second texts, for an adapter trained on text pairs "
                             "(default: as in training)")
    parser.add_argument("--output", help="write JSON Lines here instead of printing")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default: 64)")
    parser.add_argument("--encoding", help="encoding of --input when not UTF-8")


def read_texts(args: argparse.Namespace, default_column: str,
               pair_column: str | None = None) -> tuple[list[str], list[str] | None]:
    """The texts to classify, and their second texts when the adapter was trained on pairs."""
    if args.texts and args.input:
        raise LorafitError("pass texts as arguments or --input FILE, not both")
    if args.texts:
        if pair_column:  # scoring the first texts alone would give confident nonsense
            raise LorafitError(f"this adapter classifies text pairs (training columns {default_column!r} and "
                               f"{pair_column!r}); pass --input FILE with both columns")
        return list(args.texts), None
    if not args.input:
        raise LorafitError("nothing to predict: pass texts as arguments or --input FILE")
    column = args.text_column or default_column
    table = data.read_table(args.input, encoding=args.encoding, role="input file")
    prepared = data.prepare_split(table, split="input", source=Path(args.input).name, text_column=column,
                                  text_pair_column=pair_column, label_column=None, labels=None)
    return list(prepared["text"]), (list(prepared["text_pair"]) if pair_column else None)


def run(args: argparse.Namespace) -> int:
    check_positive_int("batch_size", args.batch_size)
    if args.output:
        check_output_file(args.output, "--output", "predictions.jsonl", args.input, "texts")
    loaded = load_adapter_for_inference(args.adapter, args.model)
    if loaded.task != "classification":
        raise LorafitError(f"'{args.adapter}' is a {loaded.task} adapter; use `lorafit generate` for it")
    first_token_last_layer(loaded.model)
    pair_column = getattr(args, "text_pair_column", None) or loaded.info.get("text_pair_column")
    texts, pairs = read_texts(args, loaded.info.get("text_column") or "text", pair_column)
    id2label = loaded.model.config.id2label
    probabilities = predict_texts(loaded.model, loaded.tokenizer, texts,
                                  max_length=loaded.info.get("max_length", 512),
                                  truncation_side=loaded.info.get("truncation_side", "right"),
                                  batch_size=args.batch_size, pairs=pairs)
    rows = [{"text": text, **({"text_pair": pairs[i]} if pairs else {}), "label": id2label[int(p.argmax())],
             "probabilities": {id2label[k]: round(float(v), 6) for k, v in enumerate(p)}}
            for i, (text, p) in enumerate(zip(texts, probabilities))]
    if args.output:
        with atomic_path(args.output) as tmp:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {len(rows)} predictions to {args.output}")
    else:
        for row in rows:
            print(f"{row['label']}\t{row['probabilities'][row['label']]:.4f}\t{row['text']}")
    return 0
