"""Sharing the cores: lorafit classifier training steps alone and beside one busy process.

One fresh process per OpenMP wait policy (libgomp reads it once, when torch loads it), each running as
many threads as the cores it may use. In it, the same training step is timed alone, then beside a
pure-Python busy loop at nice 19, then beside one at nice 0. One busy process takes one of c cores,
so a slowdown proportional to the cores taken is at most c / (c - 1): 2x on two cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.common import Clock, median
from bench.fixtures import Setup

POLICIES = {"PASSIVE": "PASSIVE", "unset": None, "ACTIVE": "ACTIVE"}
"""lorafit's policy, libgomp's default when nothing is set (spin ~300,000 polls, then sleep), always spin."""
LOADS = {"alone": None, "spin_nice19": 19, "spin_nice0": 0}
"""The background load during each timing: none, or one busy process at this niceness."""


def proportional_bound(cores: int) -> float:
    """The slowdown of a process using every core when one busy process takes a core (its fair share)."""
    return round(cores / (cores - 1), 3) if cores > 1 else 2.0


def run_shared(setup: Setup, options: dict) -> dict:
    """Per wait policy: step time alone and beside each load, and the slowdowns against alone."""
    from bench.worker import measure_in_subprocess

    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "OMP_NUM_THREADS": str(cores), "MKL_NUM_THREADS": str(cores)}
    policies = {}
    for name, policy in POLICIES.items():
        child_env = {k: v for k, v in env.items() if k != "OMP_WAIT_POLICY"}
        if policy:
            child_env["OMP_WAIT_POLICY"] = policy
        policies[name] = measure_in_subprocess("shared/steps", setup, {}, Path(setup.workdir) / "logs",
                                               f"shared-{name}", timeout=1800, env=child_env)
    return {"cores": cores, "bound": proportional_bound(cores), "steps": setup.sizes.shared_steps,
            "batch": setup.sizes.batch_size, "tokens": setup.sizes.max_length, "policies": policies}


def busy_process(niceness: int) -> subprocess.Popen:
    """A pure-Python busy loop at ``niceness``: another program wanting a whole core."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.nice(niceness))


def time_steps(setup: Setup, options: dict) -> dict:
    """This process's step time (forward, backward, AdamW) alone and beside each busy process."""
    import torch

    from bench import steps
    from bench.cpu_cases import TARGETS, load_base

    s = setup.sizes
    base = load_base(setup)
    model = steps.lorafit_model(base, "SEQ_CLS", s.r, TARGETS).train()
    batch = steps.random_batch(base, s.batch_size, s.max_length, labels="class")
    params = [p for p in model.parameters() if p.requires_grad]
    step = steps.train_step(model, batch, torch.optim.AdamW(params, lr=s.lr))
    clock = Clock()
    result = {"wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"), "threads": torch.get_num_threads()}
    for load, niceness in LOADS.items():
        busy = busy_process(niceness) if niceness is not None else None
        try:
            step()  # warm-up, and time for the busy process to get going
            result[f"{load}_ms"] = round(1000 * median(clock.time(step) for _ in range(s.shared_steps)), 2)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    for load in LOADS:
        if load != "alone":
            result[f"{load}_slowdown"] = round(result[f"{load}_ms"] / result["alone_ms"], 3)
    return result
