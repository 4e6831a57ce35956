"""lorafit.cpu: the fast-bf16 check against cpuinfo files, and the command's OpenMP wait policy (checked in
real `lorafit` processes at the moment torch is imported)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorafit.cpu import choose_thread_policy, cpu_has_bf16, started_as_command

SRC = Path(__file__).resolve().parent.parent / "src"

AVX2_ONLY = """processor\t: 0
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme sse sse2 avx avx2 fma bmi2
"""
BF16 = AVX2_ONLY.replace("bmi2", "bmi2 avx512f avx512_bf16")
AMX = AVX2_ONLY.replace("bmi2", "bmi2 amx_tile amx_bf16")


@pytest.mark.parametrize("text, expected", [(AVX2_ONLY, False), (BF16, True), (AMX, True),
                                            ("flags : avx512_bf16_lookalike\n", False),
                                            ("model name : avx512_bf16 in a name, not a flag\n", False)])
def test_fast_bf16_is_read_from_the_cpu_flags(tmp_path, text, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text, encoding="utf-8")
    assert cpu_has_bf16(cpuinfo) is expected


def test_no_cpuinfo_means_no_fast_bf16(tmp_path):
    assert cpu_has_bf16(tmp_path / "missing") is False


def test_this_machine_agrees_with_its_own_flags():
    text = Path("/proc/cpuinfo").read_text(encoding="utf-8") if Path("/proc/cpuinfo").is_file() else ""
    assert cpu_has_bf16() is (" avx512_bf16" in text or " amx_bf16" in text)


@pytest.mark.parametrize("argv, orig_argv, expected", [
    (["/home/u/.venv/bin/lorafit", "train"], ["/home/u/.venv/bin/python", "/home/u/.venv/bin/lorafit", "train"], True),
    (["/src/lorafit/__main__.py", "train"], ["python", "-m", "lorafit", "train"], True),
    (["-m"], ["python", "-m", "lorafit"], True),  # what argv[0] is while `-m` imports the package
    (["train.py"], ["python", "train.py"], False),
    (["/x/pytest"], ["python", "-m", "pytest", "tests"], False),
    (["-c"], ["python", "-c", "import lorafit"], False)])
def test_only_the_lorafit_command_counts_as_the_command(argv, orig_argv, expected):
    assert started_as_command(argv, orig_argv) is expected


@pytest.mark.parametrize("environ, expected", [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": ""}, "PASSIVE"),
                                               ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
                                               ({"OMP_WAIT_POLICY": "passive"}, "passive")])
def test_the_wait_policy_is_passive_unless_the_environment_chose(environ, expected):
    assert choose_thread_policy(environ) == expected and environ["OMP_WAIT_POLICY"] == expected


# Records OMP_WAIT_POLICY at the moment torch is first imported: that is the value libgomp reads.
RECORDER = '''
import os, sys

class _TorchImport:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            with open(os.environ["RECORD_WAIT_POLICY"], "w") as out:
                out.write(os.environ.get("OMP_WAIT_POLICY", "<unset>"))
        return None

sys.meta_path.insert(0, _TorchImport())
'''
# what pip writes for a [project.scripts] entry point
CONSOLE_SCRIPT = "import sys\nfrom lorafit.cli import main\nsys.exit(main())\n"


@pytest.mark.parametrize("launch, user_policy, expected", [
    ("module", None, "PASSIVE"), ("script", None, "PASSIVE"), ("module", "ACTIVE", "ACTIVE"),
    ("library", None, "<unset>")])
def test_the_command_sets_the_wait_policy_before_torch_loads(tmp_path, launch, user_policy, expected):
    (tmp_path / "sitecustomize.py").write_text(RECORDER, encoding="utf-8")
    (tmp_path / "lorafit").write_text(CONSOLE_SCRIPT, encoding="utf-8")
    record = tmp_path / "policy.txt"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), str(SRC)]), RECORD_WAIT_POLICY=str(record))
    if user_policy:
        env["OMP_WAIT_POLICY"] = user_policy
    command = {"module": ["-m", "lorafit", "--help"], "script": [str(tmp_path / "lorafit"), "--help"],
               "library": ["-c", "import lorafit"]}[launch]
    done = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert record.read_text(encoding="utf-8") == expected
