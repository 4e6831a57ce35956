"""The thread that owns one loaded base model: it takes queued requests and runs/changes runtime state
between batches, so nothing else ever touches the model while it runs.

A failure in a forward fails the requests of that forward (their callers get ``ModelFailed``); the
thread goes on with the next batch. Results reach the caller's asyncio loop through ``Handoff``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from lorafit.errors import first_line
from lorafit.serving.errors import ModelFailed, QueueFull, ShuttingDown
from lorafit.serving.registry import ServedBase

log = logging.getLogger("lorafit.serve")


class Handoff:
    """Carries one request's results from a worker thread to the event loop awaiting them: a stream of
    items (``queue``) or one result (``future``). Exceptions travel as items."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: bool = False) -> None:
        self.loop = loop
        self.queue: asyncio.Queue | None = asyncio.Queue() if stream else None
        self.future: asyncio.Future | None = None if stream else loop.create_future()

    def put(self, item) -> None:
        self._call(self.queue.put_nowait, item)

    def settle(self, result=None, error: BaseException | None = None) -> None:
        self._call(_settle, self.future, result, error)

    def _call(self, function, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():  # the caller gave up waiting (cancelled)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def model_failed(error: BaseException) -> ModelFailed:
    return ModelFailed(f"the model failed on this request's batch ({type(error).__name__}: {first_line(error)}); "
                       "retry the request, and report it if it fails again")


@dataclass
class Control:
    """A change to the served model (load, unload) run by the worker between batches, once ``ready()``."""

    run: Callable[[], object]
    handoff: Handoff
    ready: Callable[[], bool] = lambda: True


class Worker(threading.Thread):
    """One base model's thread. Subclasses say how a batch is formed and run (``work``)."""

    def __init__(self, served: ServedBase, max_batch: int, max_queue: int, observer=None) -> None:
        super().__init__(name=f"lorafit-serve {served.id}", daemon=True)
        self.served = served
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.observer = observer
        self.cond = threading.Condition()
        self.pending: deque = deque()
        self.controls: list[Control] = []
        self.closing = False
        self.aborting = False

    # --- called from other threads -------------------------------------------------------------
    def submit(self, request) -> None:
        """Queue a request, or refuse it (QueueFull, ShuttingDown) before the caller waits on anything."""
        with self.cond:
            if self.closing:
                raise ShuttingDown("the server is shutting down and takes no new requests; retry on another server")
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"the queue of '{self.served.id}' holds {self.max_queue} requests; retry shortly "
                                "(or start the server with a larger --max-queue)")
            self.pending.append(request)
            depth = len(self.pending)
            self.cond.notify()
        self.observe("queue_depth", self.served.id, depth)

    def cancel(self, request) -> None:
        """Drop a request: from the queue now, from the running batch before the next step."""
        with self.cond:
            request.cancelled = True
            if request in self.pending:
                self.pending.remove(request)
                self.observe("queue_depth", self.served.id, len(self.pending))

    def control(self, control: Control) -> None:
        with self.cond:
            self.controls.append(control)
            self.cond.notify()

    def close(self, drain: bool) -> None:
        """Refuse new requests; with ``drain`` finish the queued and running ones, else fail them."""
        with self.cond:
            self.closing = True
            self.aborting = self.aborting or not drain
            self.cond.notify()

    # --- the thread ------------------------------------------------------------------------------
    def run(self) -> None:
        while self._wait_for_work():
            self._run_controls()  # outside inference mode: loaded weights must be ordinary tensors
            try:
                with torch.inference_mode():
                    self.work()
            except Exception as error:  # a bug outside a forward: fail what runs, keep serving
                log.exception("lorafit serve: worker of %s failed a batch", self.served.id)
                self.fail_running(model_failed(error))
        self._run_controls(everything=True)
        error = ShuttingDown("the server shut down before this request ran; retry on another server")
        self.fail_running(error)
        for request in self.take(len(self.pending)):
            self.fail(request, error)

    def _wait_for_work(self) -> bool:
        with self.cond:
            while not (self.pending or self.busy() or self.controls or self.closing):
                self.cond.wait()
            if self.aborting:
                return False
            return not (self.closing and not self.pending and not self.busy())

    def _run_controls(self, everything: bool = False) -> None:
        with self.cond:  # in order: a load after an unload of the same name waits for the unload
            count = 0
            while count < len(self.controls) and (everything or self.controls[count].ready()):
                count += 1
            due, self.controls = self.controls[:count], self.controls[count:]
        for control in due:
            try:
                # an adapter loaded here must hold normal tensors: the fast LoRA path reads their version counters
                with torch.inference_mode(False):
                    result = control.run()
                control.handoff.settle(result)
            except Exception as error:
                control.handoff.settle(error=error)

    def take(self, count: int, fits: Callable[[object], bool] | None = None) -> list:
        """Up to ``count`` queued requests, oldest first (stopping at the first that does not ``fit``)."""
        taken = []
        with self.cond:
            while self.pending and len(taken) < count and (fits is None or fits(self.pending[0])):
                taken.append(self.pending.popleft())
            depth = len(self.pending)
        if taken:
            self.observe("queue_depth", self.served.id, depth)
        return taken

    def uses(self, adapter: str) -> bool:
        """Whether a queued or running request needs this adapter (an unload waits for them)."""
        with self.cond:
            queued = any(r.adapter == adapter for r in self.pending)
        return queued or self.running_uses(adapter)

    def observe(self, hook: str, *args) -> None:
        """Call the metrics observer; a failing observer is logged, never fatal."""
        if self.observer is None:
            return
        try:
            getattr(self.observer, hook)(*args)
        except Exception:
            log.exception("lorafit serve: metrics observer failed in %s", hook)

    # --- what a kind of worker supplies ------------------------------------------------------------
    def work(self) -> None:
        """Form and run one batch (one decoding step for generation)."""
        raise NotImplementedError

    def busy(self) -> bool:
        """Whether requests are running (called under ``cond``)."""
        return False

    def running_uses(self, adapter: str) -> bool:
        return False

    def fail_running(self, error: BaseException) -> None:
        """Fail every running request with ``error`` and forget them."""

    def fail(self, request, error: BaseException) -> None:
        raise NotImplementedError
