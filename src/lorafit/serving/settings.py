"""The settings of `lorafit serve`, importable without the server's dependencies (every command's
parser is built from them)."""

from __future__ import annotations

from dataclasses import dataclass

from lorafit.errors import LorafitError
from lorafit.training.settings import check_positive_int

API_KEY_ENV = "LORAFIT_API_KEY"


@dataclass
class ServeSettings:
    """How `lorafit serve` listens and queues. Every field is also a flag."""

    model: str | None = None
    """Base model for every --adapter, if not the one each was trained on; served alone without --adapter."""
    host: str = "127.0.0.1"
    """Address to listen on; 0.0.0.0 exposes the server to the network (set --api-key then)."""
    port: int = 8000
    """Port to listen on; 0 picks a free one."""
    api_key: str | None = None
    """Key clients must send as 'Authorization: Bearer KEY' on /v1/ endpoints; prefer the LORAFIT_API_KEY
    environment variable, which other users cannot read in the process list."""
    adapter_root: str | None = None
    """Folder under which /v1/load_lora_adapter may load adapters at run time; without it, run-time loading is off."""
    max_batch: int = 8
    """Most requests per model in one forward pass; 1 runs one request at a time."""
    max_queue: int = 256
    """Most requests waiting per base model; more are answered 503 with Retry-After."""
    max_body_bytes: int = 1_000_000
    """Largest request body accepted; bigger ones are answered 413."""
    shutdown_timeout: float = 30.0
    """Seconds a SIGTERM waits for in-flight requests before closing their connections."""

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_body_bytes"):
            check_positive_int(name, getattr(self, name))
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise LorafitError(f"--port must be 0 to 65535, got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise LorafitError("--api-key is empty; pass a key, or leave it out to serve without one")
        if self.shutdown_timeout < 0:
            raise LorafitError(f"--shutdown-timeout must be >= 0, got {self.shutdown_timeout}")
