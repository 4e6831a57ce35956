"""Classification batches: the queued texts of any adapters of one classifier base, in mixed-adapter
forwards of texts of near lengths.

Texts are tokenized as `lorafit predict` tokenizes them (each adapter's max_length and truncation
side from its lorafit.json) and scored with the fast paths predict uses, so the probabilities match.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorafit.data.classification import make_collator
from lorafit.fast import fast_section
from lorafit.serving.schema import Classification
from lorafit.serving.worker import Worker, log, model_failed


@dataclass
class ClassifyRequest:
    model_id: str
    adapter: str
    texts: list[str]
    handoff: object  # worker.Handoff with a future
    results: list[Classification] = field(default_factory=list)
    cancelled: bool = False


PADDING_ALLOWED = 0.25  # of a forward's tokens; past it a batch is cut into forwards of nearer lengths


def class_probabilities(served, adapters: list[str], texts: list[str]) -> torch.Tensor:
    """Softmax probabilities (rows, classes) of each text under its own adapter.

    The texts run longest first, in as few forwards as keep padding under ``PADDING_ALLOWED``: on a CPU
    a forward costs about its padded tokens, so one forward padding short texts to a long one's length
    can cost more than running them apart."""
    examples: list[dict | None] = [None] * len(texts)
    for adapter in set(adapters):
        rows = [i for i, name in enumerate(adapters) if name == adapter]
        tokenizer = served.text_tokenizers[adapter]
        encoded = tokenizer([texts[i] for i in rows], truncation=True, max_length=served.adapters[adapter].max_length)
        for j, i in enumerate(rows):
            examples[i] = {key: values[j] for key, values in encoded.items()}
    collate, model = make_collator(served.tokenizer), served.model
    probs = torch.empty(0)
    with fast_section(model):
        for rows in length_chunks([len(e["input_ids"]) for e in examples]):
            batch = collate([examples[i] for i in rows])
            logits = model(**{k: v.to(model.device) for k, v in batch.items()},
                           adapter_names=[adapters[i] for i in rows]).logits.float().cpu()
            if not probs.numel():
                probs = torch.empty(len(texts), logits.shape[-1])
            probs[torch.tensor(rows)] = logits.softmax(-1)
    return probs


def length_chunks(lengths: list[int]) -> list[list[int]]:
    """Row indices longest first, cut where a chunk's padding would pass ``PADDING_ALLOWED`` of its tokens."""
    chunks: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        width = lengths[chunks[-1][0]] if chunks else 0
        if not chunks or (len(chunks[-1]) + 1) * width > (1 + PADDING_ALLOWED) * (real + lengths[i]):
            chunks.append([])
            real = 0
        chunks[-1].append(i)
        real += lengths[i]
    return chunks


class ClassifyWorker(Worker):
    """Each pass takes whole queued requests up to ``max_batch`` texts (a larger request runs alone, in
    chunks of ``max_batch``) and scores each chunk together (``class_probabilities``)."""

    current: list[ClassifyRequest] = []  # the requests of the pass under way

    def work(self) -> None:
        rows = 0

        def fits(request: ClassifyRequest) -> bool:
            nonlocal rows
            if rows and rows + len(request.texts) > self.max_batch:
                return False
            rows += len(request.texts)
            return True

        self.current = requests = [r for r in self.take(self.max_batch, fits) if not r.cancelled]
        items = [(r, text) for r in requests for text in r.texts]
        for start in range(0, len(items), self.max_batch):
            chunk = items[start:start + self.max_batch]
            alive = {id(r) for r, _ in chunk if not r.cancelled}
            chunk = [(r, text) for r, text in chunk if id(r) in alive]
            if chunk:
                self._run(chunk)
        for request in requests:
            if not request.cancelled:
                request.handoff.settle(request.results)
        self.current = []

    def _run(self, chunk: list) -> None:
        adapters = [r.adapter for r, _ in chunk]
        try:
            probs = class_probabilities(self.served, adapters, [text for _, text in chunk])
        except Exception as error:
            log.error("lorafit serve: a forward of %s failed", self.served.id, exc_info=error)
            for request in {id(r): r for r, _ in chunk}.values():
                self.fail(request, model_failed(error))
            return
        self.observe("batch", self.served.id, "classify", len(chunk))
        for (request, _), row in zip(chunk, probs.tolist()):
            labels = self.served.adapters[request.adapter].labels
            best = max(range(len(row)), key=row.__getitem__)
            request.results.append(Classification(labels[best], dict(zip(labels, row))))

    def fail_running(self, error: BaseException) -> None:
        for request in self.current:
            if not request.cancelled:
                self.fail(request, error)
        self.current = []

    def fail(self, request: ClassifyRequest, error: BaseException) -> None:
        request.cancelled = True
        request.handoff.settle(error=error)
