"""Tests for `lorafit serve` as a command: argument errors in one line with exit code 2 before anything
loads, and a real server process that answers, then finishes an in-flight request on SIGTERM and exits 0."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from lorafit.cli import build_parser, settings_from_args
from lorafit.serving.settings import ServeSettings
from lorafit.training.settings import field_docs
from test_cli import assert_one_line_error, run_cli
from test_serve_app import PROMPT, served  # noqa: F401

TIMEOUT = 60


def test_help_has_examples_and_every_setting(capsys):
    code, out, _ = run_cli(capsys, "serve", "--help")
    assert code == 0 and "lorafit serve --adapter poet=runs/a/best" in out
    compact = " ".join(out.split())
    for name, doc in field_docs(ServeSettings).items():
        assert f"--{name.replace('_', '-')}" in compact and doc in compact, name
    assert "--adapter NAME=DIR" in compact
    code, out, _ = run_cli(capsys)
    assert re.search(r"^\s+serve\s", out, re.M)


def test_other_commands_do_not_need_the_servers_dependencies():
    """Every command's parser is built with serve's flags: building it must not import FastAPI or uvicorn,
    which only the serve extra installs."""
    code = ("import sys; from lorafit.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'uvicorn', 'starlette')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_serve_without_the_serve_extra_is_one_line_naming_it(served):
    """With FastAPI and uvicorn missing, `serve` says which extra to install; `--help` still works."""
    blocked = "import sys; sys.modules.update(dict.fromkeys(('fastapi', 'uvicorn', 'starlette')))"
    code = blocked + "; from lorafit.cli import main; sys.exit(main(sys.argv[1:]))"
    run = [sys.executable, "-c", code]
    helped = subprocess.run(run + ["--help"], capture_output=True, text=True, timeout=TIMEOUT)
    assert helped.returncode == 0 and "serve" in helped.stdout, helped.stderr
    refused = subprocess.run(run + ["serve", "--adapter", f"a={served.a}", "--port", "0"], capture_output=True,
                             text=True, timeout=TIMEOUT)
    assert refused.returncode == 2 and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "pip install 'lorafit[serve]'" in refused.stderr


def test_flags_build_the_settings_with_loopback_defaults():
    parser = build_parser()
    assert settings_from_args(parser.parse_args(["serve"]), ServeSettings) == ServeSettings()
    assert ServeSettings().host == "127.0.0.1" and ServeSettings().port == 8000
    args = parser.parse_args(["serve", "--adapter", "a=x", "--adapter", "b=y", "--port", "9000", "--max-batch", "3",
                              "--max-queue", "5", "--adapter-root", "r", "--host", "0.0.0.0"])
    assert args.adapter == ["a=x", "b=y"]
    assert settings_from_args(args, ServeSettings) == ServeSettings(port=9000, max_batch=3, max_queue=5,
                                                                    adapter_root="r", host="0.0.0.0")


@pytest.mark.parametrize("args, fragments", [
    (["--adapter", "{a}"], ["needs a name", "NAME=DIR"]),
    (["--adapter", "=x"], ["needs a name"]),
    (["--adapter", "x={missing}"], ["does not exist"]),
    (["--adapter", "__base__={a}"], ["reserved"]),
    (["--adapter", "x={a}", "--adapter", "x={b}"], ["two adapters are named 'x'"]),
    ([], ["nothing to serve", "--adapter NAME=DIR"]),
    (["--adapter", "x={a}", "--port", "70000"], ["--port"]),
    (["--adapter", "x={a}", "--port", "eighty"], ["--port", "invalid int"]),
    (["--adapter", "x={a}", "--max-batch", "0"], ["--max-batch", "positive"]),
    (["--adapter", "x={a}", "--max-queue", "-1"], ["--max-queue"]),
    (["--adapter", "x={a}", "--adapter-root", "{missing}"], ["--adapter-root", "not a folder"]),
    (["--adapter", "x={a}", "--api-key", " "], ["--api-key"]),
    (["--adapter", "x={a}", "--host", "192.0.2.1"], ["cannot listen on 192.0.2.1", "--host"]),
    (["--adapter", "x={a}", "--frobnicate"], ["unrecognized arguments"]),
])
def test_bad_arguments_are_one_line_with_exit_code_2(capsys, served, tmp_path, args, fragments):
    args = [a.format(a=served.a, b=served.b, missing=tmp_path / "missing") for a in args]
    code, out, err = run_cli(capsys, "serve", *args)
    assert_one_line_error(code, err, *fragments)
    assert out == ""


def test_an_adapter_that_cannot_load_is_one_line(capsys, served, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_bytes((served.a / "adapter_config.json").read_bytes())
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    code, out, err = run_cli(capsys, "serve", "--adapter", f"a={served.a}", "--adapter", f"x={tmp_path / 'broken'}",
                             "--port", "0")
    assert_one_line_error(code, err, "'x'")


def test_port_in_use_is_one_line_before_any_model_loads(capsys, served):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        started = time.monotonic()
        code, out, err = run_cli(capsys, "serve", "--adapter", f"a={served.a}", "--port", port)
    finally:
        taken.close()
    assert_one_line_error(code, err, f"port {port}", "in use", "--port")
    assert time.monotonic() - started < 10


def start_server(args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`python -m lorafit serve ARGS --port 0` in a subprocess, and its URL once it says it is serving."""
    process = subprocess.Popen([sys.executable, "-m", "lorafit", "serve", *args, "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    deadline = time.monotonic() + TIMEOUT
    line = ""
    while "http://" not in line:
        line = process.stdout.readline()
        if not line and process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the server did not start: {process.stderr.read()}")
    url = re.search(r"http://\S+", line)[0]
    threading.Thread(target=process.stderr.read, daemon=True).start()  # keep its log from filling the pipe
    return process, url


@pytest.mark.slow  # a whole process: importing torch and loading the models take most of its 15-30 s here
def test_sigterm_finishes_the_request_in_flight_then_exits_0(served):
    process, url = start_server(["--adapter", f"a={served.a}"], env={"LORAFIT_API_KEY": "k"})
    headers = {"Authorization": "Bearer k"}
    try:
        assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200
        assert httpx.get(url + "/v1/models", timeout=TIMEOUT).status_code == 401  # the key came from the env
        body = {"model": "a", "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=TIMEOUT) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            events.append(next(line for line in lines if line.startswith("data: ")))
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.TransportError):  # new connections are refused while it drains
                httpx.get(url + "/health", timeout=5)
            events += [line for line in lines if line.startswith("data: ")]
        assert process.wait(TIMEOUT) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(chunks) > 10  # streamed on after the signal, to the end
