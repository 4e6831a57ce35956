"""The serving engine: every served model by name, one worker thread per loaded base model, and the
async entry points the HTTP app calls (generate, classify, load/unload, shutdown).

Requests naming any adapter of one base (or the base itself, run as ``"__base__"``) go to that base's
worker, which batches them together (generation.py, classify.py). Everything blocking runs on the
workers' threads or ``asyncio.to_thread``; the async methods are safe to call from the app's loop.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import AsyncIterator

from lorafit.errors import LorafitError, first_line
from lorafit.inference.generate import GenerationSettings, check_context, encode_prompt
from lorafit.serving.classify import ClassifyRequest, ClassifyWorker
from lorafit.serving.decoding import TextStream, sampler
from lorafit.serving.errors import (AdapterLoadError, BadRequest, ContextTooLong, ShuttingDown, UnknownModel,
                                    WrongTask)
from lorafit.serving.generation import GenerateRequest, GenerationWorker
from lorafit.serving.registry import (CAUSAL, CLASSIFICATION, AdapterSpec, ServedBase, base_key, load_base,
                                      read_adapter_spec)
from lorafit.serving.schema import (BASE_ROUTE, Classification, ModelEntry, Observer, SamplingParams,
                                    TextDelta)
from lorafit.serving.worker import Control, Handoff, Worker

__all__ = ["Engine", "SamplingParams", "ModelEntry", "TextDelta", "Classification", "Observer"]


class Engine:
    """Served models by name: add_* before start(), then the app calls the async methods from its loop."""

    def __init__(self, max_batch: int = 8, max_queue: int = 256, observer: Observer | None = None,
                 device: str | None = None) -> None:
        if max_batch < 1 or max_queue < 0:
            raise LorafitError(f"max_batch must be at least 1 and max_queue at least 0, got {max_batch} and "
                               f"{max_queue}")
        self.max_batch, self.max_queue, self.observer, self.device = max_batch, max_queue, observer, device
        self._workers: dict[tuple, Worker] = {}
        self._routes: dict[str, tuple[tuple, str]] = {}  # model id -> (base key, adapter name or "__base__")
        self._lock = threading.Lock()  # guards _routes and _workers against add_* from other threads
        self._loading: asyncio.Lock | None = None
        self._started = False
        self._closing = False

    # --- building the served set (blocking, before start) --------------------------------------------
    def add_adapter(self, name: str, path: str | Path, model: str | None = None) -> ModelEntry:
        """Load an adapter (and its base model, the first time that base is needed)."""
        if self._started:
            raise RuntimeError("the engine is running: add adapters with `await engine.load_adapter(...)`")
        self._check_free(name)
        spec = _read_spec(name, path, model)
        worker = self._workers.get(spec.key)
        if worker is None:
            self._register(self._load_with_new_base(spec))
        else:
            _load_into(worker.served, spec)
        self._route(name, spec.key, name)
        return self._workers[spec.key].served.adapter_entry(name)

    def add_base(self, name: str) -> ModelEntry:
        """Serve a causal-LM base model alone (its adapters, if any, share it)."""
        if self._started:
            raise RuntimeError("the engine is running: add base models before start()")
        key = base_key(name, CAUSAL)
        worker = self._workers.get(key)
        if worker is None:
            worker = self._new_worker(None, name)
            self._register(worker)
        with self._lock:
            if self._routes.get(name, (key,))[0] != key:
                raise BadRequest(f"the name {name!r} is already served; pick another name")
            self._routes[name] = (key, BASE_ROUTE)
        return worker.served.entry()

    def start(self) -> None:
        """Start one worker thread per loaded base model."""
        self._started = True
        for worker in list(self._workers.values()):
            if not worker.is_alive():
                worker.start()

    # --- what is served ----------------------------------------------------------------------------
    def models(self) -> list[ModelEntry]:
        with self._lock:
            routes = list(self._routes.items())
        return [self._entry(model_id, key, adapter) for model_id, (key, adapter) in routes]

    def entry(self, model_id: str) -> ModelEntry:
        key, adapter = self._lookup(model_id)
        return self._entry(model_id, key, adapter)

    def encode_chat(self, model_id: str, messages: list[dict]) -> list[int]:
        """Prompt ids of a conversation with the chat template, up to where the reply starts (as training)."""
        served = self._causal(model_id)[0].served
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise BadRequest('messages must be a non-empty list of {"role": str, "content": str} objects')
        return self._encode(served, [{"role": m["role"], "content": m["content"]} for m in messages], True)

    def encode_text(self, model_id: str, prompt: str) -> list[int]:
        """Prompt ids of raw text (no chat template), with the tokenizer's leading special tokens."""
        served = self._causal(model_id)[0].served
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("prompt must be a non-empty string")
        return self._encode(served, prompt, False)

    def stop_ids(self, model_id: str) -> list[int]:
        return list(self._causal(model_id)[0].served.stop_ids)

    # --- requests ----------------------------------------------------------------------------------
    async def generate(self, model_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TextDelta]:
        """Deltas of the reply; leaving the loop early (or cancelling the task) drops the request."""
        worker, adapter = self._causal(model_id)
        served = worker.served
        self._check_prompt(served, prompt_ids, params.max_tokens)
        handoff = Handoff(asyncio.get_running_loop(), stream=True)
        request = GenerateRequest(model_id, adapter, list(prompt_ids), params.max_tokens,
                                  sampler(params.temperature, params.top_p, params.seed, served.model.device),
                                  TextStream(served.decoder, params.stop), frozenset(served.stop_ids), handoff)
        self._refuse_if_closing()
        worker.submit(request)
        finished = False
        try:
            while not finished:
                item = await handoff.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:
                worker.cancel(request)

    async def classify(self, model_id: str, texts: list[str]) -> list[Classification]:
        """Each text's label and every class's probability, under the named classifier adapter."""
        key, adapter = self._lookup(model_id)
        worker = self._workers[key]
        if worker.served.task != CLASSIFICATION:
            raise WrongTask(f"{model_id!r} is a causal-LM model; classify with a classifier adapter "
                            f"({', '.join(self._names(CLASSIFICATION)) or 'none served'})")
        if adapter == BASE_ROUTE:
            raise WrongTask(f"{model_id!r} is a base model without a trained classification head; classify with one "
                            f"of its adapters ({', '.join(worker.served.adapters)})")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest("input must be a non-empty list of strings")
        request = ClassifyRequest(model_id, adapter, list(texts), Handoff(asyncio.get_running_loop()))
        self._refuse_if_closing()
        worker.submit(request)
        try:
            return await request.handoff.future
        finally:
            if not request.handoff.future.done():
                worker.cancel(request)

    # --- run-time changes ----------------------------------------------------------------------------
    async def load_adapter(self, name: str, path: str | Path, model: str | None = None) -> ModelEntry:
        """Load an adapter while serving; its base's worker adds it between batches. A failure leaves
        every served model as it was (AdapterLoadError); a taken name is a BadRequest."""
        self._refuse_if_closing()
        self._loading = self._loading or asyncio.Lock()
        async with self._loading:  # one load at a time: two new adapters of one new base load it once
            self._check_free(name)
            spec = await asyncio.to_thread(_read_spec, name, path, model)
            worker = self._workers.get(spec.key)
            if worker is None:
                worker = await asyncio.to_thread(self._load_with_new_base, spec)
                self._register(worker)
                worker.start()
            else:
                handoff = Handoff(asyncio.get_running_loop())
                worker.control(Control(lambda: _load_into(worker.served, spec), handoff))
                await handoff.future
            self._route(name, spec.key, name)
            return worker.served.adapter_entry(name)

    async def unload_adapter(self, name: str) -> None:
        """Stop serving an adapter: new requests for it are refused now, running ones finish first."""
        key, adapter = self._lookup(name)
        if adapter == BASE_ROUTE:
            raise BadRequest(f"{name!r} is a base model; only adapters can be unloaded")
        worker = self._workers[key]
        with self._lock:
            self._routes.pop(name, None)
        handoff = Handoff(asyncio.get_running_loop())
        worker.control(Control(lambda: worker.served.remove(name), handoff, ready=lambda: not worker.uses(name)))
        await handoff.future

    async def shutdown(self, drain: bool = True) -> None:
        """Refuse new requests; let in-flight ones finish (``drain``) or fail them; stop the workers."""
        self._closing = True
        workers = list(self._workers.values())
        for worker in workers:
            worker.close(drain)
        for worker in workers:
            if worker.is_alive():
                await asyncio.to_thread(worker.join)

    # --- helpers -------------------------------------------------------------------------------------
    def _new_worker(self, spec: AdapterSpec | None, base: str | None = None) -> Worker:
        task = spec.task if spec is not None else CAUSAL
        name = spec.base if spec is not None else base
        try:
            served = load_base(name, task, spec, self.device)
        except LorafitError as error:
            raise AdapterLoadError(str(error)) from error
        except Exception as error:  # a damaged model folder can raise what the loaders did not foresee
            raise AdapterLoadError(f"base model '{name}' could not be loaded ({type(error).__name__}: "
                                   f"{first_line(error)}); check the model folder or name") from error
        kind = ClassifyWorker if task == CLASSIFICATION else GenerationWorker
        return kind(served, self.max_batch, self.max_queue, self.observer)

    def _load_with_new_base(self, spec: AdapterSpec) -> Worker:
        """A worker for the adapter's base, loaded for it, with the adapter in it (not yet registered)."""
        worker = self._new_worker(spec)
        _load_into(worker.served, spec)
        return worker

    def _register(self, worker: Worker) -> None:
        """Serve a newly loaded base (under its name, unless that is taken) and the adapters it holds."""
        with self._lock:
            self._workers[worker.served.key] = worker
            self._routes.setdefault(worker.served.id, (worker.served.key, BASE_ROUTE))

    def _route(self, name: str, key: tuple, adapter: str) -> None:
        with self._lock:
            self._routes[name] = (key, adapter)

    def _check_free(self, name: str) -> None:
        if not isinstance(name, str) or not name.strip():
            raise BadRequest("an adapter needs a non-empty name")
        with self._lock:
            taken = name in self._routes
        if taken:
            raise BadRequest(f"a model named {name!r} is already served; unload it first or pick another name")

    def _lookup(self, model_id: str) -> tuple[tuple, str]:
        with self._lock:
            route = self._routes.get(model_id)
            names = sorted(self._routes)
        if route is None:
            raise UnknownModel(f"model {model_id!r} is not served; served models: {', '.join(names) or 'none'}")
        return route

    def _causal(self, model_id: str) -> tuple[Worker, str]:
        key, adapter = self._lookup(model_id)
        worker = self._workers[key]
        if worker.served.task != CAUSAL:
            raise WrongTask(f"{model_id!r} is a classifier; generate with a causal-LM model "
                            f"({', '.join(self._names(CAUSAL)) or 'none served'}) or use /v1/classify")
        return worker, adapter

    def _names(self, task: str) -> list[str]:
        with self._lock:
            return sorted(name for name, (key, _) in self._routes.items() if self._workers[key].served.task == task)

    def _entry(self, model_id: str, key: tuple, adapter: str) -> ModelEntry:
        served = self._workers[key].served
        return served.entry() if adapter == BASE_ROUTE else served.adapter_entry(adapter)

    def _refuse_if_closing(self) -> None:
        if self._closing:
            raise ShuttingDown("the server is shutting down and takes no new requests; retry on another server")

    @staticmethod
    def _encode(served: ServedBase, prompt, chat_template: bool) -> list[int]:
        try:
            return encode_prompt(served.tokenizer, prompt, GenerationSettings(chat_template=chat_template))
        except LorafitError as error:
            raise BadRequest(str(error)) from error

    @staticmethod
    def _check_prompt(served: ServedBase, prompt_ids: list[int], max_tokens: int) -> None:
        vocab = served.model.get_base_model().config.vocab_size
        if not isinstance(prompt_ids, list) or not prompt_ids or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in prompt_ids):
            raise BadRequest(f"the prompt must be a non-empty list of token ids from 0 to {vocab - 1}")
        try:
            check_context(served.model.get_base_model().config, [prompt_ids], max_tokens)
        except LorafitError as error:
            raise ContextTooLong(str(error).replace("--max-new-tokens", "max_tokens")) from None


def _read_spec(name: str, path: str | Path, model: str | None) -> AdapterSpec:
    try:
        return read_adapter_spec(name, path, model)
    except LorafitError as error:
        raise AdapterLoadError(str(error)) from error


def _load_into(served: ServedBase, spec: AdapterSpec) -> None:
    """Add the adapter to its loaded base; any failure leaves the base's adapters as they were."""
    try:
        served.add(spec)
    except LorafitError as error:
        raise AdapterLoadError(f"adapter {spec.name!r} could not be loaded: {error}") from error
    except Exception as error:  # a damaged file can raise what the readers did not foresee
        raise AdapterLoadError(f"adapter {spec.name!r} could not be loaded from '{spec.directory}' "
                               f"({type(error).__name__}: {first_line(error)}); check the folder's files") from error
