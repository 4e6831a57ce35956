"""The engine's text deltas turned into OpenAI's completion objects and server-sent-event chunks.

One HTTP request can ask for several generations (a list of prompts, ``n`` choices each); each is one
engine request. They are started together and the first delta of each is awaited before any byte is
sent, so a refusal (queue full, context too long) is still an HTTP status, not an event in a stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from lorafit.serving.errors import ServeError
from lorafit.serving.protocol import GENERIC_500, error_body, error_content

log = logging.getLogger("lorafit.serve")


@dataclass
class Choice:
    """One generation: its engine stream, the text so far and its counts."""

    index: int
    stream: Any  # the engine's async generator of deltas
    prompt_index: int = 0
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def take(self, delta) -> str:
        self.text.append(delta.text)
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.prompt_tokens, self.completion_tokens = delta.prompt_tokens, delta.completion_tokens
        return delta.text


@dataclass
class Reply:
    """What every chunk and object of one response shares."""

    kind: str  # "chat" or "text"
    model: str
    choices: list[Choice]
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = self.created or int(time.time())

    def usage(self) -> dict:
        # a prompt shared by n choices is counted once, as OpenAI counts it
        prompts = {c.prompt_index: c.prompt_tokens for c in self.choices}
        prompt = sum(prompts.values())
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def whole(self) -> dict:
        """The non-streamed response object."""
        if self.kind == "chat":
            choices = [{"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                        "logprobs": None, "finish_reason": c.finish_reason} for c in self.choices]
            obj = "chat.completion"
        else:
            choices = [{"index": c.index, "text": "".join(c.text), "logprobs": None,
                        "finish_reason": c.finish_reason} for c in self.choices]
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                "usage": self.usage()}

    def chunk(self, choice: Choice | None, text: str, finish_reason: str | None, first: bool = False,
              usage_field: bool = False, usage: dict | None = None) -> str:
        """One SSE event; ``choice`` None makes the usage-only chunk that ends a stream with include_usage
        (whose other chunks carry ``"usage": null``, as OpenAI's do)."""
        choices = []
        if choice is not None and self.kind == "chat":
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choices = [{"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        elif choice is not None:
            choices = [{"index": choice.index, "text": text, "logprobs": None, "finish_reason": finish_reason}]
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if usage_field:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def start(choices: list[Choice]) -> list:
    """The first delta of every choice, awaited together; on any refusal every stream is closed and
    the first error raised (a ServeError before anything else, so the client gets its status)."""
    async def first(choice: Choice):
        return await anext(choice.stream)

    tasks = [asyncio.ensure_future(first(c)) for c in choices]
    try:
        results = await asyncio.gather(*tasks, return_exceptions=True)
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close(choices)
        raise
    errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, StopAsyncIteration)]
    if errors:
        await close(choices)
        raise next((e for e in errors if isinstance(e, ServeError)), errors[0])
    return [None if isinstance(r, StopAsyncIteration) else r for r in results]


async def close(choices: list[Choice]) -> None:
    """Close every engine stream: the engine drops a closed request before its next decoding step."""
    for choice in choices:
        try:
            await choice.stream.aclose()
        except Exception:  # a stream that failed already has nothing left to release
            log.debug("closing a generation stream failed", exc_info=True)


async def collect(reply: Reply, firsts: list) -> dict:
    """Every choice generated to its end; the response object."""
    async def run(choice: Choice, delta) -> None:
        if delta is not None:
            choice.take(delta)
        async for delta in choice.stream:
            choice.take(delta)

    tasks = [asyncio.ensure_future(run(c, d)) for c, d in zip(reply.choices, firsts)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close(reply.choices)
    return reply.whole()


async def stream(reply: Reply, firsts: list, include_usage: bool,
                 on_first_token: Callable[[], None] | None = None) -> AsyncIterator[str]:
    """SSE events as OpenAI sends them: a chunk per delta per choice, the finish reason in the last chunk
    of each choice, a usage chunk if asked, then ``data: [DONE]``. Being closed or cancelled (the client
    went away) closes every engine stream, which stops their generation."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice, delta) -> None:
        try:
            if delta is not None:
                await queue.put((choice, delta))
            async for delta in choice.stream:
                await queue.put((choice, delta))
        except Exception as err:  # reported in the stream: the status line has gone already
            await queue.put((choice, err))
        finally:
            await queue.put((choice, None))

    tasks = [asyncio.ensure_future(pump(c, d)) for c, d in zip(reply.choices, firsts)]
    try:
        if reply.kind == "chat":  # OpenAI's first chunk of a choice names the role
            for choice in reply.choices:
                yield reply.chunk(choice, "", None, first=True, usage_field=include_usage)
        open_streams, first_token = len(tasks), True
        while open_streams:
            choice, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, Exception):
                yield _error_event(item)
                break
            else:
                text = choice.take(item)
                if first_token and text and on_first_token:
                    on_first_token()
                    first_token = False
                if text or item.finish_reason:
                    yield reply.chunk(choice, text, item.finish_reason, usage_field=include_usage)
        else:
            if include_usage:
                yield reply.chunk(None, "", None, usage_field=True, usage=reply.usage())
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close(reply.choices)


def _error_event(err: Exception) -> str:
    if isinstance(err, ServeError):
        body = error_content(err)[1]
    else:
        log.error("generation failed mid-stream: %s", err, exc_info=err)
        body = error_body(500, GENERIC_500, "internal_error")
    return f"data: {json.dumps(body)}\n\n"
