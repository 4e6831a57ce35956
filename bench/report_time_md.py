"""results.md's sections on where the time goes: achieved GFLOP/s, the operator profile, the LoRA branch's own operations."""

from __future__ import annotations

from bench.markdown import ratio, table as _table


def profile(case: dict | None) -> list[str]:
    """Where the training time goes: operator self time by category, each side's short profiled run."""
    if not case:
        return []
    sides = [s for s in ("classifier_lorafit", "classifier_peft", "llm_lorafit", "llm_peft") if "categories" in
             case.get(s, {})]
    if not sides:
        return ["## Where the time goes", "", *(f"- {s}: **error** {v.get('error')}" for s, v in case.items()), ""]
    labels = sorted({c for s in sides for c in case[s]["categories"]},
                    key=lambda c: -max(case[s]["categories"].get(c, {}).get("share") or 0 for s in sides))
    rows = [[label, *(_share(case[s]["categories"].get(label)) for s in sides)] for label in labels]
    rows.append(["operator time (s) / wall time (s)",
                 *(f"{case[s]['operator_seconds']} / {case[s]['wall_seconds']}" for s in sides)])
    first = case[sides[0]]
    return (["## Where the time goes", "",
             "torch.profiler's operator self time by category (`bench/profile_train.py`, which also prints the "
             "top operators and Python phases), for a short run of each side under the profiler: classifier "
             f"{case.get('classifier_lorafit', first).get('examples')} examples, LLM "
             f"{case.get('llm_lorafit', first).get('examples')} examples, with evaluation and saving; share of "
             "the side's operator time (and seconds).", ""]
            + _table(["category", *(s.replace("_", " ") for s in sides)], rows))

def _share(entry: dict | None) -> str:
    if not entry or entry.get("share") is None:
        return "-"
    return f"{100 * entry['share']:.1f}% ({entry['seconds']:.2f})"

def gflops(g: dict) -> list[str]:
    if not g.get("matmul_peak_gflops"):
        return []
    bf16 = f" (bf16: {g['bf16_peak_gflops']} GFLOP/s)" if g.get("bf16_peak_gflops") else ""
    if g.get("bf16_skipped"):
        bf16 = f" (bf16 not probed: {g['bf16_skipped']})"
    lines = ["## Achieved GFLOP/s", "", f"fp32 matmul peak measured on this machine: {g['matmul_peak_gflops']} "
             f"GFLOP/s{bf16}, the best of the suite's start and end ({g.get('matmul_peaks_start_end')}). "
             f"Useful work: {g['formula']} (see notes).", ""]
    rows = [[k, v["gflops"], (f"{100 * v['of_peak']:.1f}%" if v.get("of_peak") else "-")
             + (" of bf16's" if v.get("peak") == "bf16" else "")]
            for k, v in g.items() if isinstance(v, dict)]
    return lines + _table(["run", "GFLOP/s", "of peak"], rows)


def lora_ops(case: dict | None) -> list[str]:
    """The unmerged update's two rank-r products beside the base GEMM, per layer shape (bench/lora_ops.py)."""
    if not case or "shapes" not in case:
        return ["### The LoRA branch, operation by operation", "", f"**error** {case.get('error')}", ""] if case else []
    rows = []
    for name, entry in case["shapes"].items():
        base = entry["base"]["median_ms"]
        rows.append([f"{name}: {entry['in']} -> {entry['out']}", f"{base:.3f}",
                     *(f"{entry[v]['median_ms']:.3f} ({ratio(entry[v].get('ratio'))})"
                       for v in ("lora_A", "lora_B", "unmerged", "merged_weight", "three_A", "fused_A"))])
    return (["### The LoRA branch, operation by operation", "",
             f"One Linear of each shape in the classifier base over {case['tokens']} tokens (the inference case's "
             f"batch), r={case['r']}, {case['threads']} threads; milliseconds and ratio to the base layer, medians "
             "of interleaved rounds. `lora_A` = `x @ A.T`, `lora_B` = `y.addmm_(h, B.T)` (lorafit's fused in-place "
             "update), `unmerged` = all three (the training path), `merged_weight` = one GEMM on `W0 + s B A` built "
             "for the forward (the path without a graph, lorafit.fast.lora_update); `three_A` / `fused_A`: the A "
             "factors of three layers reading one input (query, key, value), as three matmuls or one. Each rank-r product does about r/in or r/out of "
             "the base's arithmetic but streams a whole activation through memory (x for A, y for B): that, not "
             "arithmetic, is an unmerged adapter's overhead on a CPU.", ""]
            + _table(["layer (in -> out)", "base ms", "lora_A", "lora_B", "unmerged", "merged_weight", "three_A",
                      "fused_A"], rows))
