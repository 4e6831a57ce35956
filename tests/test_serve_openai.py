"""`lorafit serve` as OpenAI's own Python client sees it: a real uvicorn server on 127.0.0.1, tiny models,
the `openai` package for completions, chat, streaming, the models list and its exception classes."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from lorafit.serving.app import create_app
from lorafit.serving.settings import ServeSettings
from lorafit.serving.metrics import Metrics
from test_serve_app import CONTEXT, PROMPT, served, start_engine, stop_engine  # noqa: F401
from test_serve_metrics import total

KEY = "test-key"
TIMEOUT = 60


class Server:
    """uvicorn in a thread on a free loopback port (its lifespan drains the engine on exit)."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(TIMEOUT)
        self.sock.close()


@pytest.fixture(scope="module")
def server(served):
    metrics = Metrics()
    engine = start_engine(served, metrics, max_batch=8, max_queue=64)
    app = create_app(engine, ServeSettings(api_key=KEY, adapter_root=str(served.root)), metrics)
    try:
        with Server(app) as running:
            running.engine, running.metrics = engine, metrics
            yield running
    finally:
        stop_engine(engine)


@pytest.fixture
def api(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)


def test_models_list(api):
    models = {m.id: m for m in api.models.list()}
    assert {"a", "b", "sst"} <= set(models)
    assert models["a"].parent == models["b"].parent and models["a"].parent in models
    assert models["a"].owned_by == "lorafit"


def test_completion_and_chat(api):
    completion = api.completions.create(model="a", prompt=PROMPT, max_tokens=6, temperature=0)
    assert completion.object == "text_completion" and completion.model == "a"
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 6
    chat = api.chat.completions.create(model="b", messages=[{"role": "system", "content": "be brief"},
                                                            {"role": "user", "content": PROMPT}],
                                       max_tokens=6, temperature=0, seed=1)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str)
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    again = api.chat.completions.create(model="b", messages=[{"role": "system", "content": "be brief"},
                                                             {"role": "user", "content": PROMPT}],
                                        max_tokens=6, temperature=0)
    assert again.choices[0].message.content == chat.choices[0].message.content  # greedy: seed changes nothing


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streaming_gives_the_same_text_as_one_response(api, kind):
    args = dict(model="a", max_tokens=10, temperature=0)
    if kind == "chat":
        args["messages"] = [{"role": "user", "content": PROMPT}]
        whole = api.chat.completions.create(**args)
        chunks = list(api.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        expected = whole.choices[0].message.content
    else:
        args["prompt"] = PROMPT
        whole = api.completions.create(**args)
        chunks = list(api.completions.create(**args, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        expected = whole.choices[0].text
    assert len(chunks) > 2 and text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_errors_are_openais_exception_classes(api, server):
    with pytest.raises(openai.NotFoundError) as err:
        api.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model="a", prompt=PROMPT, max_tokens=CONTEXT)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(model="sst", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError):
        api.completions.create(model="a", prompt=PROMPT, max_tokens="many")
    wrong_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=TIMEOUT)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
    with pytest.raises(openai.NotFoundError):  # streaming too: refused before the stream starts
        api.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], stream=True)


def test_a_failure_mid_stream_is_an_error_event_the_client_raises(api, server, monkeypatch):
    from lorafit.serving.engine import TextDelta
    from lorafit.serving.errors import ModelFailed

    async def failing_midway(model_id, ids, params):
        yield TextDelta("one", None, len(ids), 1)
        raise ModelFailed("the model failed on this request's batch (RuntimeError: secret internals)")

    monkeypatch.setattr(server.engine, "generate", failing_midway)
    stream = api.chat.completions.create(model="a", messages=[{"role": "user", "content": PROMPT}], stream=True)
    texts = []
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            texts.append(chunk.choices[0].delta.content)
    assert "one" in texts and "secret" not in str(err.value)
    monkeypatch.undo()
    assert api.completions.create(model="a", prompt=PROMPT, max_tokens=2).choices[0].text is not None


def test_load_and_unload_while_requests_run(api, server):
    headers = {"Authorization": f"Bearer {KEY}"}
    stop = threading.Event()

    def keep_asking(i: int) -> int:
        answered = 0
        while not stop.is_set() and answered < 40:
            model = ("a", "b")[i % 2]
            reply = api.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=8, temperature=0)
            assert reply.model == model
            answered += 1
        return answered

    with ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(keep_asking, i) for i in range(4)]
        try:
            for _ in range(2):
                loaded = httpx.post(server.url + "/v1/load_lora_adapter", headers=headers, timeout=TIMEOUT,
                                    json={"lora_name": "c", "lora_path": "c"})
                assert loaded.status_code == 200, loaded.text
                reply = api.completions.create(model="c", prompt=PROMPT, max_tokens=4, temperature=0)
                assert reply.model == "c"
                unloaded = httpx.post(server.url + "/v1/unload_lora_adapter", headers=headers, timeout=TIMEOUT,
                                      json={"lora_name": "c"})
                assert unloaded.status_code == 200, unloaded.text
                with pytest.raises(openai.NotFoundError):
                    api.completions.create(model="c", prompt=PROMPT, max_tokens=4)
        finally:
            stop.set()
        answered = [w.result(timeout=TIMEOUT) for w in workers]  # re-raises any failed request
    assert all(n >= 1 for n in answered)


def scrape(server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.mark.parametrize("streamed", [True, False])
def test_a_client_that_disconnects_stops_its_generation(api, server, streamed):
    """The client leaves early (closing the stream after two chunks, or timing out on a whole response);
    the worker must stop decoding long before the 400 tokens a client that stays gets."""
    def decode_forwards() -> float:
        return total(scrape(server), "lorafit_batch_size_count", kind="decode")

    def closed() -> float:
        return total(scrape(server), "lorafit_requests_total", endpoint="/v1/completions", status="499")

    whole = api.completions.create(model="a", prompt=PROMPT, max_tokens=400, temperature=0)
    assert whole.usage.completion_tokens == 400 and whole.choices[0].finish_reason == "length"
    before, closed_before = decode_forwards(), closed()
    if streamed:
        stream = api.completions.create(model="a", prompt=PROMPT, max_tokens=400, temperature=0, stream=True)
        for _, chunk in zip(range(2), stream):
            assert chunk.choices[0].finish_reason is None  # still generating
        stream.close()
    else:
        with pytest.raises(openai.APITimeoutError):
            api.with_options(timeout=0.3).completions.create(model="a", prompt=PROMPT, max_tokens=400, temperature=0)
    deadline = time.monotonic() + 10
    while True:  # the worker notices between decoding steps
        seen = decode_forwards()
        time.sleep(0.5)
        if decode_forwards() == seen:
            break
        assert time.monotonic() < deadline, "the generation went on after the client left"
    assert seen - before < 300
    assert closed() - closed_before == 1
