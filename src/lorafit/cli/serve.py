"""Serve adapters behind an OpenAI-compatible HTTP server; requests for any adapter are batched together.

  lorafit serve --adapter poet=runs/a/best --adapter sst2=runs/b/best
  LORAFIT_API_KEY=secret lorafit serve --adapter poet=runs/a/best --host 0.0.0.0
  lorafit serve --model smollm2 --adapter-root runs      # adapters loaded at run time from runs/

Clients name an adapter (or a base model) as `model`: POST /v1/completions, /v1/chat/completions
(stream: true streams server-sent events), /v1/classify, GET /v1/models; /v1/load_lora_adapter and
/v1/unload_lora_adapter change the adapters without a restart. GET / is a playground page, /health
and /metrics (Prometheus) are for monitoring. SIGTERM or Ctrl-C finishes the requests in flight, then
exits."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
from pathlib import Path

from lorafit.cli import add_dataclass_flags, settings_from_args
from lorafit.cli.generate import parse_adapter_specs
from lorafit.errors import Interrupted, LorafitError
from lorafit.serving.settings import API_KEY_ENV, ServeSettings

NAME = "serve"
HELP = "serve adapters over an OpenAI-compatible HTTP API"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="an adapter to serve under NAME (clients pass it as `model`); repeat for more")
    add_dataclass_flags(parser, ServeSettings)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before any model is loaded so a taken port fails at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise LorafitError(f"--host '{host}' is not an address of this machine ({err.strerror}); "
                           "pass 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise LorafitError(f"port {port} on {host} is in use; pass another --port (0 picks a free one)") from None
        raise LorafitError(f"cannot listen on {host}:{port} ({err.strerror}); pass another --host or --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, ServeSettings)
    if settings.api_key is None and os.environ.get(API_KEY_ENV):
        settings = ServeSettings(**{**vars(settings), "api_key": os.environ[API_KEY_ENV]})
    specs = parse_adapter_specs(args.adapter, names_required=True)
    if not specs and settings.model is None:
        raise LorafitError("nothing to serve: pass --adapter NAME=DIR (repeat for more) or --model BASE")
    if settings.adapter_root is not None and not Path(settings.adapter_root).is_dir():
        raise LorafitError(f"--adapter-root '{settings.adapter_root}' is not a folder; pass the folder adapters "
                           "may be loaded from at run time")
    try:
        import uvicorn

        from lorafit.serving.app import create_app
    except ImportError as err:
        raise LorafitError(f"lorafit serve needs {err.name}: install the serve extra, "
                           "pip install 'lorafit[serve]'") from None
    from lorafit.serving.engine import Engine
    from lorafit.serving.metrics import Metrics

    sock = bind(settings.host, settings.port)
    if settings.api_key is None and not _loopback(sock.getsockname()[0]):
        print(f"lorafit serve: warning: listening on {settings.host} without an API key: anyone who can reach this "
              f"machine can use and change the served adapters; set {API_KEY_ENV}", file=sys.stderr)
    try:
        metrics = Metrics()
        engine = Engine(max_batch=settings.max_batch, max_queue=settings.max_queue, observer=metrics)
        for name, directory in specs.items():
            engine.add_adapter(name, directory, model=settings.model)
        if not specs:
            engine.add_base(settings.model)
        engine.start()
        app = create_app(engine, settings, metrics)
        host, port = sock.getsockname()[:2]
        names = ", ".join(e.id for e in engine.models())
        print(f"lorafit serve: {names} on http://{_url_host(host)}:{port} (Ctrl-C or SIGTERM to stop)", flush=True)
        config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=settings.shutdown_timeout,
                                access_log=False, log_config=None)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        server = uvicorn.Server(config)
        try:
            server.run(sockets=[sock])
        except (Interrupted, KeyboardInterrupt):
            # uvicorn shut down gracefully on the signal, then raised it again for the previous handler
            pass
        if server.started:
            return 0
        return 2
    finally:
        sock.close()


def _loopback(address: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(address.split("%")[0]).is_loopback


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
