"""What a task gives the one training pipeline (pipeline.py): its data, model head, loss, evaluation and demo.

A new task is a subclass of ``Task`` in its own module, registered in ``pipeline.TASKS``; the model
and tokenizer, run folder, LoRA config, seed, table, training loop, best adapter and card are the
pipeline's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from lorafit.training.settings import TrainConfig


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode (no dropout) for the block, then back in the mode it had: evaluation
    runs in the middle of training, which must go on in train mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class Task:
    """The hooks of one task; one instance serves one run (``config`` already resolved)."""

    name: ClassVar[str]  # --task, and the task named in lorafit.json and the model card
    lora_task_type: ClassVar[str]  # PEFT's task_type in adapter_config.json
    counts_tokens: ClassVar[bool] = False  # quote training speed in tokens too (an LM sample's size varies a lot)

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.description = ""  # where the data came from, for the model card; set by load_data

    def load_data(self) -> None:
        """Read and check every split, before anything is loaded or written."""
        raise NotImplementedError

    def tokenize(self, tokenizer) -> dict[str, Any]:
        """Examples per split ("train", and "validation"/"test" when given), ready for ``collator``."""
        raise NotImplementedError

    def describe_data(self, tokenized: dict[str, Any]) -> str:
        """The data summary printed before training, so a file read wrongly shows at once."""
        raise NotImplementedError

    def load_base(self, model_path: str, tokenizer) -> torch.nn.Module:
        """The base model with this task's head."""
        raise NotImplementedError

    def collator(self, tokenizer) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def loss_weight(self, example: dict) -> int:
        """An example's weight in its batch's mean loss (1: a mean over examples), by which the training loop
        splits a batch over processes and micro-batches without changing its loss."""
        return 1

    def table_metric(self) -> str:
        """The metric in the table's last column and in the curves."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, examples, collate) -> dict:
        """Metrics on one split; the table shows ``loss`` and ``table_metric()``, the summary every number."""
        raise NotImplementedError

    def demo(self, stage: str, model: torch.nn.Module, tokenizer) -> dict:
        """What the task shows before and after training (``stage``: "before" or "after"); returns the
        figures it measured, which go first in the summary."""
        return {}

    def adapter_info(self, tokenizer) -> dict:
        """What lorafit.json records beyond the task and base model, for predict, eval and generate."""
        raise NotImplementedError
