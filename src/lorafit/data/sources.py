"""Where a run's data comes from: a hub dataset, local files or a built-in set, read into named splits.

Every task reads its splits here, so the choice of source, its checks and their messages exist once;
the task then checks the shape of the records it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
from datasets.exceptions import DatasetNotFoundError

from lorafit.data.readers import read_table
from lorafit.errors import LorafitError

if TYPE_CHECKING:
    from lorafit.training.settings import TrainConfig

SPLITS = ("train", "validation", "test")
# folder under lorafit/builtin_data -> (what its data is called in messages, how a run describes it)
BUILTIN_SETS = {
    "sentiment": ("sentiment", "lorafit's built-in sentiment set"),
    "instruct": ("instruction", "lorafit's built-in instruction set (to-do items from requests)"),
}


@dataclass
class RawSplits:
    tables: dict[str, datasets.Dataset]  # by split name, as read
    sources: dict[str, str]  # by split name: the file or dataset it came from, for error messages
    description: str  # for the data summary and the model card


def read_splits(config: TrainConfig, builtin: str) -> RawSplits:
    """The run's splits from --dataset, --train-file (+ validation/test files) or the built-in set,
    cut to --max-train-samples / --max-eval-samples."""
    if config.dataset:
        tables = load_hub_dataset(config.dataset, config.dataset_config)
        sources = {split: f"{config.dataset}/{split}" for split in tables}
        description = f"hub dataset `{config.dataset}`" + (f" (`{config.dataset_config}`)" if config.dataset_config else "")
    elif config.train_file:
        files = {"train": config.train_file, "validation": config.validation_file, "test": config.test_file}
        tables = {split: read_table(path, encoding=config.encoding, role=f"{split} file")
                  for split, path in files.items() if path}
        sources = {split: Path(path).name for split, path in files.items() if path}
        description = ", ".join(f"{split}: `{path}`" for split, path in files.items() if path)
    else:
        if config.validation_file or config.test_file:
            raise LorafitError("--validation-file and --test-file need --train-file too")
        tables = load_builtin(builtin)
        sources = {split: f"built-in {split}.jsonl" for split in tables}
        description = BUILTIN_SETS[builtin][1]
    if "train" not in tables:
        raise LorafitError(f"no training split found (splits: {', '.join(tables)}); pass --train-file")
    for split, limit in (("train", config.max_train_samples), ("validation", config.max_eval_samples)):
        if limit and split in tables:
            tables[split] = tables[split].select(range(min(limit, len(tables[split]))))
    return RawSplits(tables, sources, description)


def _builtin_folder(name: str):
    """Where a shipped quickstart set lives inside the installed package."""
    return resources.files("lorafit") / "builtin_data" / name


def load_builtin(name: str) -> dict[str, datasets.Dataset]:
    """A shipped quickstart set ("sentiment" or "instruct") as {"train": ..., "validation": ...}."""
    splits = {}
    for split in ("train", "validation"):
        resource = _builtin_folder(name) / f"{split}.jsonl"
        if not resource.is_file():
            raise LorafitError(f"the built-in {BUILTIN_SETS[name][0]} data is missing from this installation "
                               f"({resource}); reinstall lorafit or pass --train-file")
        with resources.as_file(resource) as file:
            splits[split] = read_table(file)
    return splits


def load_hub_dataset(name: str, config: str | None) -> dict[str, datasets.Dataset]:
    """Download a dataset from the Hugging Face hub and return its splits by name."""
    try:
        loaded = datasets.load_dataset(name, config)
    except DatasetNotFoundError:
        raise LorafitError(f"dataset '{name}' was not found on the Hugging Face hub (or needs a login); "
                           "check the name, or pass --train-file with a local file") from None
    except (ConnectionError, TimeoutError) as exc:
        raise LorafitError(f"the Hugging Face hub is unreachable ({exc}); pass --train-file with a local file "
                           "instead") from None
    except ValueError as exc:
        if "config" not in str(exc).lower():
            raise
        detail = " ".join(str(exc).split("\n")[:2])
        raise LorafitError(f"dataset '{name}' cannot be loaded with config {config!r} ({detail}); "
                           "pass one of its config names") from None
    return dict(loaded)
