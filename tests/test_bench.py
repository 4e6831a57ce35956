"""The benchmark suite (bench/) in its smoke mode: tiny models built from configs, seconds, no downloads.

The full suite is a benchmark (``python bench/run.py``), never a timed test: these tests check that
every case runs and produces numbers, and that the report states every target with a verdict.
"""

from __future__ import annotations

import importlib.util
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

    for side in ("lorafit", "peft", "peft_grouped", "lorafit_all_linear", "peft_all_linear"):
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
    for variants in (cases["inference"]["variants"], cases["inference"]["all_linear"]["variants"]):
        for variant in ("lorafit_unmerged", "lorafit_merged", "peft_unmerged"):
            assert _positive(variants[variant]["ratio"])
    for mixed in (cases["mixed"], cases["mixed"]["all_linear"]):
        for side in ("lorafit", "peft"):
            assert _positive(mixed[side]["mixed_4"]["ratio"]) and _positive(mixed[side]["mixed_16"]["ratio"])
    assert _positive(cases["switching"]["lorafit_set_adapter_ms"]) and _positive(cases["switching"]["reload_base_ms"])
    scaling = cases["scaling"]
    assert list(scaling["by_rank"]) == ["1", "4", "16", "64"] and len(scaling["by_length"]) == 4
    assert all(_positive(v["lorafit"]["median_ms"]) and _positive(v["peft"]["median_ms"])
               for v in [*scaling["by_rank"].values(), *scaling["by_length"].values()])
    assert _positive(cases["matmul"]["best_gflops"])
    shared = cases["shared"]
    assert shared["bound"] == 2.0 if shared["cores"] == 2 else shared["bound"] > 1
    for name, policy in shared["policies"].items():
        assert policy["wait_policy"] == name and policy["threads"] == shared["cores"]
        assert _positive(policy["alone_ms"]) and _positive(policy["spin_nice0_slowdown"])

    gpu = cases["gpu"]  # no CUDA here: the GPU suite's code ran on tiny configs on the CPU
    assert gpu["device"] in ("cpu", "cuda")
    for figure in (gpu["classifier"]["samples_per_second"], gpu["llm"]["tokens_per_second"]):
        assert _positive(figure["lorafit"]) and _positive(figure["peft"])
    assert _positive(gpu["inference"]["variants"]["lorafit_merged"]["ratio"])
    instruct = gpu["instruct"]  # a whole epoch of chat data: lorafit's packed loop vs PEFT + Trainer
    assert instruct["data"]["examples"] == 24 and instruct["data"]["longest"] > 1.3 * instruct["data"]["median_length"]
    assert _positive(instruct["tokens_per_second"]["lorafit"]) and _positive(instruct["tokens_per_second"]["peft"])
    assert _positive(instruct["speedup_vs_peft"]) and instruct["target"] == ">= 1.5x"
    assert "packed" in instruct["lorafit"]["batch"]
    # the same weights and tokens: one epoch at lr 2e-4 leaves both mean losses at the random model's
    assert abs(instruct["lorafit"]["train_loss"] - instruct["peft"]["train_loss"]) < 0.05

    serve = cases["serve"]  # lorafit serve in a subprocess, batched and one request at a time
    has_psutil = importlib.util.find_spec("psutil") is not None  # the server's CPU time is read through it
    for variant in ("batched", "one_at_a_time"):
        for kind, requests in (("llm", 12), ("classify", 24)):
            load = serve[variant][kind]
            assert load["requests"] == requests and load["errors"] == 0, load
            assert _positive(load["requests_per_second"]) and load["p99_latency_s"] >= load["p50_latency_s"] > 0
            assert load["client_cpu_seconds"] >= 0  # the clients speak HTTP themselves: a few ms here
            assert _positive(load["server_cpu_seconds"]) if has_psutil else load["server_cpu_seconds"] is None
        assert _positive(serve[variant]["llm"]["completion_tokens_per_second"])
    assert serve["batched"]["max_batch"] == 8 and serve["one_at_a_time"]["max_batch"] == 1
    assert "skipped" in serve["llama_cpp"]
    ceiling = serve["classifier_forward_ceiling"]
    assert ceiling["texts"] == 16 and _positive(ceiling["ratio"]) and _positive(ceiling["batched_ms_per_text"])

    for side in ("classifier_lorafit", "classifier_peft", "llm_lorafit", "llm_peft"):
        profile = cases["profile"][side]
        assert "matmul" in profile["categories"] and abs(sum(c["share"] for c in profile["categories"].values()) - 1) < 1e-2
    for shape in cases["lora_ops"]["shapes"].values():
        assert all(_positive(shape[v]["ratio"]) for v in ("lora_A", "lora_B", "unmerged", "merged_weight", "three_A",
                                                       "fused_A"))

    from lorafit.cpu import cpu_has_bf16

    assert len(results["targets"]) == 20
    # a GPU figure needs a CUDA machine; bf16 runs only where the CPU computes it fast
    elsewhere = {"GPU instruction tuning"} | (set() if cpu_has_bf16() else {"classifier accuracy, bf16"})
    for t in results["targets"]:
        if any(t["target"].startswith(name) for name in elsewhere):
            assert t["measured"] is None and t["pass"] is None, t
        else:
            assert t["measured"] is not None and t["pass"] in (True, False), t
    assert _positive(results["gflops"]["classifier_lorafit"]["gflops"])

    markdown = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "SMOKE RUN" in markdown and "transformers" in markdown and "## Serving" in markdown
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
        "classifier": {"lorafit": median(samples_per_second=95.0, peak_rss_mb=900.0, accuracy=0.90),
                       "peft": median(samples_per_second=30.0, peak_rss_mb=1000.0, accuracy=0.905),
                       "peft_grouped": median(samples_per_second=70.0, peak_rss_mb=1000.0, accuracy=0.90),
                       "lorafit_bf16": median(samples_per_second=120.0, peak_rss_mb=900.0, accuracy=0.885)},
        "inference": {"variants": {"lorafit_unmerged": {"ratio": 1.04}, "lorafit_merged": {"ratio": 1.02}},
                      "all_linear": {"variants": {"lorafit_unmerged": {"ratio": 1.08}}}},
        "mixed": {"lorafit": {"mixed_4": {"ratio": 1.02}, "mixed_16": {"ratio": 1.2}},
                  "all_linear": {"lorafit": {"mixed_16": {"ratio": 1.09}}}},
        "switching": {"lorafit_set_adapter_ms": 0.5},
        "llm": {"lorafit": median(tokens_per_second=100.0, peak_rss_mb=3000.0),
                "peft": median(tokens_per_second=55.0, peak_rss_mb=3400.0)},
        "gpu": {"device": "cuda", "instruct": {"speedup_vs_peft": 1.6}},
        "shared": {"bound": 2.0, "policies": {"PASSIVE": {"spin_nice19_slowdown": 1.1, "spin_nice0_slowdown": 2.2}}},
        "serve": {"batched": {"llm": {"errors": 0, "requests_per_second": 2.9, "p99_latency_s": 9.0},
                              "classify": {"errors": 0, "requests_per_second": 60.0, "p99_latency_s": 1.0}},
                  "one_at_a_time": {"llm": {"errors": 0, "requests_per_second": 1.0, "p99_latency_s": 8.0},
                                    "classify": {"errors": 1, "requests_per_second": 10.0, "p99_latency_s": 2.0}}}}}
    verdicts = {t["target"]: t["pass"] for t in derive(results)["targets"]}
    assert verdicts["classifier samples/s vs PEFT + Trainer (article)"] is True  # 3.17x
    assert verdicts["classifier samples/s vs PEFT + Trainer, group_by_length"] is False  # 1.36x
    assert verdicts["classifier final accuracy vs PEFT"] is True  # -0.5 points
    assert verdicts["classifier accuracy, bf16 autocast vs fp32 (CPUs with fast bf16)"] is False  # -1.5 points
    assert verdicts["GPU instruction tuning (length spread, chat template, padding-free) tokens/s vs PEFT + "
                    "Trainer"] is True  # 1.6x
    assert verdicts["inference, lorafit merged vs base model"] is False
    assert verdicts["16-adapter mixed batch vs single-adapter batch"] is False
    assert verdicts["inference, all-linear, lorafit unmerged vs base model"] is False  # 1.08x
    assert verdicts["16-adapter mixed batch vs single-adapter batch, all-linear"] is True  # 1.09x
    assert verdicts["LLM training tokens/s vs PEFT + Trainer"] is False  # 1.82x
    assert verdicts["LLM training peak memory vs PEFT"] is True
    assert verdicts["training beside one busy process (nice 19 or 0) vs alone"] is False  # 2.2x on 2 cores
    assert verdicts["serving: LLM requests/s, batched vs one at a time"] is False  # 2.9x
    assert verdicts["serving: LLM p99 latency, batched vs one at a time"] is False  # 1.125x
    assert verdicts["serving: classifier requests/s, batched vs one at a time"] is True  # 6x
    assert verdicts["serving: errors under load (LLM and classifier, batched and one at a time)"] is False


def test_update_replaces_only_the_cases_it_runs(bench, tmp_path):
    earlier = {"meta": {"command": "python bench/run.py", "started": "then"},
               "cases": {"classifier": {"kept": 1}, "serve": {"old": 1}}, "targets": [], "figures": {}}
    (tmp_path / "results.json").write_text(json.dumps(earlier), encoding="utf-8")
    meta = {"command": "python bench/run.py --cases serve --update", "started": "now", "cases": ["serve"],
            "load_average_start": [1.0, 1.0, 1.0], "versions": {"lorafit_commit": "abc"}}
    results = bench.run.earlier_results(tmp_path, meta)
    assert results["cases"] == earlier["cases"] and "targets" not in results
    assert results["meta"]["started"] == "then" and results["meta"]["updates"][0]["cases"] == ["serve"]
    with pytest.raises(SystemExit, match="--update needs an earlier"):
        bench.run.earlier_results(tmp_path / "none", meta)


def test_the_bf16_probe_is_skipped_without_fast_bf16(bench, monkeypatch):
    """Without AVX512-BF16/AMX one bf16 probe took minutes: it is not run there, and the report says so."""
    import lorafit.cpu
    from bench import cpu_cases
    from bench.fixtures import Sizes
    from bench.report import gflops
    from bench.report_md import _gflops

    monkeypatch.setattr(lorafit.cpu, "cpu_has_bf16", lambda: False)
    setup = type("S", (), {"sizes": Sizes.smoke()})()
    result = cpu_cases.run_matmul(setup, {})
    assert "bf16_best_gflops" not in result and "no fast bf16" in result["bf16_skipped"]
    assert _positive(result["best_gflops"])
    assert "bf16 not probed: this CPU has no fast bf16" in "\n".join(_gflops(gflops({"cases": {"matmul": result}})))


def test_a_slow_matmul_probe_keeps_within_its_budget(bench):
    """A dtype with no fast kernel (here: float64 with a 50 ms budget) gets a smaller n and fewer calls."""
    import time

    import torch

    from bench.common import matmul_peak_gflops

    started = time.perf_counter()
    # the budget, not the repeats, must end the calls: on an idle machine 50 small calls fit in 50 ms
    result = matmul_peak_gflops(n=4096, repeats=100_000, dtype=torch.float64, budget_s=0.05)
    assert time.perf_counter() - started < 2.0
    assert result["n"] < 4096 and 1 <= result["calls"] < 100_000 and _positive(result["best_gflops"])
