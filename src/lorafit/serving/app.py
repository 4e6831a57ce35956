"""The HTTP layer of `lorafit serve`: OpenAI's and vLLM's endpoints over the batching engine.

Every answer that is not a success is OpenAI's error object with the status a client expects; an
unexpected exception is logged and answered with a generic 500, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lorafit.errors import LorafitError, first_line
from lorafit.serving import replies
from lorafit.serving.errors import AdapterLoadError, BadRequest, ServeError
from lorafit.serving.metrics import CONTENT_TYPE, Metrics
from lorafit.serving.protocol import (GENERIC_500, ChatRequest, ClassifyRequest, CompletionRequest,
                                      LoadAdapterRequest, UnloadAdapterRequest, error_body, error_content, parse_body)
from lorafit.serving.settings import API_KEY_ENV, ServeSettings

log = logging.getLogger("lorafit.serve")
RETRY_AFTER_S = "1"
# the endpoints metrics are counted under; anything else is "other", so a scan of random paths adds no series
ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/classify",
             "/v1/load_lora_adapter", "/v1/unload_lora_adapter")


class TooLarge(ServeError):
    status = 413
    code = "request_too_large"


class Unauthorized(ServeError):
    status = 401
    code = "invalid_api_key"


class NotFound(ServeError):
    status = 404
    code = "not_found"


class _Guard:
    """Outermost layer: the API key, the body size limit, request metrics, and the last word on errors."""

    def __init__(self, app, settings: ServeSettings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self.key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), []
        state = scope.setdefault("state", {})
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        received = 0

        async def receiving():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.settings.max_body_bytes:
                raise self._too_large()
            return message

        try:
            self._check(scope)
            await self.app(scope, receiving, sending)
        except ServeError as err:  # refused here, or while reading the body
            if not status:
                await _error_response(err)(scope, receive, sending)
        except Exception as err:
            log.error("%s %s failed: %s", scope["method"], scope["path"], first_line(err), exc_info=err)
            if not status:
                body = error_body(500, GENERIC_500, "internal_error")
                await JSONResponse(body, status_code=500)(scope, receive, sending)
        finally:
            outcome = state.get("outcome") or (status[0] if status else 500)
            self.metrics.request(endpoint, state.get("model", ""), outcome, time.monotonic() - started)

    def _check(self, scope) -> None:
        headers = dict(scope["headers"])
        # /health, /metrics and the page stay open, as vLLM leaves them
        if self.key is not None and scope["path"].startswith("/v1/"):
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            if not given or scheme.lower() != b"bearer":
                raise Unauthorized("missing API key; send 'Authorization: Bearer KEY' with the key the server "
                                   f"was started with (--api-key or {API_KEY_ENV})")
            if not hmac.compare_digest(given.strip(), self.key):
                raise Unauthorized("wrong API key; send the key the server was started with "
                                   f"(--api-key or {API_KEY_ENV})")
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.settings.max_body_bytes:
            raise self._too_large()

    def _too_large(self) -> TooLarge:
        return TooLarge(f"the request body is over {self.settings.max_body_bytes} bytes; send less, or start "
                        "the server with a larger --max-body-bytes")


def _error_response(err: Exception) -> JSONResponse:
    status, body = error_content(err)
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(engine, settings: ServeSettings, metrics: Metrics | None = None) -> FastAPI:
    """The FastAPI app over a started ``engine``; its shutdown drains the engine (in-flight requests finish).
    ``metrics`` should be the engine's observer, so /metrics shows batches, queues and tokens too."""
    metrics = metrics or Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await engine.shutdown(drain=True)

    app = FastAPI(title="lorafit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, settings=settings, metrics=metrics)

    @app.exception_handler(LorafitError)
    async def refused(request: Request, err: LorafitError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = (f"no endpoint {request.url.path}; see GET /v1/models and the README's Serving section"
                   if err.status_code == 404 else f"{request.method} is not allowed on {request.url.path}")
        body = error_body(err.status_code, message, codes.get(err.status_code, "http_error"))
        return JSONResponse(body, status_code=err.status_code, headers=err.headers)

    def entry_of(request: Request, model_id: str):
        entry = engine.entry(model_id)  # UnknownModel: 404
        request.state.model = entry.id
        return entry

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/")
    async def playground() -> HTMLResponse:
        page = resources.files("lorafit.serving") / "static" / "playground.html"
        if not page.is_file():
            raise NotFound("the playground page is not installed with this lorafit; the API works without it")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card(e) for e in engine.models()]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse_body(await request.body(), CompletionRequest)
        entry = entry_of(request, body.model)
        prompts = [engine.encode_text(entry.id, p) for p in body.prompts]
        if not prompts:
            raise BadRequest("'prompt' is an empty list; give at least one prompt")
        return await generate(request, "text", entry, body, prompts, body.max_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_body(await request.body(), ChatRequest)
        entry = entry_of(request, body.model)
        ids = engine.encode_chat(entry.id, [m.as_dict() for m in body.messages])
        limit = body.token_limit
        if limit is None:  # as vLLM: the rest of the context
            limit = max(1, entry.context_length - len(ids)) if entry.context_length else 512
        return await generate(request, "chat", entry, body, [ids], limit)

    async def generate(request: Request, kind: str, entry, body, prompts: list[list[int]], max_tokens: int):
        from lorafit.serving.engine import SamplingParams

        choices = []
        for p, ids in enumerate(prompts):
            for j in range(body.n):
                seed = None if body.seed is None else (body.seed + j) % 2**63
                params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                        stop=body.stop, seed=seed)
                choices.append(replies.Choice(len(choices), engine.generate(entry.id, ids, params), p))
        reply = replies.Reply(kind, entry.id, choices)
        started = time.monotonic()
        firsts = await replies.start(choices)
        endpoint = request.url.path
        if not body.stream:
            metrics.first_token_after(endpoint, time.monotonic() - started)
            return await _unless_disconnected(request, replies.collect(reply, firsts))

        def first_token() -> None:
            metrics.first_token_after(endpoint, time.monotonic() - started)

        events = _counted(request, replies.stream(reply, firsts, body.include_usage, first_token))
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/classify")
    async def classify(request: Request) -> JSONResponse:
        body = parse_body(await request.body(), ClassifyRequest)
        entry = entry_of(request, body.model)
        if not body.texts:
            raise BadRequest("'input' is an empty list; give at least one text")
        results = await engine.classify(entry.id, body.texts)
        data = [{"index": i, "label": r.label, "probs": r.probs, "num_classes": len(r.probs)}
                for i, r in enumerate(results)]
        # no "usage": the engine does not count a classifier's tokens per request
        return JSONResponse({"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                             "model": entry.id, "data": data})

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> JSONResponse:
        body = parse_body(await request.body(), LoadAdapterRequest)
        path = adapter_path(settings.adapter_root, body.lora_path)
        await engine.load_adapter(body.lora_name, path)
        log.info("loaded adapter %r from %s", body.lora_name, path)
        return JSONResponse(model_card(entry_of(request, body.lora_name)))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> JSONResponse:
        body = parse_body(await request.body(), UnloadAdapterRequest)
        entry_of(request, body.lora_name)
        await engine.unload_adapter(body.lora_name)
        log.info("unloaded adapter %r", body.lora_name)
        return JSONResponse({"id": body.lora_name, "object": "model", "deleted": True})

    return app


async def _unless_disconnected(request: Request, collecting) -> Response:
    """The whole response, or nothing if the client leaves first: its generations are cancelled then
    (Starlette cancels a streamed response whose client left, but not a handler still computing one)."""
    async def client_left() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(collecting), asyncio.ensure_future(client_left())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, watch):
            task.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)
    if work.cancelled():
        request.state.outcome = 499
        return Response(status_code=499)
    return JSONResponse(work.result())  # or the error it raised


async def _counted(request: Request, events):
    """The stream's events; a client gone mid-stream is counted as status 499 (nginx's 'client closed')."""
    try:
        async for event in events:
            yield event
    except BaseException:
        request.state.outcome = 499
        raise
    finally:
        await events.aclose()


def model_card(entry) -> dict:
    """An entry of GET /v1/models, with vLLM's fields (root, parent, max_model_len) and lorafit's task and labels."""
    card = {"id": entry.id, "object": "model", "created": entry.created, "owned_by": "lorafit", "root": entry.root,
            "parent": entry.parent, "max_model_len": entry.context_length, "task": entry.kind}
    if entry.labels is not None:
        card["labels"] = entry.labels
    return card


def adapter_path(root: str | None, lora_path: str) -> Path:
    """``lora_path`` resolved (symlinks too), refused unless it is a folder under ``root`` with the adapter's
    safetensors: a client must not make the server read files anywhere else."""
    if root is None:
        raise BadRequest("loading adapters at run time is off; restart lorafit serve with --adapter-root DIR "
                         "(the folder adapters may be loaded from)")
    base = Path(root).resolve()
    given = Path(lora_path).expanduser()
    path = (given if given.is_absolute() else base / given).resolve()
    if path != base and base not in path.parents:
        raise BadRequest(f"lora_path '{lora_path}' is outside the adapter root '{base}'; put the adapter under it")
    if not path.is_dir():
        raise NotFound(f"lora_path '{lora_path}' is not a folder under '{base}'; pass an adapter folder "
                              "(a run's best/ folder)")
    if not (path / "adapter_model.safetensors").is_file():
        raise AdapterLoadError(f"'{lora_path}' holds no adapter_model.safetensors; lorafit loads adapters saved "
                               "as safetensors only (PEFT's save_pretrained writes them)")
    return path
