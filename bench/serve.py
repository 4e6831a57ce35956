"""Serving: `lorafit serve` under concurrent clients, batching across adapters on and off, llama.cpp beside it.

One server process serves every adapter (SmolLM2 instruct adapters and MiniLM classifier adapters, two
bases in one server); the same server is then started with ``--max-batch 1`` (batching off: one request
at a time) and given the same load. The adapters carry random non-zero B (``init_lora_weights=False``,
B scaled down so the replies stay near the base model's, with their natural spread of lengths): speed
does not depend on what the adapter learned. Clients are asyncio coroutines in this process (the server
runs in its own), each on its own kept-alive HTTP/1.1 connection, sending its next request when the last
one is answered (closed loop), over loopback. Latency is per request, from sending it to the whole answer; throughput is
requests (and completion tokens) over the wall time of the whole load. The CPU seconds the clients and
the server used during each load are recorded, to show what the clients took from the server's cores.

The classifier's ceiling: the forward alone (no HTTP, no queue), one text at a time against the same texts
in 64-text batches, measured in this process before the servers start; the server cannot gain more from
batching than its forward does.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO, load_average
from bench.fixtures import REVIEWS_VALIDATION, Setup

LLM_TARGETS = ["q_proj", "v_proj"]
CLS_TARGETS = ["query", "value"]
CLIENT_ERRORS = (OSError, EOFError, asyncio.TimeoutError, asyncio.LimitOverrunError, ValueError, KeyError)
B_SCALE = 0.05  # keeps a random adapter's change small enough that replies still end on their own


def heldout_prompts() -> list[str]:
    """The built-in instruct task's 60 held-out prompts (its validation split)."""
    import lorafit

    path = Path(lorafit.__file__).parent / "builtin_data" / "instruct" / "validation.jsonl"
    return [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def review_texts(setup: Setup) -> list[str]:
    path = Path(setup.validation_file) if setup.smoke else REVIEWS_VALIDATION
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def make_adapters(base_dir: str, out: Path, count: int, task: str, r: int, seed: int) -> dict[str, Path]:
    """``count`` adapters of one base, each with random non-zero A and B, saved as lorafit saves a run's best/."""
    import torch

    from lorafit.config import LoraConfig
    from lorafit.inference.base_models import load_causal_lm, load_classifier
    from lorafit.model import get_lora_model
    from lorafit.inference.adapter_info import save_adapter_info

    prefix = "chat" if task == "causal-lm" else "cls"
    adapters = {f"{prefix}{i}": out / f"{prefix}{i}" for i in range(count)}
    if all((d / "adapter_model.safetensors").is_file() for d in adapters.values()):
        return adapters
    labels = {0: "negative", 1: "positive"}
    for i, (name, directory) in enumerate(adapters.items()):
        if task == "causal-lm":
            base = load_causal_lm(base_dir)
            config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=LLM_TARGETS, init_lora_weights=False,
                                task_type="CAUSAL_LM", base_model_name_or_path=base_dir)
            info = {"task": "causal-lm", "base_model": base_dir}
        else:
            base = load_classifier(base_dir, num_labels=2, id2label=labels, label2id={v: k for k, v in labels.items()})
            config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=CLS_TARGETS, init_lora_weights=False,
                                modules_to_save=["classifier"], task_type="SEQ_CLS", base_model_name_or_path=base_dir)
            info = {"task": "classification", "base_model": base_dir, "id2label": labels}
        torch.manual_seed(seed + i)
        model = get_lora_model(base, config)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.mul_(B_SCALE)
        model.save_pretrained(directory)
        save_adapter_info(directory, info)
    return adapters


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``lorafit serve`` in its own process on loopback; stopped with SIGTERM (it drains) on exit."""

    def __init__(self, adapters: dict[str, Path], max_batch: int, log: Path, threads: int | None,
                 startup_timeout: float = 600) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "lorafit", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                        "--max-batch", str(max_batch), "--max-queue", "4096"]
        for name, directory in adapters.items():
            self.command += ["--adapter", f"{name}={directory}"]
        self.log, self.threads, self.startup_timeout = log, threads, startup_timeout

    def __enter__(self) -> "Server":
        import httpx

        env = dict(os.environ)
        src = str(REPO / "src")
        env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else src
        if self.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log, "w", encoding="utf-8")
        started = time.perf_counter()
        self.process = subprocess.Popen(self.command, cwd=REPO, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)
        while True:
            if self.process.poll() is not None:
                self._close()
                tail = self.log.read_text(encoding="utf-8", errors="replace")[-1500:]
                raise RuntimeError(f"lorafit serve exited with code {self.process.returncode} before it was ready: {tail}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - started > self.startup_timeout:
                self.__exit__(None, None, None)
                raise RuntimeError(f"lorafit serve was not ready after {self.startup_timeout:.0f} s (log: {self.log})")
            time.sleep(0.5)
        self.startup_seconds = round(time.perf_counter() - started, 1)
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close()

    def _close(self) -> None:
        self._log_file.close()


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile by linear interpolation between order statistics (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def _drive(url: str, path: str, bodies: list[dict], clients: int) -> tuple[list[dict], float]:
    """Send every body with ``clients`` concurrent closed-loop clients; each answer with its latency."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    pending = list(enumerate(bodies))[::-1]
    answers: list[dict] = [{} for _ in bodies]

    async def client() -> None:
        connection = None
        while pending:
            index, body = pending.pop()
            started = time.perf_counter()
            for attempt in (1, 2):  # a kept-alive connection the server closed meanwhile is opened again once
                reused = connection is not None
                try:
                    connection = connection or await asyncio.open_connection(host, int(port))
                    status, content = await asyncio.wait_for(_post(*connection, url, path, body), 900)
                    answer = {"status": status, "body": json.loads(content) if content else None}
                    break
                except CLIENT_ERRORS as error:
                    if connection is not None:
                        connection[1].close()
                    connection = None
                    answer = {"status": None, "body": None, "exception": f"{type(error).__name__}: {error}"[:300]}
                    if not (reused and isinstance(error, EOFError)):
                        break
            answer["latency"] = time.perf_counter() - started
            answers[index] = answer
        if connection is not None:
            connection[1].close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return answers, time.perf_counter() - started


async def _post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, url: str, path: str,
                body: dict) -> tuple[int, bytes]:
    """One request on a kept-alive HTTP/1.1 connection: its status and body (the server sends Content-Length).

    The load's clients speak HTTP themselves: httpx's client spent more CPU per request than the
    classifier's forward, on the cores the server needs."""
    data = json.dumps(body).encode()
    host = url.removeprefix("http://")
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in head[1:])}
    return int(head[0].split(" ", 2)[1]), await reader.readexactly(int(headers["content-length"]))


def load(url: str, path: str, bodies: list[dict], clients: int, server_pid: int | None = None) -> dict:
    """Throughput, latency percentiles, errors, CPU seconds and every answer's output for one load."""
    before, client_cpu, server_cpu = load_average(), time.process_time(), cpu_seconds(server_pid)
    answers, wall = asyncio.run(_drive(url, path, bodies, clients))
    client_cpu, server_cpu = time.process_time() - client_cpu, _minus(cpu_seconds(server_pid), server_cpu)
    good = [a for a in answers if a["status"] == 200]
    errors = [a.get("exception") or f"HTTP {a['status']}: {json.dumps(a['body'])[:200]}"
              for a in answers if a["status"] != 200]
    latencies = [a["latency"] for a in good]
    completion = sum(((a["body"] or {}).get("usage") or {}).get("completion_tokens", 0) for a in good)
    result = {"requests": len(bodies), "clients": clients, "errors": len(errors), "error_examples": errors[:3],
              "wall_seconds": round(wall, 2), "requests_per_second": round(len(good) / wall, 3),
              "p50_latency_s": _round(percentile(latencies, 50)), "p99_latency_s": _round(percentile(latencies, 99)),
              "mean_latency_s": _round(sum(latencies) / len(latencies)) if latencies else None,
              "client_cpu_seconds": round(client_cpu, 3), "server_cpu_seconds": _round(server_cpu),
              "load_average": {"before": before, "after": load_average()}}
    if path != "/v1/classify":
        result["completion_tokens"] = completion
        result["completion_tokens_per_second"] = round(completion / wall, 2)
        result["outputs"] = [(a["body"]["choices"][0]["message"]["content"] if a["status"] == 200 else None)
                             for a in answers]
    else:
        result["outputs"] = [(a["body"]["data"][0]["label"] if a["status"] == 200 else None) for a in answers]
    return result


def cpu_seconds(pid: int | None) -> float | None:
    """User and system CPU seconds of a process so far (None without psutil)."""
    try:
        import psutil
    except ImportError:
        return None
    if pid is None:
        return None
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def _minus(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def forward_ceiling(adapters: dict[str, Path], texts: list[str], batch: int) -> dict:
    """Seconds per text of the classifier's forward alone: one text at a time, then in ``batch``-text batches."""
    import torch

    from lorafit.serving.classify import class_probabilities
    from lorafit.serving.engine import Engine

    engine = Engine(max_batch=batch)
    for name, directory in adapters.items():
        engine.add_adapter(name, directory)
    (served,) = [worker.served for worker in engine._workers.values()]
    names, texts = list(adapters), texts[:2 * batch]
    with torch.inference_mode():
        class_probabilities(served, names[:1], texts[:1])  # the first forward sets up kernels
        before, started = load_average(), time.perf_counter()
        for i, text in enumerate(texts):
            class_probabilities(served, [names[i % len(names)]], [text])
        one = (time.perf_counter() - started) / len(texts)
        started = time.perf_counter()
        for start in range(0, len(texts), batch):
            chunk = texts[start:start + batch]
            class_probabilities(served, [names[i % len(names)] for i in range(len(chunk))], chunk)
        batched = (time.perf_counter() - started) / len(texts)
    return {"texts": len(texts), "batch": batch, "one_at_a_time_ms_per_text": round(1000 * one, 2),
            "batched_ms_per_text": round(1000 * batched, 2), "ratio": round(one / batched, 3),
            "load_average": {"before": before, "after": load_average()}}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def chat_body(model: str, prompt: str, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0}


def run_serve(setup: Setup, options: dict) -> dict:
    from bench import serve_llama

    s = setup.sizes
    work = Path(setup.workdir) / "serve"
    chat = make_adapters(setup.llm_model, work / "llm-adapters", s.serve_llm_adapters, "causal-lm", s.r, seed=100)
    cls = make_adapters(setup.cls_model, work / "cls-adapters", s.serve_cls_adapters, "classification", s.r, seed=200)
    prompts, texts = heldout_prompts(), review_texts(setup)
    names, cls_names = list(chat), list(cls)
    llm_bodies = [chat_body(names[i % len(names)], prompts[i % len(prompts)], s.serve_max_tokens)
                  for i in range(s.serve_llm_requests)]
    cls_bodies = [{"model": cls_names[i % len(cls_names)], "input": [texts[i % len(texts)]]}
                  for i in range(s.serve_cls_requests)]
    reference_bodies = [chat_body(names[0], p, s.serve_max_tokens) for p in prompts[:s.serve_reference_prompts]]
    threads = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS") else None
    result = {"config": {
        "llm": f"{len(chat)} adapters on {Path(setup.llm_model).name}, r={s.r} on {'/'.join(LLM_TARGETS)}, "
               f"random A and B (B x {B_SCALE})",
        "classifier": f"{len(cls)} adapters on {Path(setup.cls_model).name}, r={s.r} on {'/'.join(CLS_TARGETS)} "
                      "+ a 2-class head, random",
        "llm_requests": s.serve_llm_requests, "baseline_llm_requests": s.serve_baseline_llm_requests,
        "llm_clients": s.serve_llm_clients, "max_tokens": s.serve_max_tokens,
        "cls_requests": s.serve_cls_requests, "cls_clients": s.serve_cls_clients, "cls_texts_per_request": 1,
        "max_batch": s.serve_max_batch, "server_threads": threads or "torch default (all cores)",
        "prompts": "the built-in instruct task's held-out prompts (validation split), chat template, greedy"}}
    result["classifier_forward_ceiling"] = forward_ceiling(cls, texts, s.serve_max_batch)
    adapters = {**chat, **cls}
    for variant, max_batch in (("batched", s.serve_max_batch), ("one_at_a_time", 1)):
        with Server(adapters, max_batch, work / f"server-{variant}.log", threads) as server:
            # one request per adapter first: the first forward of a shape sets up kernels and caches
            load(server.url, "/v1/chat/completions", [chat_body(n, prompts[0], 4) for n in names], 1)
            load(server.url, "/v1/classify", [{"model": n, "input": [texts[0]]} for n in cls_names], 1)
            bodies = llm_bodies if variant == "batched" else llm_bodies[:s.serve_baseline_llm_requests]
            pid = server.process.pid
            figures = {"startup_seconds": server.startup_seconds, "max_batch": max_batch,
                       "llm": load(server.url, "/v1/chat/completions", bodies, s.serve_llm_clients, pid),
                       "classify": load(server.url, "/v1/classify", cls_bodies, s.serve_cls_clients, pid)}
            if variant == "batched":
                figures["reference_prompts"] = load(server.url, "/v1/chat/completions", reference_bodies,
                                                    s.serve_llm_clients, pid)
        result[variant] = figures
    batched, single = result["batched"], result["one_at_a_time"]
    for kind in ("llm", "classify"):
        pairs = list(zip(batched[kind]["outputs"], single[kind]["outputs"]))  # the baseline's requests
        result[f"{kind}_same_output_fraction"] = round(sum(a == b and a is not None for a, b in pairs) / len(pairs), 4)
    for figures in (batched, single):
        for kind in ("llm", "classify"):
            figures[kind].pop("outputs")
    references = batched["reference_prompts"].pop("outputs")
    result["llama_cpp"] = serve_llama.reference(setup, chat[names[0]], prompts[:s.serve_reference_prompts],
                                                s.serve_max_tokens, work, lorafit_outputs=references)
    return result
