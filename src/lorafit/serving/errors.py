"""What the engine refuses, one class per HTTP answer the app gives (the app maps each to its status)."""

from __future__ import annotations

from lorafit.errors import LorafitError


class ServeError(LorafitError):
    """A request the engine refuses; the message names the problem and the fix, as every lorafit error."""

    status = 400
    code = "invalid_request"


class BadRequest(ServeError):
    """A value the engine cannot use (an empty prompt, a stop list too long)."""


class UnknownModel(ServeError):
    """``model`` names no served base or adapter."""

    status = 404
    code = "model_not_found"


class WrongTask(ServeError):
    """A classifier asked to generate, or a causal LM asked to classify."""

    code = "wrong_model_type"


class ContextTooLong(ServeError):
    """The prompt plus ``max_tokens`` (or a text to classify) is longer than the model's context."""

    code = "context_length_exceeded"


class QueueFull(ServeError):
    """The model's queue holds ``max_queue`` requests already; the app answers 503 with Retry-After."""

    status = 503
    code = "server_overloaded"


class ShuttingDown(ServeError):
    """The server is draining after SIGTERM: in-flight requests finish, new ones are refused."""

    status = 503
    code = "shutting_down"


class AdapterLoadError(ServeError):
    """An adapter that cannot be loaded (not a folder, no safetensors, damaged, other base's shapes).
    Served adapters are untouched."""

    code = "adapter_load_failed"


class ModelFailed(ServeError):
    """The model raised while running a batch: the requests in that batch fail with this, the worker goes on."""

    status = 500
    code = "internal_error"
