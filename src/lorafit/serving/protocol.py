"""The HTTP API's request bodies and error body, with OpenAI's and vLLM's field names.

Fields a client may send but lorafit cannot honour (logprobs, tools, penalties) are refused with a
400 naming them, rather than ignored: a client asking for logprobs would otherwise get none silently.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lorafit.errors import first_line
from lorafit.serving.errors import BadRequest, ServeError

log = logging.getLogger("lorafit.serve")

# Fields of OpenAI's API that lorafit does not implement, and the value a client sends when it means "off".
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None,), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
               "tool_choice": (None, "none"), "presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0)}
MAX_N = 16
MAX_STOP = 16


class _Request(BaseModel):
    # extra fields (user, metadata, ...) are accepted and ignored, as OpenAI's server does
    model_config = ConfigDict(extra="allow", strict=False)

    model: str = Field(min_length=1)

    def check_supported(self) -> None:
        for name, off in UNSUPPORTED.items():
            value = (self.model_extra or {}).get(name)
            if value is not None and value not in off:
                raise refusal(BadRequest, f"'{name}' is not supported by lorafit serve; leave it out", name)


class _Sampling(_Request):
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"give at most {MAX_STOP} non-empty stop strings")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Sampling):
    """POST /v1/completions: raw text in, continued as it is (no chat template)."""

    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # OpenAI's newer "developer" role is the system prompt of older chat templates
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Sampling):
    """POST /v1/chat/completions: messages, rendered with the model's chat template by the engine."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ClassifyRequest(_Request):
    """POST /v1/classify: vLLM's classification endpoint."""

    input: str | list[str]

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class LoadAdapterRequest(_Request):
    model: str | None = None
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(_Request):
    model: str | None = None
    lora_name: str = Field(min_length=1)


class MalformedJson(ServeError):
    """The body is not JSON (HTTP 400, as OpenAI answers it)."""

    code = "invalid_json"


class WrongTypes(ServeError):
    """The body is JSON but a field is missing or of the wrong type (HTTP 422)."""

    status = 422
    code = "invalid_type"


def refusal(cls: type[ServeError], message: str, param: str | None) -> ServeError:
    """An error naming the request field it is about (OpenAI's ``param``)."""
    err = cls(message)
    err.param = param
    return err


def parse_body(body: bytes, model: type[BaseModel]):
    """The request model of a JSON body, or MalformedJson / WrongTypes naming the first bad field."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MalformedJson(f"the request body is not valid JSON ({err}); send a JSON object") from None
    if not isinstance(data, dict):
        raise WrongTypes("the request body must be a JSON object")
    try:
        request = model.model_validate(data)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        # the field and its list indexes; pydantic adds the tried type of a union ("prompt.str"), a client did not
        path = [str(p) for p in first["loc"] if isinstance(p, int) or p in model.model_fields or p.isidentifier()]
        path = [p for p in path if p not in ("str", "list", "int", "float", "bool")] or [str(first["loc"][0])]
        param = ".".join(path)
        raise refusal(WrongTypes, f"'{param}': {first['msg']}", param) from None
    if isinstance(request, _Request):
        request.check_supported()
    return request


ERROR_TYPES = {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error"}


def error_body(status: int, message: str, code: str | None, param: str | None = None) -> dict:
    """OpenAI's error object: the openai package raises the exception class of ``status`` with it."""
    kind = "server_error" if status >= 500 else ERROR_TYPES.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


GENERIC_500 = "the server failed on this request; the error is in its log"


def error_content(err: Exception) -> tuple[int, dict]:
    """The status and OpenAI error body of a refusal; a failure of the model (500) is logged, and the
    client told only that it happened: exception texts can hold paths and internals."""
    status = getattr(err, "status", 400)
    message = first_line(err)
    if status == 500:
        log.error("request failed: %s", message)
        message = GENERIC_500
    return status, error_body(status, message, getattr(err, "code", "invalid_request"), getattr(err, "param", None))
