"""The worker thread under trouble: cancelled requests, a full queue, forwards that raise, shutdown.

A Gate holds the worker inside a forward until the test opens it, so what is queued or running at
each moment is known rather than raced for."""

from __future__ import annotations

import asyncio
import threading

import pytest

from test_serving_engine import Recorder, expected, make_engine, models, reply  # noqa: F401
from test_generate import build_tokenizer
from test_serving_engine import MAX_TOKENS, PROMPTS

from lorafit.serving.engine import SamplingParams
from lorafit.serving.errors import ModelFailed, QueueFull, ShuttingDown


def served_model(engine, model_id: str = "a"):
    """The loaded model that serves ``model_id`` (reaching into the engine: only its worker may run it)."""
    key, _ = engine._routes[model_id]
    return engine._workers[key].served.model


class Gate:
    """A forward hook on the model serving ``model_id``: the ``hold_at``-th forward (1-based) waits until
    ``open()``; ``fail_when(kwargs)`` makes a forward raise."""

    def __init__(self, engine, hold_at: int | None = None, fail_when=None, model_id: str = "a") -> None:
        self.model = served_model(engine, model_id)
        self.hold_at, self.fail_when = hold_at, fail_when
        self.count = 0
        self.entered, self.opened = threading.Event(), threading.Event()
        self.handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.count += 1
        if self.count == self.hold_at:
            self.entered.set()
            assert self.opened.wait(30), "the test never opened the gate"
        if self.fail_when is not None and self.fail_when(kwargs):
            raise RuntimeError("injected failure")

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 30)

    def open(self) -> None:
        self.opened.set()


def test_closing_the_stream_stops_the_request_and_frees_its_row(models, expected):
    recorder = Recorder()
    engine = make_engine(models, max_batch=1, observer=recorder)
    gate = Gate(engine, hold_at=3)  # prefill, one decoding step, then held

    async def run():
        ids = engine.encode_chat("a", [{"role": "user", "content": "hello world"}])
        stream = engine.generate("a", ids, SamplingParams(max_tokens=100))
        await stream.__anext__()
        await gate.wait_entered()
        await stream.aclose()  # the client went away while its row is inside a step
        gate.open()
        name, prompt = PROMPTS[1]
        later = await asyncio.wait_for(reply(engine, name, prompt, SamplingParams(max_tokens=MAX_TOKENS[1])), 30)
        await engine.shutdown()
        return later

    text, _ = asyncio.run(run())
    assert text == expected[1]
    (cancelled,) = [ended for ended in recorder.ended if ended[0] == "a"]
    assert cancelled[2] <= 3  # dropped right after the step it was in, not run to 100 tokens


def test_a_full_queue_refuses_with_queue_full(models):
    engine = make_engine(models, max_batch=1, max_queue=1)
    gate = Gate(engine, hold_at=1)

    async def run():
        ids = engine.encode_chat("a", [{"role": "user", "content": "hello"}])
        params = SamplingParams(max_tokens=3)
        running = asyncio.create_task(reply(engine, "a", "hello", params))
        await gate.wait_entered()  # the first request is in its prefill: the queue is empty
        queued = asyncio.create_task(reply(engine, "b", "hello", params))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull, match="holds 1 requests; retry shortly"):
            await engine.generate("c", ids, params).__anext__()
        gate.open()
        results = await asyncio.gather(running, queued)
        # with the queue drained there is room again
        again = await reply(engine, "c", "hello", params)
        await engine.shutdown()
        return results, again

    results, again = asyncio.run(run())
    assert all(last.finish_reason for _, last in [*results, again])


def test_a_prefill_that_raises_fails_only_the_joining_request(models, expected):
    engine = make_engine(models, max_batch=4)
    bad_word = build_tokenizer().convert_tokens_to_ids("fire")
    Gate(engine, fail_when=lambda kwargs: bool((kwargs["input_ids"] == bad_word).any()))

    async def run():
        started = asyncio.Event()
        name, prompt = PROMPTS[2]
        good = asyncio.create_task(reply(engine, str(models["base"]), prompt, SamplingParams(max_tokens=MAX_TOKENS[2]),
                                         started))
        await started.wait()
        with pytest.raises(ModelFailed, match="RuntimeError: injected failure"):
            await reply(engine, "b", "fire", SamplingParams(max_tokens=5))
        good_text = (await good)[0]
        after = (await reply(engine, "a", PROMPTS[0][1], SamplingParams(max_tokens=MAX_TOKENS[0])))[0]
        await engine.shutdown()
        return good_text, after

    assert asyncio.run(run()) == (expected[2], expected[0])


def test_a_decoding_step_that_raises_fails_its_batch_and_the_worker_goes_on(models, expected):
    engine = make_engine(models, max_batch=4)
    fail = threading.Event()
    Gate(engine, fail_when=lambda kwargs: fail.is_set() and kwargs["input_ids"].shape[1] == 1)

    async def run():
        started = {name: asyncio.Event() for name in "ab"}
        first = [asyncio.create_task(reply(engine, name, "hello world", SamplingParams(max_tokens=60), started[name]))
                 for name in "ab"]
        await asyncio.gather(*(event.wait() for event in started.values()))
        fail.set()
        outcomes = await asyncio.gather(*first, return_exceptions=True)
        fail.clear()
        after = (await reply(engine, "a", PROMPTS[0][1], SamplingParams(max_tokens=MAX_TOKENS[0])))[0]
        await engine.shutdown()
        return outcomes, after

    outcomes, after = asyncio.run(run())
    assert all(isinstance(o, ModelFailed) for o in outcomes), outcomes
    assert after == expected[0]


def test_shutdown_finishes_running_requests_and_refuses_new_ones(models, expected):
    engine = make_engine(models, max_batch=2)
    gate = Gate(engine, hold_at=2)

    async def run():
        tasks = [asyncio.create_task(reply(engine, name, prompt, SamplingParams(max_tokens=n)))
                 for (name, prompt), n in zip(PROMPTS[:2], MAX_TOKENS[:2])]
        await gate.wait_entered()
        closing = asyncio.create_task(engine.shutdown(drain=True))
        await asyncio.sleep(0.01)
        with pytest.raises(ShuttingDown):
            await reply(engine, "c", "hello", SamplingParams(max_tokens=3))
        gate.open()
        await closing
        return [(await t)[0] for t in tasks]

    assert asyncio.run(run()) == expected[:2]


def test_shutdown_without_drain_fails_what_runs(models):
    engine = make_engine(models, max_batch=1)
    gate = Gate(engine, hold_at=2)

    async def run():
        tasks = [asyncio.create_task(reply(engine, name, "hello", SamplingParams(max_tokens=20))) for name in "ab"]
        await gate.wait_entered()
        closing = asyncio.create_task(engine.shutdown(drain=False))
        await asyncio.sleep(0.01)
        gate.open()
        await closing
        return await asyncio.gather(*tasks, return_exceptions=True)

    assert all(isinstance(o, ShuttingDown) for o in asyncio.run(run()))
