"""\
Fine-tune a model with LoRA and write a run folder: config.yaml, metrics.jsonl, curves.png,
checkpoint-<step>/ (resumable), best/ (the adapter with the best validation score) and README.md.

With no arguments it trains the built-in classifier (all-MiniLM-L6-v2 on lorafit's sentiment set)
offline in a few minutes. Examples:

  lorafit train
  lorafit train --train-file train.csv --validation-file dev.csv --text-column review --epochs 5
  lorafit train --model roberta-base --dataset glue --dataset-config sst2 --text-column sentence \\
                --r 4 --lora-alpha 32 --lora-dropout 0.01 --target-modules query --epochs 5
  lorafit train --task causal-lm --train-file chats.jsonl --target-modules all-linear
  lorafit train --config run.yaml --lr 5e-4
  lorafit train --output-dir runs/a --resume         # continue a killed run"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorafit.cli import add_dataclass_flags
from lorafit.training.settings import TrainConfig

NAME = "train"
HELP = "fine-tune a model with LoRA"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="read settings from a YAML file; flags given here override it")
    add_dataclass_flags(parser, TrainConfig)


def run(args: argparse.Namespace) -> int:
    from lorafit.tasks.pipeline import run_train
    from lorafit.files import check_output_dir
    from lorafit.training.run_dir import saved_config
    from lorafit.training.settings import build_config, load_yaml_config

    settings = load_yaml_config(args.config) if args.config else {}
    settings.update({k: v for k, v in vars(args).items() if k not in ("config", "command", "run")})
    output_dir = settings.get("output_dir")
    saved = saved_config(Path(output_dir)) if isinstance(output_dir, str) and output_dir.strip() else None
    if settings.get("resume") is True and saved:
        # `--output-dir DIR --resume` continues the run as it was set up; settings given now override.
        # A config.yaml lorafit did not write is left to prepare_run_dir, which names the folder as not ours.
        settings = {**saved, **settings}
    config = build_config(settings)
    if config.output_dir:
        check_output_dir(config.output_dir, "--output-dir")
    run_train(config)
    return 0


