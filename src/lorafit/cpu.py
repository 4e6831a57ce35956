"""What this CPU offers (fast bf16) and how a lorafit command shares its cores with other work.

Standard library only: ``lorafit/__init__.py`` runs ``choose_thread_policy`` before anything imports
torch, because the OpenMP runtime torch loads (libgomp) reads its settings once, when it is loaded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import MutableMapping, Sequence

# the CPU flags under which torch's CPU autocast computes in bf16 at speed (Linux /proc/cpuinfo names)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")

WAIT_POLICY = "OMP_WAIT_POLICY"
"""OpenMP's variable for what idle worker threads do: PASSIVE sleeps, ACTIVE spins on a core."""

COMMAND_WAIT_POLICY = "PASSIVE"
"""The policy a lorafit command runs with unless its environment already sets one.

libgomp's own default lets a thread that finished its share spin (up to ~300,000 polls) before it
sleeps. On cores another process also wants, a spinning thread takes the time slice the thread it
waits for needs, and a training step can take many times longer; a sleeping one hands the core back.
"""


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX); False where /proc/cpuinfo is missing."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[-1].split()}
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def started_as_command(argv: Sequence[str] | None = None, orig_argv: Sequence[str] | None = None) -> bool:
    """Whether this process is the ``lorafit`` command (its console script, or ``python -m lorafit``).

    A program that merely imports lorafit as a library keeps its own OpenMP settings.
    """
    argv = sys.argv if argv is None else argv
    orig_argv = getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv
    script = Path(argv[0]).stem if argv and argv[0] else ""
    module = [orig_argv[i + 1] for i, arg in enumerate(orig_argv[:-1]) if arg == "-m"][:1]
    return script == "lorafit" or module == ["lorafit"]


def choose_thread_policy(environ: MutableMapping[str, str] | None = None) -> str:
    """Set the command's OpenMP wait policy unless the environment already chose one; returns the policy."""
    environ = os.environ if environ is None else environ
    if not environ.get(WAIT_POLICY, "").strip():
        environ[WAIT_POLICY] = COMMAND_WAIT_POLICY
    return environ[WAIT_POLICY]
