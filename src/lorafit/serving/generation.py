"""Continuous batching for generation: requests join and leave one running batch between decoding steps.

The running batch is one KV cache for all its rows, left-padded along the sequence axis, with an
attention mask and each row's own position ids, so a row computes what it would compute alone:

    cache keys/values  (B, heads, T, head_dim)   row i's real tokens are its last mask[i].sum() columns
    mask               (B, T)                    0 over each row's left padding
    positions          one per row: the position id of the row's next input token

New requests are prefilled together (left-padded, on a fresh cache), then their cache is merged in:
both caches are left-padded to the longer length and stacked along the batch axis. Finished rows
are dropped, and columns that are padding in every remaining row are trimmed away.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lorafit.errors import LorafitError
from lorafit.serving.decoding import TextStream
from lorafit.serving.schema import TextDelta
from lorafit.serving.worker import Worker, log, model_failed


@dataclass
class GenerateRequest:
    """One generation request as the worker sees it."""

    model_id: str
    adapter: str  # adapter name, or "__base__"
    prompt_ids: list[int]
    max_tokens: int
    sample: object  # decoding.sampler(...)
    text: TextStream
    stop_ids: frozenset[int]
    handoff: object  # worker.Handoff: delivers deltas to the caller's event loop
    completion_tokens: int = 0
    cancelled: bool = False  # set by the caller's side (client gone); the worker drops the row
    counted: bool = False  # its token counts went to the observer

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclass
class Row:
    request: GenerateRequest
    position: int  # position id of the next input token
    next_token: int


@dataclass
class RunningBatch:
    """The rows being decoded and the tensors they share (see the module docstring)."""

    model: object  # LoraModel
    pad_id: int
    rows: list[Row] = field(default_factory=list)
    cache: object = None
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.device = self.model.device
        base = self.model.get_base_model()
        self._config = base.config
        self._last_only = ({"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters
                           else {})

    def __len__(self) -> int:
        return len(self.rows)

    def prefill(self, requests: list[GenerateRequest]) -> tuple[torch.Tensor, object, torch.Tensor]:
        """Run the new prompts together on a fresh cache: (last-position logits (n, vocab), cache, mask)."""
        from transformers import DynamicCache

        longest = max(r.prompt_tokens for r in requests)
        ids = torch.tensor([[self.pad_id] * (longest - r.prompt_tokens) + r.prompt_ids for r in requests],
                           device=self.device)
        mask = torch.tensor([[0] * (longest - r.prompt_tokens) + [1] * r.prompt_tokens for r in requests],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self._config)
        logits = self._forward(ids, mask, positions, cache, [r.adapter for r in requests])
        return logits, cache, mask

    def add(self, requests: list[GenerateRequest], tokens: list[int], cache, mask: torch.Tensor) -> None:
        """Merge prefilled requests (with their first generated token) into the running batch."""
        new_rows = [Row(r, r.prompt_tokens, t) for r, t in zip(requests, tokens)]
        if not self.rows:
            self.rows, self.cache, self.mask = new_rows, cache, mask
            return
        length = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, length, 2), _pad_left(theirs.keys, length, 2)])
            mine.values = torch.cat([_pad_left(mine.values, length, 2), _pad_left(theirs.values, length, 2)])
        self.mask = torch.cat([_pad_left(self.mask, length, 1), _pad_left(mask, length, 1)])
        self.rows += new_rows

    def step(self) -> torch.Tensor:
        """One decoding step for every row: feeds each row's next token, returns logits (B, vocab)."""
        ids = torch.tensor([[row.next_token] for row in self.rows], device=self.device)
        positions = torch.tensor([[row.position] for row in self.rows], device=self.device)
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        logits = self._forward(ids, mask, positions, self.cache, [row.request.adapter for row in self.rows])
        self.mask = mask
        for row in self.rows:
            row.position += 1
        return logits

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (in this order), then trim the columns that are padding in all of them."""
        if len(indices) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in indices]
        if not self.rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(indices, device=self.device)
        mask = self.mask[index]
        start = int(mask.any(0).long().argmax())  # first column some row attends to
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    def clear(self) -> None:
        self.rows, self.cache, self.mask = [], None, None

    def _forward(self, ids, mask, positions, cache, adapters: list[str]) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                         adapter_names=adapters, **self._last_only)
        if getattr(out, "cache", None) is not cache:
            raise LorafitError("the model did not fill the cache it was given; lorafit serve needs a transformers "
                               "model that takes a cache= argument (transformers 5)")
        return out.logits[:, -1, :]


class GenerationWorker(Worker):
    """Continuous batching: each pass admits queued requests into free rows, then decodes one token for all."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batch = RunningBatch(self.served.model, self.served.pad_id)

    def work(self) -> None:
        self.batch.keep([i for i, row in enumerate(self.batch.rows) if not self._dropped(row.request)])
        new = self.take(self.max_batch - len(self.batch))
        if new:
            self._admit(new)
        if self.batch.rows:
            self._step()

    def _admit(self, requests: list[GenerateRequest]) -> None:
        try:
            logits, cache, mask = self.batch.prefill(requests)
        except Exception as error:  # the running rows are untouched: the new ones had their own cache
            self._fail_all(requests, error)
            return
        self.observe("batch", self.served.id, "prefill", len(requests))
        start = len(self.batch)
        tokens = [self._choose(r, row_logits) for r, row_logits in zip(requests, logits)]
        self.batch.add(requests, [t if t is not None else self.served.pad_id for t in tokens], cache, mask)
        done = {start + i for i, (r, t) in enumerate(zip(requests, tokens)) if t is None or self._advance(r, t)}
        self.batch.keep([i for i in range(len(self.batch)) if i not in done])

    def _step(self) -> None:
        try:
            logits = self.batch.step()
        except Exception as error:
            self._fail_all([row.request for row in self.batch.rows], error)
            self.batch.clear()
            return
        self.observe("batch", self.served.id, "decode", len(self.batch))
        keep = []
        for i, (row, row_logits) in enumerate(zip(self.batch.rows, logits)):
            token = self._choose(row.request, row_logits)
            if token is not None and not self._advance(row.request, token):
                row.next_token = token
                keep.append(i)
        self.batch.keep(keep)

    def _choose(self, request: GenerateRequest, logits: torch.Tensor) -> int | None:
        """The request's next token, or None (the request failed) if its sampler raised."""
        try:
            return request.sample(logits)
        except Exception as error:
            self.fail(request, model_failed(error))
            return None

    def _advance(self, request: GenerateRequest, token: int) -> bool:
        """Hand the token's text to the caller; True when the request is finished (or gone)."""
        if self._dropped(request):
            return True
        request.completion_tokens += 1
        reason = None
        if token in request.stop_ids:
            text, reason = request.text.finish(), "stop"
        else:
            text = request.text.add(token)
            if request.text.stopped:
                reason = "stop"
            elif request.completion_tokens >= request.max_tokens:
                text, reason = text + request.text.finish(), "length"
        if text or reason:
            request.handoff.put(TextDelta(text, reason, request.prompt_tokens, request.completion_tokens))
        if reason:
            self.observe("tokens", request.model_id, request.prompt_tokens, request.completion_tokens)
        return reason is not None

    def _dropped(self, request: GenerateRequest) -> bool:
        """A cancelled request leaves the batch; its tokens so far still count."""
        if request.cancelled and not request.counted:
            request.counted = True
            self.observe("tokens", request.model_id, request.prompt_tokens, request.completion_tokens)
        return request.cancelled

    def _fail_all(self, requests: list[GenerateRequest], error: BaseException) -> None:
        log.error("lorafit serve: a forward of %s failed", self.served.id, exc_info=error)
        for request in requests:
            self.fail(request, model_failed(error))

    def busy(self) -> bool:
        return bool(self.batch.rows)

    def running_uses(self, adapter: str) -> bool:
        return any(row.request.adapter == adapter for row in self.batch.rows)

    def fail_running(self, error: BaseException) -> None:
        for row in self.batch.rows:
            self.fail(row.request, error)
        self.batch.clear()

    def fail(self, request: GenerateRequest, error: BaseException) -> None:
        request.cancelled = True  # a failed request leaves the batch
        request.counted = True
        request.handoff.put(error)


def _pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zeros before the existing entries along ``dim``, up to ``length`` (zeros are padding: masked out)."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - dim - 1) + [missing, 0]
    return F.pad(tensor, pad)
