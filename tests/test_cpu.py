"""lorafit.cpu: the fast-bf16 check against cpuinfo files, and the command's OpenMP wait policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafit.cpu import cpu_has_bf16

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
