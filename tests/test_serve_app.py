"""Tests for the HTTP layer of `lorafit serve` (serving/app.py) over the real engine and tiny models:
OpenAI's error bodies for every bad request, /v1/models, load/unload checks, Prometheus metrics.

This module also holds the tiny served models the other serve test modules import: a Llama with a
chat template and three adapters (non-zero B, so each changes the output), and a BERT classifier adapter.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from lorafit.config import LoraConfig
from lorafit.model import get_lora_model
from lorafit.serving.app import create_app
from lorafit.serving.settings import ServeSettings
from lorafit.serving.engine import Engine
from lorafit.serving.metrics import Metrics
from lorafit.inference.adapter_info import save_adapter_info
from test_cli import build_tiny_bert
from test_generate import build_tokenizer, save_adapter

CONTEXT = 1024  # room for long generations: the disconnect and SIGTERM tests need one still running
PROMPT = "hello world how are you"
LABELS = ["neg", "pos"]


@dataclass(frozen=True)
class Served:
    llama: Path
    a: Path
    b: Path
    root: Path  # --adapter-root: holds adapter "c"
    c: Path
    bert: Path
    sst: Path


def build_llama(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=CONTEXT,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_classifier(bert: Path, out: Path) -> Path:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(3)
    base = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=len(LABELS))
    lora = get_lora_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                           modules_to_save=["classifier"], init_lora_weights=False,
                                           task_type="SEQ_CLS"))
    lora.save_pretrained(out)
    save_adapter_info(out, {"task": "classification", "base_model": str(bert),
                            "id2label": {str(i): name for i, name in enumerate(LABELS)}, "max_length": 32})
    return out


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> Served:
    root = tmp_path_factory.mktemp("served")
    llama = build_llama(root / "llama")
    (root / "adapters").mkdir()
    bert = build_tiny_bert(root / "bert")
    return Served(llama, save_adapter(llama, root / "a", seed=1), save_adapter(llama, root / "b", seed=2),
                  root / "adapters", save_adapter(llama, root / "adapters" / "c", seed=3), bert,
                  save_classifier(bert, root / "sst"))


def start_engine(served: Served, metrics: Metrics | None = None, **options) -> Engine:
    engine = Engine(observer=metrics, **options)
    engine.add_adapter("a", served.a)
    engine.add_adapter("b", served.b)
    engine.add_adapter("sst", served.sst)
    engine.start()
    return engine


def stop_engine(engine: Engine) -> None:
    asyncio.run(engine.shutdown(drain=True))


@pytest.fixture(scope="module")
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture(scope="module")
def engine(served, metrics):
    engine = start_engine(served, metrics, max_batch=4, max_queue=64)
    yield engine
    stop_engine(engine)


def client(engine, metrics=None, **settings) -> TestClient:
    """A client of a fresh app over the shared engine (without the lifespan, which would shut the engine down)."""
    return TestClient(create_app(engine, ServeSettings(**settings), metrics), raise_server_exceptions=False)


def assert_openai_error(response, status: int, code: str | None = None, says: str = "") -> dict:
    """OpenAI's error object and nothing else: no traceback, no FastAPI 'detail'."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and "Traceback" not in response.text
    if code is not None:
        assert body["error"]["code"] == code
    assert says in body["error"]["message"]
    return body["error"]


def complete(c: TestClient, model: str = "a", **fields) -> httpx.Response:
    return c.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                                           **fields})


# --- /v1/models and successful answers -----------------------------------------------------------


def test_models_lists_bases_and_adapters_with_their_parent(engine, served):
    data = client(engine).get("/v1/models").json()["data"]
    by_id = {m["id"]: m for m in data}
    assert {"a", "b", "sst"} <= set(by_id)
    assert by_id["a"]["parent"] == by_id["b"]["parent"] != by_id["sst"]["parent"]
    for adapter in ("a", "b", "sst"):
        parent = by_id[by_id[adapter]["parent"]]
        assert parent["parent"] is None
        assert parent["task"] == by_id[adapter]["task"]
    assert by_id["a"]["task"] == "causal-lm" and by_id["sst"]["task"] == "classification"
    assert by_id["sst"]["labels"] == LABELS
    assert by_id["a"]["max_model_len"] == CONTEXT
    assert all(m["object"] == "model" and m["owned_by"] == "lorafit" for m in data)


def test_completion_is_the_adapters_own_greedy_reply(engine, served):
    from test_generate import greedy_alone, NEW_TOKENS

    from lorafit.model import LoraModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    c = client(engine)
    replies = {m: complete(c, m, max_tokens=NEW_TOKENS).json() for m in ("a", "b")}
    reference = LoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(served.llama), served.a, "a")
    reference.load_adapter(served.b, "b")
    tokenizer = AutoTokenizer.from_pretrained(served.llama)
    ids = engine.encode_text("a", PROMPT)
    for model, reply in replies.items():
        assert reply["object"] == "text_completion" and reply["model"] == model
        assert reply["choices"][0]["text"].strip() == greedy_alone(reference.eval(), tokenizer, ids, model).strip()
        usage = reply["usage"]
        assert usage["prompt_tokens"] == len(ids)
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert replies["a"]["choices"][0]["text"] != replies["b"]["choices"][0]["text"]


def test_stream_is_server_sent_events_ending_with_done(engine):
    c = client(engine)
    whole = c.post("/v1/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": PROMPT}],
                                                 "max_tokens": 8, "temperature": 0}).json()
    with c.stream("POST", "/v1/chat/completions",
                  json={"model": "a", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8,
                        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finishes = [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]]
    assert finishes[-1] == whole["choices"][0]["finish_reason"] and not any(finishes[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert len({ch["id"] for ch in chunks}) == 1


def test_n_choices_are_seeded_one_after_another_and_the_prompt_counted_once(engine):
    c = client(engine)
    fields = dict(max_tokens=6, temperature=1.0, seed=11)
    two = complete(c, n=2, **fields).json()
    assert [ch["index"] for ch in two["choices"]] == [0, 1]
    second_alone = complete(c, **{**fields, "seed": 12}).json()
    assert two["choices"][1]["text"] == second_alone["choices"][0]["text"]
    assert two["usage"]["prompt_tokens"] == second_alone["usage"]["prompt_tokens"]


def test_classify_returns_each_label_and_every_probability(engine, served):
    from lorafit.inference.loading import load_adapter_for_inference
    from lorafit.tasks.classification import predict_texts

    texts = ["a great and lovely film", "the plot was dull"]
    reply = client(engine).post("/v1/classify", json={"model": "sst", "input": texts}).json()
    assert reply["object"] == "list" and [d["index"] for d in reply["data"]] == [0, 1]
    loaded = load_adapter_for_inference(served.sst)
    reference = predict_texts(loaded.model, loaded.tokenizer, texts, max_length=32)
    for row, probs in zip(reply["data"], reference):
        assert list(row["probs"]) == LABELS
        assert [row["probs"][label] for label in LABELS] == pytest.approx([float(p) for p in probs], abs=1e-4)
        assert row["label"] == max(row["probs"], key=row["probs"].get)


# --- bad requests ---------------------------------------------------------------------------------


CHAT = {"model": "a", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}


@pytest.mark.parametrize("path, body, status, code, says", [
    ("/v1/completions", b'{"model": "a", "prompt": ', 400, "invalid_json", "not valid JSON"),
    ("/v1/chat/completions", b"\xff\xfe", 400, "invalid_json", "not valid JSON"),
    ("/v1/completions", {"model": "nope", "prompt": PROMPT}, 404, "model_not_found", "nope"),
    ("/v1/classify", {"model": "nope", "input": ["x"]}, 404, "model_not_found", "nope"),
    ("/v1/completions", {"model": "a", "prompt": 3}, 422, "invalid_type", "prompt"),
    ("/v1/completions", {"model": "a", "prompt": PROMPT, "max_tokens": "many"}, 422, "invalid_type", "max_tokens"),
    ("/v1/completions", {"model": "a", "prompt": PROMPT, "max_tokens": 0}, 422, "invalid_type", "max_tokens"),
    ("/v1/completions", {"model": "a", "prompt": PROMPT, "temperature": -1}, 422, "invalid_type", "temperature"),
    ("/v1/completions", {"model": "a", "prompt": PROMPT, "stop": 5}, 422, "invalid_type", "stop"),
    ("/v1/completions", {"prompt": PROMPT}, 422, "invalid_type", "model"),
    ("/v1/completions", [1, 2], 422, "invalid_type", "JSON object"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 422, "invalid_type",
     "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 422, "invalid_type", "messages"),
    ("/v1/completions", {"model": "a", "prompt": PROMPT, "max_tokens": CONTEXT}, 400, "context_length_exceeded", ""),
    ("/v1/completions", {"model": "a", "prompt": "hello " * CONTEXT, "max_tokens": 1}, 400,
     "context_length_exceeded", ""),
    ("/v1/chat/completions", {**CHAT, "max_tokens": CONTEXT * 2}, 400, "context_length_exceeded", ""),
    ("/v1/completions", {"model": "sst", "prompt": PROMPT}, 400, "wrong_model_type", ""),
    ("/v1/classify", {"model": "a", "input": ["x"]}, 400, "wrong_model_type", ""),
    ("/v1/classify", {"model": "sst", "input": []}, 400, None, "empty"),
    ("/v1/completions", {"model": "a", "prompt": PROMPT, "logprobs": 2}, 400, None, "logprobs"),
    ("/v1/completions", {"model": "a", "prompt": []}, 400, None, "empty"),
])
def test_bad_request_gets_its_status_and_openai_error_body(engine, path, body, status, code, says):
    c = client(engine)
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    assert_openai_error(c.post(path, **kwargs), status, code, says)
    assert complete(c).status_code == 200  # the worker is alive


def test_unknown_path_and_method_get_openai_error_bodies(engine):
    c = client(engine)
    assert_openai_error(c.get("/v1/nothing"), 404, "not_found")
    assert_openai_error(c.get("/v1/completions"), 405, "method_not_allowed")


def test_over_long_body_is_413_whether_announced_or_streamed(engine):
    c = client(engine, max_body_bytes=1000)
    big = json.dumps({"model": "a", "prompt": "hello " * 400}).encode()
    assert_openai_error(c.post("/v1/completions", content=big), 413, "request_too_large", "--max-body-bytes")

    def chunks():  # no Content-Length: the limit must hold while reading
        for i in range(0, len(big), 100):
            yield big[i:i + 100]

    assert_openai_error(c.post("/v1/completions", content=chunks()), 413, "request_too_large")
    assert complete(c).status_code == 200


def test_api_key_is_required_on_v1_and_compared_exactly(engine):
    c = client(engine, api_key="s3cret")
    assert_openai_error(c.get("/v1/models"), 401, "invalid_api_key", "missing API key")
    for header in ("Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret"):
        assert_openai_error(c.get("/v1/models", headers={"Authorization": header}), 401, "invalid_api_key")
    assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.post("/v1/completions", headers={"Authorization": "Bearer s3cret"},
                  json={"model": "a", "prompt": PROMPT, "max_tokens": 2}).status_code == 200
    assert c.get("/health").status_code == 200  # monitoring stays open, as vLLM leaves it
    assert c.get("/metrics").status_code == 200


def test_full_queue_is_503_with_retry_after(served):
    engine = start_engine(served, max_batch=1, max_queue=1)
    app = create_app(engine, ServeSettings())

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            body = {"model": "a", "prompt": PROMPT, "max_tokens": 200, "temperature": 0}
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(6)))

    try:
        responses = asyncio.run(burst())
    finally:
        stop_engine(engine)
    refused = [r for r in responses if r.status_code == 503]
    assert refused and len(refused) <= 5 and any(r.status_code == 200 for r in responses)
    for response in refused:
        assert_openai_error(response, 503, "server_overloaded")
        assert int(response.headers["retry-after"]) >= 1


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("where", ["app", "model"])
def test_unexpected_error_is_a_generic_500_and_a_log_line(engine, caplog, monkeypatch, where, stream):
    """A bug in the app, or a forward that raised (the engine's ModelFailed): the client learns that it
    failed, not the exception's text; the log has it; the next request is served."""
    from lorafit.serving.errors import ModelFailed

    c = client(engine)
    if where == "app":
        def broken(model_id, prompt):
            raise RuntimeError("secret internals")

        monkeypatch.setattr(engine, "encode_text", broken)
    else:
        async def failing(model_id, ids, params):
            raise ModelFailed("the model failed on this request's batch (RuntimeError: secret internals)")
            yield

        monkeypatch.setattr(engine, "generate", failing)
    with caplog.at_level(logging.ERROR, logger="lorafit.serve"):
        response = complete(c, stream=stream)
    error = assert_openai_error(response, 500, "internal_error", "log")
    assert "secret" not in response.text and error["type"] == "server_error"
    assert any("secret internals" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    assert complete(c).status_code == 200


# --- adapters loaded and unloaded at run time ---------------------------------------------------------


def test_runtime_loading_is_off_without_adapter_root(engine, served):
    c = client(engine)
    assert_openai_error(c.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(served.c)}), 400,
                        None, "--adapter-root")
    assert "c" not in [m["id"] for m in c.get("/v1/models").json()["data"]]


def test_paths_outside_the_root_or_without_safetensors_are_refused(engine, served, tmp_path):
    c = client(engine, adapter_root=str(served.root))
    outside_link = served.root / "link-out"
    if not outside_link.exists():
        outside_link.symlink_to(served.a, target_is_directory=True)
    no_weights = served.root / "no-weights"
    if not no_weights.exists():
        no_weights.mkdir()
        shutil.copy(served.a / "adapter_config.json", no_weights)
    cases = [(str(served.a), 400, "outside"), ("../a", 400, "outside"), ("link-out", 400, "outside"),
             ("missing", 404, "not a folder"), ("no-weights", 400, "safetensors")]
    for path, status, says in cases:
        assert_openai_error(c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path}), status,
                            None, says)
    assert "x" not in [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert_openai_error(c.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 422, "invalid_type", "lora_path")


def test_load_then_unload_an_adapter_without_restart(engine, served):
    c = client(engine, adapter_root=str(served.root))
    loaded = c.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": "c"})
    assert loaded.status_code == 200, loaded.text
    try:
        cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert cards["c"]["parent"] == cards["a"]["parent"]
        replies = {m: complete(c, m, max_tokens=6).json()["choices"][0]["text"] for m in ("a", "c")}
        assert replies["a"] != replies["c"]
        assert_openai_error(c.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": "c"}), 400)
    finally:
        unloaded = c.post("/v1/unload_lora_adapter", json={"lora_name": "c"})
    assert unloaded.status_code == 200, unloaded.text
    assert_openai_error(complete(c, "c"), 404, "model_not_found")
    assert_openai_error(c.post("/v1/unload_lora_adapter", json={"lora_name": "c"}), 404, "model_not_found")
    assert complete(c, "a").status_code == 200


def test_playground_page_or_a_clear_404(engine):
    from importlib import resources

    page = resources.files("lorafit.serving") / "static" / "playground.html"
    response = client(engine).get("/")
    if page.is_file():
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
        assert response.text == page.read_text(encoding="utf-8")
    else:
        assert_openai_error(response, 404, "not_found", "playground page is not installed")
