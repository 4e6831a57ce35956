"""The benchmark suite (bench/) in its smoke mode: tiny models built from configs, seconds, no downloads.

The full suite is a benchmark (``python bench/run.py``), never a timed test: these tests check that
every case runs and produces numbers, and that the report states every target with a verdict.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# PEFT itself refuses mixed-adapter batches through RoBERTa's classification head (the GPU suite's model)
EXPECTED_ERRORS = {("gpu", "mixed", "peft")}


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    import bench.run

    return bench


def _errors(data, path=()) -> set[tuple]:
    found = set()
    if isinstance(data, dict):
        if "error" in data:
            found.add(path)
        for key, value in data.items():
            found |= _errors(value, path + (key,))
    elif isinstance(data, list):
        for item in data:
            found |= _errors(item, path)
    return found


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def test_smoke_suite_produces_every_figure(bench, tmp_path):
    assert bench.run.main(["--smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    cases = results["cases"]
    assert _errors(cases) <= EXPECTED_ERRORS, _errors(cases)
    assert results["meta"]["smoke"] and results["meta"]["versions"]["peft"]

    for side in ("lorafit", "peft", "peft_grouped"):
        median = cases["classifier"][side]["median"]
        assert _positive(median["samples_per_second"]) and _positive(median["peak_rss_mb"])
        assert 0 <= median["accuracy"] <= 1
    assert cases["classifier"]["tokens"]["padded_over_real_random"] >= 1
    for side in ("lorafit", "peft"):
        assert _positive(cases["llm"][side]["median"]["tokens_per_second"])
        assert _positive(cases["llm"][side]["median"]["peak_rss_mb"])
    for side in ("fp32", "lorafit-4bit", "peft"):
        assert _positive(cases["qlora"][side]["median"]["tokens_per_second"])
        assert _positive(cases["qlora"][side]["median"]["train_peak_rss_mb"])
    for variant in ("lorafit_unmerged", "lorafit_merged", "peft_unmerged"):
        assert _positive(cases["inference"]["variants"][variant]["ratio"])
    for side in ("lorafit", "peft"):
        assert _positive(cases["mixed"][side]["mixed_4"]["ratio"]) and _positive(cases["mixed"][side]["mixed_16"]["ratio"])
    assert _positive(cases["switching"]["lorafit_set_adapter_ms"]) and _positive(cases["switching"]["reload_base_ms"])
    scaling = cases["scaling"]
    assert list(scaling["by_rank"]) == ["1", "4", "16", "64"] and len(scaling["by_length"]) == 4
    assert all(_positive(v["lorafit"]["median_ms"]) and _positive(v["peft"]["median_ms"])
               for v in [*scaling["by_rank"].values(), *scaling["by_length"].values()])
    assert _positive(cases["matmul"]["best_gflops"])

    gpu = cases["gpu"]  # no CUDA here: the GPU suite's code ran on tiny configs on the CPU
    assert gpu["device"] in ("cpu", "cuda")
    for figure in (gpu["classifier"]["samples_per_second"], gpu["llm"]["tokens_per_second"]):
        assert _positive(figure["lorafit"]) and _positive(figure["peft"])
    assert _positive(gpu["inference"]["variants"]["lorafit_merged"]["ratio"])

    assert len(results["targets"]) == 11
    assert all(t["measured"] is not None and t["pass"] in (True, False) for t in results["targets"])
    assert _positive(results["gflops"]["classifier_lorafit"]["gflops"])

    markdown = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "SMOKE RUN" in markdown and "transformers" in markdown
    for t in results["targets"]:
        assert t["target"] in markdown
    assert markdown.count("PASS") + markdown.count("FAIL") >= len(results["targets"])


def test_a_training_run_in_its_own_process(bench, tmp_path):
    """The full suite's path: one measurement in a fresh process, peak memory its own."""
    from bench.fixtures import Sizes, prepare
    from bench.worker import measure_in_subprocess

    setup = prepare(True, tmp_path / "work", Sizes.smoke())
    result = measure_in_subprocess("llm/peft", setup, {}, tmp_path / "logs", "t", timeout=300)
    assert "error" not in result, (tmp_path / "logs" / "t.log").read_text(encoding="utf-8")[-3000:]
    assert _positive(result["tokens_per_second"]) and _positive(result["peak_rss_mb"])


def test_targets_follow_the_ratios(bench):
    from bench.report import derive

    def median(**figures):
        return {"median": figures}

    results = {"cases": {
        "classifier": {"lorafit": median(samples_per_second=70.0, peak_rss_mb=900.0, accuracy=0.90),
                       "peft": median(samples_per_second=30.0, peak_rss_mb=1000.0, accuracy=0.905),
                       "peft_grouped": median(samples_per_second=60.0, peak_rss_mb=1000.0, accuracy=0.90)},
        "inference": {"variants": {"lorafit_unmerged": {"ratio": 1.04}, "lorafit_merged": {"ratio": 1.02}}},
        "mixed": {"lorafit": {"mixed_4": {"ratio": 1.02}, "mixed_16": {"ratio": 1.2}}},
        "switching": {"lorafit_set_adapter_ms": 0.5},
        "llm": {"lorafit": median(tokens_per_second=100.0, peak_rss_mb=3000.0),
                "peft": median(tokens_per_second=88.0, peak_rss_mb=3400.0)}}}
    verdicts = {t["target"]: t["pass"] for t in derive(results)["targets"]}
    assert verdicts["classifier samples/s vs PEFT + Trainer (article)"] is True  # 2.33x
    assert verdicts["classifier samples/s vs PEFT + Trainer, group_by_length"] is False  # 1.17x
    assert verdicts["classifier final accuracy vs PEFT"] is True  # -0.5 points
    assert verdicts["inference, lorafit merged vs base model"] is False
    assert verdicts["16-adapter mixed batch vs single-adapter batch"] is False
    assert verdicts["LLM training tokens/s vs PEFT + Trainer"] is False  # 1.14x
    assert verdicts["LLM training peak memory vs PEFT"] is True
