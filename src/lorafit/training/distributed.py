"""Several processes (`accelerate launch`, `torchrun`): each one's share of the work, and the results put together.

A run's steps, metrics and weights must not depend on how many processes share it: every process
builds the same batches, takes a contiguous share of each, and evaluation shares are gathered back
in order. One process (no process group) is the plain case: its share is everything.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from lorafit.errors import LorafitError, first_line

T = TypeVar("T")


def start_processes() -> None:
    """Join the process group when started by `accelerate launch` or `torchrun` (accelerate reads the
    environment they set); alone, nothing to do. Before the run folder is prepared, which needs it."""
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized()


def process_count() -> int:
    return dist.get_world_size() if _grouped() else 1


def process_index() -> int:
    return dist.get_rank() if _grouped() else 0


def is_main_process() -> bool:
    return process_index() == 0


def share(count: int, index: int | None = None, parts: int | None = None) -> range:
    """Process ``index``'s contiguous share of ``count`` items: shares differ by at most one item, the
    first ones larger, and in process order they are the items in order."""
    index = process_index() if index is None else index
    parts = process_count() if parts is None else parts
    size, extra = divmod(count, parts)
    start = index * size + min(index, extra)
    return range(start, start + size + (index < extra))


def local_share(examples: Sequence[T]) -> Sequence[T]:
    """This process's share of an evaluation set (a list or a `datasets` Dataset); all of it when alone."""
    if process_count() == 1:
        return examples
    rows = share(len(examples))
    return examples.select(rows) if hasattr(examples, "select") else [examples[i] for i in rows]


def gather_lists(local: list) -> list:
    """Every process's list, concatenated in process order; the same list on every process.

    Shares are exact (no process pads its share with repeated examples, as a prepared DataLoader
    does), so nothing needs dropping, unlike accelerate's gather_for_metrics, which trims by the
    state of the training loader that is active at the time."""
    if process_count() == 1:
        return list(local)
    parts: list = [None] * process_count()
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in part]


def on_main_process(write: Callable[[], object]) -> None:
    """Run ``write`` on the main process only; the others wait for it and fail with its error, so that a
    refusal or a failed write stops every process instead of leaving them waiting for each other."""
    error = None
    try:
        if is_main_process():
            write()
    except Exception as err:
        error = err
    if process_count() > 1:
        message = [None if error is None else first_line(error) or type(error).__name__]
        dist.broadcast_object_list(message, src=0)
        if error is None and message[0] is not None:
            raise LorafitError(message[0])
    if error is not None:
        raise error
