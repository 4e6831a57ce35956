"""Merge an adapter into its base model and write a plain transformers model.

  lorafit merge --adapter runs/x/best --output merged-model

The result loads with AutoModelForSequenceClassification / AutoModelForTokenClassification /
AutoModelForCausalLM.from_pretrained, needs no lorafit, and runs at the base model's speed."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from lorafit.cli import add_adapter_arguments
from lorafit.errors import LorafitError
from lorafit.files import check_output_dir, replace_dir
from lorafit.inference.loading import load_adapter_for_inference

NAME = "merge"
HELP = "fold an adapter into its base model and save a plain transformers model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_adapter_arguments(parser)
    parser.add_argument("--output", required=True, help="directory to write the merged model to (new or empty)")
    parser.add_argument("--no-safe-merge", dest="safe_merge", action="store_false",
                        help="skip the check that merged weights are finite")


def run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    check_output_dir(output, "--output")
    if output.exists() and any(output.iterdir()):
        raise LorafitError(f"output directory '{output}' is not empty; pass a new --output")
    loaded = load_adapter_for_inference(args.adapter, args.model)
    if args.safe_merge:
        check_finite(loaded.model, args.adapter)
    merged = loaded.model.merge_and_unload(safe_merge=args.safe_merge)
    output.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)

    replace_dir(output, write)
    print(f"merged model written to {output}")
    return 0


def check_finite(model: nn.Module, adapter: str) -> None:
    """Safe merge checks the merged LoRA weights; this also covers the trained head and biases, in one line."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise LorafitError(f"adapter '{adapter}' holds NaN or inf ('{name.removeprefix('model.')}'), so the merged "
                               "model would be broken and nothing was written: retrain it (a lower --lr often "
                               "helps) or merge an earlier checkpoint")
