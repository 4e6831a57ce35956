"""The values the engine takes and gives (re-exported by ``serving.engine``, where the app imports them)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from lorafit.serving.errors import BadRequest

MAX_STOP_STRINGS = 16
BASE_ROUTE = "__base__"  # the adapter name that runs a row on the base model alone (layers.BASE_ADAPTER)


@dataclass
class SamplingParams:
    """How one reply is decoded: greedy at temperature 0, else sampled from the request's own seeded generator."""

    max_tokens: int
    """Most tokens generated."""
    temperature: float = 0.0
    """0 decodes greedily; above 0 samples."""
    top_p: float = 1.0
    """Sample from the likeliest tokens holding this probability."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the reply; the matched one is not returned."""
    seed: int | None = None
    """Seed of the request's generator, for reproducible sampling."""

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise BadRequest(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not _number(self.temperature) or self.temperature < 0:
            raise BadRequest(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise BadRequest(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise BadRequest("stop must be a string or a list of non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise BadRequest(f"stop has {len(self.stop)} strings; pass at most {MAX_STOP_STRINGS}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2 ** 63):
            raise BadRequest(f"seed must be an integer from 0 to {2 ** 63 - 1}, got {self.seed!r}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ModelEntry:
    """A served base model or adapter, as /v1/models lists it."""

    id: str
    kind: str  # "causal-lm" | "classification"
    parent: str | None  # the base an adapter runs on; None for a base
    root: str  # the folder or model name it came from
    created: int  # unix seconds
    context_length: int | None
    labels: list[str] | None  # a classifier adapter's class names, in class order


@dataclass(frozen=True)
class TextDelta:
    """What a generation produced since the previous delta."""

    text: str
    finish_reason: str | None  # None until the last delta: "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Classification:
    label: str
    probs: dict[str, float]


class Observer(Protocol):
    """Metrics hooks the app implements; called from the workers' threads, so they must be thread-safe."""

    def batch(self, base: str, kind: str, size: int) -> None: ...

    def queue_depth(self, base: str, depth: int) -> None: ...

    def tokens(self, model_id: str, prompt: int, completion: int) -> None: ...
