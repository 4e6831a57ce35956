"""Shared helpers: clocks, medians, memory, the machine's description and its fp32 matmul peak."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


class Clock:
    """Wall-clock timing of a callable: perf_counter on CPU, CUDA events (after a sync) on a GPU."""

    def __init__(self, device: str = "cpu") -> None:
        self.cuda = str(device).startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def time(self, fn: Callable[[], object]) -> float:
        """Seconds one call of ``fn`` takes."""
        if self.cuda:
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, warmup: int,
                clock: Clock) -> dict[str, list[float]]:
    """Time every variant once per round, rotating the order each round so drift hits all alike."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    clock.sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_number in range(rounds):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(clock.time(variants[name]))
    return times


def summarize(times: dict[str, list[float]], baseline: str | None = None) -> dict[str, dict]:
    """Median milliseconds per variant and, against ``baseline``, the median of per-round ratios.

    Per-round ratios pair measurements taken seconds apart, so slow drift in the machine's load
    cancels out of them better than out of a ratio of two medians. ``ratio_ci95`` is a bootstrap
    interval of that median: how far the figure could move on a rerun on this (noisy) machine.
    """
    out = {}
    for name, values in times.items():
        entry = {"median_ms": round(1000 * median(values), 3), "min_ms": round(1000 * min(values), 3),
                 "n": len(values)}
        if baseline is not None and name != baseline:
            ratios = [v / b for v, b in zip(values, times[baseline])]
            entry["ratio"] = round(median(ratios), 4)
            entry["ratio_ci95"] = bootstrap_median_ci(ratios)
        out[name] = entry
    return out


def bootstrap_median_ci(values: list[float], resamples: int = 2000, seed: int = 0) -> list[float]:
    """A 95% percentile-bootstrap interval for the median of ``values``."""
    import random

    rng = random.Random(seed)
    medians = sorted(median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return [round(medians[int(0.025 * resamples)], 4), round(medians[int(0.975 * resamples) - 1], 4)]


def matmul_peak_gflops(n: int = 2048, repeats: int = 10, device: str = "cpu", dtype=None,
                       budget_s: float | None = None) -> dict:
    """This machine's dense matmul peak: the best of ``repeats`` n x n x n torch.mm calls.

    With ``budget_s``, n is first halved until one call, timed at a small size and scaled by n^3,
    fits a tenth of the budget, and the calls stop once the budget is spent: a dtype the CPU has no
    fast kernel for (bf16 without AVX512-BF16) cannot hold up the suite.
    """
    import torch

    dtype = dtype or torch.float32
    clock = Clock(device)
    if budget_s is not None:
        n = _fitting_size(n, budget_s / 10, device, dtype, clock)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = [clock.time(lambda: torch.mm(a, b))]  # warm-up, and the first measure of the budget
    while len(times) <= repeats and (budget_s is None or sum(times) < budget_s):
        times.append(clock.time(lambda: torch.mm(a, b)))
    times = times[1:] or times
    flops = 2 * n ** 3
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "calls": len(times), "best_gflops": round(flops / min(times) / 1e9, 1),
            "median_gflops": round(flops / median(times) / 1e9, 1)}


def _fitting_size(n: int, seconds: float, device: str, dtype, clock: Clock, probe_n: int = 256) -> int:
    """The largest n (n halved from ``n``, at least ``probe_n``) whose n x n matmul should take ``seconds``."""
    import torch

    a = torch.randn(probe_n, probe_n, device=device, dtype=dtype)
    torch.mm(a, a)
    per_flop = min(clock.time(lambda: torch.mm(a, a)) for _ in range(3)) / (2 * probe_n ** 3)
    while n > probe_n and 2 * n ** 3 * per_flop > seconds:
        n //= 2
    return max(n, probe_n)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        return None


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    """HEAD's short hash, or BENCH_COMMIT where the tree was copied to another machine whose .git may differ."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    """The machine and the versions every figure was measured with."""
    import torch

    machine = {"cpu": _cpu_model(), "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "memory_gb": _memory_gb(), "os": platform.platform(), "python": platform.python_version()}
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(0)
    versions = {name: _version(name) for name in
                ("lorafit", "torch", "transformers", "peft", "accelerate", "datasets")}
    versions["lorafit_commit"] = _git_commit()
    return {"machine": machine, "versions": versions}


def python_command() -> list[str]:
    return [sys.executable]
