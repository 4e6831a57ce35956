"""Merge an adapter into its base model, or combine several adapters into a new one.

  lorafit merge --adapter runs/x/best --output merged-model
  lorafit merge --adapter runs/a/best --adapter runs/b/best --weights 0.6 0.4 --combination ties \\
      --density 0.5 --output combined-adapter

One --adapter (and no combination flags) writes a plain transformers model: it loads with
AutoModelForSequenceClassification / AutoModelForTokenClassification / AutoModelForCausalLM.from_pretrained,
needs no lorafit, and runs at the base model's speed. Several (or --weights / --combination) write a new
adapter folder in PEFT's format, their weighted combination as PEFT's add_weighted_adapter makes it, which
`lorafit generate` and PEFT load; --merge-into-base writes that combination merged into a plain model
instead. The adapters are named adapter1, adapter2, ... in the order given."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from torch import nn

from lorafit.cli import add_dataclass_flags, settings_from_args
from lorafit.errors import LorafitError
from lorafit.files import check_output_dir, replace_dir
from lorafit.inference.combine import CombineSettings, load_combined
from lorafit.inference.loading import LoadedAdapter, load_adapter_for_inference
from lorafit.inference.adapter_info import save_adapter_info
from lorafit.quantized import quantized_formats
from lorafit.training.settings import QuantizeSettings

NAME = "merge"
HELP = "fold an adapter into its base model, or combine several adapters into a new one"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", action="append", required=True, metavar="DIR",
                        help="adapter directory (a run's best/ folder); repeat it to combine several adapters")
    parser.add_argument("--model", help="base model, if not the one the adapter was trained on")
    parser.add_argument("--output", required=True,
                        help="directory to write to (new or empty): the merged model, or the combined adapter")
    parser.add_argument("--no-safe-merge", dest="safe_merge", action="store_false",
                        help="skip the check that merged (or combined) weights are finite")
    add_dataclass_flags(parser, CombineSettings)
    add_dataclass_flags(parser, QuantizeSettings)


def run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    check_output_dir(output, "--output")
    if output.exists() and any(output.iterdir()):
        raise LorafitError(f"output directory '{output}' is not empty; pass a new --output")
    settings = settings_from_args(args, CombineSettings)
    combining = len(args.adapter) > 1 or any(
        hasattr(args, f.name) for f in dataclasses.fields(CombineSettings) if f.name != "merge_into_base")
    label = ", ".join(args.adapter)
    if combining:
        loaded = load_combined(args.adapter, settings, args.model)
    else:
        loaded = load_adapter_for_inference(args.adapter[0], args.model,
                                            quantization=settings_from_args(args, QuantizeSettings))
    if args.safe_merge:
        check_finite(loaded.model, label)
    output.parent.mkdir(parents=True, exist_ok=True)
    if combining and not settings.merge_into_base:
        replace_dir(output, lambda tmp: write_adapter(loaded, tmp, args.model))
        print(f"combined adapter ({settings.combination} of {len(args.adapter)}) written to {output}")
        return 0
    formats = quantized_formats(loaded.model)
    merged = loaded.model.merge_and_unload(safe_merge=args.safe_merge)
    if formats:
        print(f"the base model was quantized ({', '.join(formats)}): merged in fp32 into its de-quantized weights, so "
              "the merged model is fp32 and keeps the quantization's rounding (--quantize none merges into the "
              "unquantized base instead)")

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)

    replace_dir(output, write)
    print(f"merged model written to {output}")
    return 0


def write_adapter(loaded: LoadedAdapter, directory: Path, model: str | None) -> None:
    """The combined adapter as a run's best/ folder holds one: PEFT's files, lorafit's info and the tokenizer."""
    loaded.model.save_pretrained(directory)
    base = {"base_model": model} if model else {}  # the base it was combined on, as --model named it
    save_adapter_info(directory, {**loaded.info, "task": loaded.task, **base})
    loaded.tokenizer.save_pretrained(directory / "tokenizer")


def check_finite(model: nn.Module, adapter: str) -> None:
    """Safe merge checks the merged LoRA weights; this also covers the trained head and biases, in one line."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise LorafitError(f"adapter '{adapter}' holds NaN or inf ('{name.removeprefix('model.')}'), so the merged "
                               "model would be broken and nothing was written: retrain it (a lower --lr often "
                               "helps) or merge an earlier checkpoint")
