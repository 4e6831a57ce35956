"""results.md: the machine, the versions, every target with its verdict, and each case's table."""

from __future__ import annotations

from bench.markdown import fmt as _fmt, get as _get, ratio as _x, table as _table
from bench.report_serving_md import serving as _serving
from bench.report_time_md import gflops as _gflops, profile as _profile, lora_ops as _lora_ops


def render(results: dict) -> str:
    meta, cases = results["meta"], results["cases"]
    lines = ["# lorafit vs PEFT + Trainer: benchmark results", ""]
    if meta.get("smoke"):
        lines += ["**SMOKE RUN**: tiny random models and data; the figures only show the harness works.", ""]
    lines += [f"Command: `{meta['command'].strip()}` - {meta['started']} to {meta.get('finished', '?')}; "
              f"load average {meta.get('load_average_start')} at start, {meta.get('load_average_end')} at end. "
              f"Training runs: {meta['repeats']} per classifier variant, {meta['llm_repeats']} per LLM side, "
              f"alternated, each in {'its own process' if meta['isolated_processes'] else 'one shared process'}; "
              "medians shown.", ""]
    for case, origin in meta.get("carried", {}).items():  # cases this run did not measure, kept from an earlier one
        lines += [f"The `{case}` case was not run here: its figures are carried from {origin}.", ""]
    busiest = _max_load(results)
    # the suite's own threads keep the 1-minute load near their count; more than that is other work
    own = meta["machine"].get("torch_threads") or 1
    if busiest is not None and busiest > own + 0.5:
        lines += [f"**Noisy run**: other work shared these {meta['machine'].get('logical_cores')} cores (1-minute load "
                  f"average up to {busiest:.1f} during the measurements, where the suite's own {own} threads account "
                  f"for about {own}; see each run's load below). Figures taken at different loads are not comparable, "
                  "so ratios between separate training runs can be far off; the in-process cases (inference, mixed, "
                  "scaling) pair variants round by round and suffer less. Re-run on a quiet machine for figures to "
                  "judge the targets by.", ""]
    elif busiest is not None:
        lines += [f"Quiet run: the 1-minute load average stayed at or below {busiest:.1f}, the suite's own {own} "
                  "threads.", ""]
    lines += ["## Machine and versions", ""]
    lines += _table(["", ""], [[k, str(v)] for k, v in {**meta["machine"], **meta["versions"]}.items()])
    lines += ["## Targets", ""]
    lines += _table(["target", "goal", "measured", "result"],
                    [[t["target"], t["goal"], _fmt(t["measured"], 3),
                      {True: "PASS", False: "**FAIL**", None: "not measured"}[t["pass"]]] for t in results["targets"]])
    lines += _unmet(results["targets"])
    lines += _classifier(cases.get("classifier"))
    lines += _inference(cases)
    lines += _lora_ops(cases.get("lora_ops"))
    lines += _llm(cases.get("llm"))
    lines += _scaling(cases.get("scaling"))
    lines += _qlora(cases.get("qlora"))
    lines += _shared(cases.get("shared"))
    lines += _gflops(results.get("gflops", {}))
    lines += _profile(cases.get("profile"))
    lines += _serving(cases.get("serve"), results)
    elsewhere = results.get("gpu_elsewhere")
    if elsewhere:
        meta_gpu = elsewhere["meta"]
        lines += _gpu(elsewhere["gpu"], f"From `{elsewhere['file']}`, a separate run of "
                      f"`{meta_gpu['command'].strip()}` on {meta_gpu['machine'].get('gpu')} ({meta_gpu['started']}; "
                      f"torch {meta_gpu['versions'].get('torch')}, transformers {meta_gpu['versions'].get('transformers')}, "
                      f"peft {meta_gpu['versions'].get('peft')}, lorafit commit {meta_gpu['versions'].get('lorafit_commit')}).")
    else:
        lines += _gpu(cases.get("gpu"))
    lines += _notes()
    return "\n".join(lines) + "\n"


def _unmet(targets: list[dict]) -> list[str]:
    """Each target this run did not meet or could not measure, with what stands in its way (bench/obstacles.py)."""
    from bench.obstacles import OBSTACLES

    unmet = [t for t in targets if t["pass"] is not True]
    if not unmet:
        return []
    lines = ["### Targets not met here, and why", ""]
    for t in unmet:
        state = "not measured" if t["pass"] is None else f"measured {_fmt(t['measured'], 3)} against {t['goal']}"
        lines.append(f"- **{t['target']}** ({state}): {OBSTACLES.get(t['target'], 'no explanation recorded yet.')}")
    return lines + [""]


def _max_load(results: dict) -> float | None:
    """The highest 1-minute load average recorded by any measurement or at the suite's start and end.

    The `shared` case runs last, before the closing matmul probe, and makes load on purpose: the
    1-minute average after it says nothing about other work.
    """
    shared = "shared" in results["cases"]
    seen = [results["meta"].get("load_average_start"), None if shared else results["meta"].get("load_average_end")]

    def walk(data):
        if isinstance(data, dict):
            if isinstance(data.get("load_average"), dict):
                seen.extend(data["load_average"].values())
            for value in data.values():
                walk(value)
        elif isinstance(data, list):
            for item in data:
                walk(item)

    # the serving case loads the cores by design (a server and its clients) and reports its own load
    walk({k: v for k, v in results["cases"].items() if k != "serve" and not (shared and k in ("shared", "matmul_end"))})
    values = [v[0] for v in seen if v]
    return max(values) if values else None


def _loads(case: dict, side: str) -> str:
    """Each run's 1-minute load average before and after it: other work on the cores distorts a run."""
    runs = case.get(side, {}).get("runs", [])
    shown = [f"{r['load_average']['before'][0]}->{r['load_average']['after'][0]}" for r in runs
             if r.get("load_average", {}).get("before") and r["load_average"].get("after")]
    return ", ".join(shown) or "-"


def _errors(case: dict | None, sides) -> list[str]:
    return [f"- {side}: **error** {case[side]['error']}" for side in sides if case and "error" in case.get(side, {})]


def _classifier(case: dict | None) -> list[str]:
    if not case:
        return []
    sides = ("lorafit", "peft", "peft_grouped")
    m = {s: case.get(s, {}).get("median", {}) for s in sides}
    tokens = case.get("tokens", {})
    lines = ["## Classifier training", "",
             f"{tokens.get('examples')} training texts ({tokens.get('real_tokens')} tokens, mean "
             f"{tokens.get('mean_length')} at max length 64); random batches of 16 carry "
             f"{tokens.get('padded_over_real_random')}x their real tokens, length-grouped ones "
             f"{tokens.get('padded_over_real_grouped')}x. Trainer: the article's settings, then the same plus "
             "`train_sampling_strategy=\"group_by_length\"`. lorafit: `lorafit train` defaults (length-grouped "
             "batches) with the same hyperparameters.", ""]
    rows = []
    for key, label in (("samples_per_second", "samples/s"), ("train_seconds", "training time (s)"),
                       ("peak_rss_mb", "peak RSS (MiB)"), ("accuracy", "final validation accuracy")):
        a, b, c = m["lorafit"].get(key), m["peft"].get(key), m["peft_grouped"].get(key)
        rows.append([label, a, b, c, _x(a / b) if a and b else "-", _x(a / c) if a and c else "-"])
    rows.append(["machine load (1-min average before -> after each run)", *(_loads(case, s) for s in sides), "", ""])
    lines += _table(["figure", "lorafit", "PEFT + Trainer", "PEFT + Trainer (grouped)", "lorafit / PEFT",
                     "lorafit / grouped"], rows)
    return lines + _errors(case, sides) + _classifier_all_linear(case) + _classifier_bf16(case) + [""]


def _classifier_all_linear(case: dict) -> list[str]:
    sides = ("lorafit_all_linear", "peft_all_linear")
    if not any(s in case for s in sides):
        return []
    m = {s: case.get(s, {}).get("median", {}) for s in sides}
    rows = []
    for key, label in (("samples_per_second", "samples/s"), ("train_seconds", "training time (s)"),
                       ("peak_rss_mb", "peak RSS (MiB)"), ("accuracy", "final validation accuracy")):
        a, b = m["lorafit_all_linear"].get(key), m["peft_all_linear"].get(key)
        rows.append([label, a, b, _x(a / b) if a and b else "-"])
    rows.append(["machine load (1-min average before -> after each run)", *(_loads(case, s) for s in sides), ""])
    return (["", "The same runs with `target_modules=\"all-linear\"` (on BERT: query, key, value and every dense "
             "layer) on both sides (Trainer without length grouping):", ""]
            + _table(["figure", "lorafit all-linear", "PEFT + Trainer all-linear", "lorafit / PEFT"], rows)
            + _errors(case, sides))


def _classifier_bf16(case: dict) -> list[str]:
    sides = ("lorafit_bf16", "peft_bf16")
    if not any(s in case for s in sides):
        return []
    m = {s: case.get(s, {}).get("median", {}) for s in ("lorafit", *sides)}
    rows = []
    for key, label in (("samples_per_second", "samples/s"), ("train_seconds", "training time (s)"),
                       ("peak_rss_mb", "peak RSS (MiB)"), ("accuracy", "final validation accuracy")):
        a, b, fp32 = m["lorafit_bf16"].get(key), m["peft_bf16"].get(key), m["lorafit"].get(key)
        rows.append([label, a, b, fp32, _x(a / b) if a and b else "-", _x(a / fp32) if a and fp32 else "-"])
    rows.append(["machine load (1-min average before -> after each run)", *(_loads(case, s) for s in sides), "", "",
                 ""])
    return (["", "The article's runs under bf16 autocast (this CPU has AVX512-BF16/AMX): lorafit "
             "`--mixed-precision bf16`, Trainer `bf16=True`; weights, gradients and optimizer state stay fp32, "
             "evaluation runs in fp32:", ""]
            + _table(["figure", "lorafit bf16", "PEFT + Trainer bf16", "lorafit fp32", "lorafit / PEFT (bf16)",
                      "lorafit bf16 / fp32"], rows)
            + _errors(case, sides))


def _inference(cases: dict) -> list[str]:
    lines = []
    infer = cases.get("inference")
    if infer and "variants" in infer:
        lines += ["## Inference", "", f"Batch {infer['batch']} x {infer['tokens']} tokens, forward under "
                  "`torch.inference_mode()`; ratio = median of per-round ratios to the base model.", ""]
        lines += _inference_table(infer["variants"])
        if "all_linear" in infer:
            lines += ["LoRA on `all-linear` targets (on BERT: query, key, value and every dense layer) instead of "
                      "query/value:", ""] + _inference_table(infer["all_linear"]["variants"])
    elif infer:
        lines += ["## Inference", "", f"**error** {infer.get('error')}", ""]
    mixed = cases.get("mixed")
    if mixed and "lorafit" in mixed:
        lines += ["## Mixed-adapter batches", "", f"Batch {mixed['batch']} x {mixed['tokens']} tokens, 16 adapters "
                  "loaded; `single`: the active adapter alone, `same_adapter_names`: adapter_names naming one "
                  "adapter for every row, `mixed_N`: rows spread over N adapters.", ""]
        lines += _mixed_table(mixed)
        if "lorafit" in mixed.get("all_linear", {}):
            lines += ["LoRA on `all-linear` targets:", ""] + _mixed_table(mixed["all_linear"])
    elif mixed:
        lines += ["## Mixed-adapter batches", "", f"**error** {mixed.get('error')}", ""]
    switch = cases.get("switching")
    if switch:
        lines += ["## Switching adapters", ""]
        lines += _table(["operation", "median ms"], [[k, v] for k, v in switch.items()
                                                     if k.endswith("_ms") or k == "reload_over_switch" or k == "error"])
    return lines


def _shared(case: dict | None) -> list[str]:
    if not case or "policies" not in case:
        return ["## Sharing the cores", "", f"**error** {case.get('error')}", ""] if case else []
    lines = ["## Sharing the cores", "", f"lorafit classifier training step (batch {case['batch']} x {case['tokens']}, "
             f"{case['cores']} threads on {case['cores']} cores, median of {case['steps']} steps) alone and beside one "
             "busy Python process; one process per OpenMP wait policy (lorafit sets PASSIVE unless the environment "
             f"sets one). A slowdown proportional to the cores taken is at most {case['bound']}x.", ""]
    rows = []
    for name, p in case["policies"].items():
        if "error" in p:
            rows.append([name, f"**error** {p['error']}", "", "", "", ""])
            continue
        rows.append([name, p["alone_ms"], p["spin_nice19_ms"], _x(p["spin_nice19_slowdown"]), p["spin_nice0_ms"],
                     _x(p["spin_nice0_slowdown"])])
    return lines + _table(["OMP_WAIT_POLICY", "alone ms", "beside nice 19 ms", "slowdown", "beside nice 0 ms",
                           "slowdown"], rows)


def _inference_table(variants: dict) -> list[str]:
    return _table(["model", "median ms", "vs base", "95% interval"],
                  [[name, v["median_ms"], _x(v.get("ratio")) if "ratio" in v else "1.000x", _ci(v)]
                   for name, v in variants.items()])


def _mixed_table(mixed: dict) -> list[str]:
    lines = _table(["batch", "lorafit ms", "lorafit vs single", "95% interval", "PEFT ms", "PEFT vs single"],
                   [[n, mixed["lorafit"][n]["median_ms"], _x(mixed["lorafit"][n].get("ratio", 1.0)),
                     _ci(mixed["lorafit"][n]), _get(mixed, "peft", n, "median_ms"),
                     _x(_get(mixed, "peft", n, "ratio") or 1.0)]
                    for n in mixed["lorafit"]])
    if "error" in mixed.get("peft", {}):
        lines += [f"PEFT refused these mixed batches: {mixed['peft']['error']}", ""]
    return lines


def _int(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _ci(entry: dict) -> str:
    low_high = entry.get("ratio_ci95")
    return f"{low_high[0]:.3f}-{low_high[1]:.3f}" if low_high else "-"


def _llm(case: dict | None) -> list[str]:
    if not case:
        return []
    m = {s: case.get(s, {}).get("median", {}) for s in ("lorafit", "peft")}
    peft = m["peft"] or m["lorafit"]
    lines = ["## LLM instruction tuning", "",
             f"{_int(peft.get('examples'))} examples (lorafit's built-in instruction set), {_int(peft.get('real_tokens'))} "
             f"real tokens of which {_int(peft.get('scored_tokens'))} are scored, one epoch, batch 4, max length 256; "
             "tokens/s counts real tokens only.", ""]
    rows = []
    for key, label in (("tokens_per_second", "tokens/s"), ("train_seconds", "training time (s)"),
                       ("peak_rss_mb", "peak RSS (MiB)"), ("train_loss", "training loss")):
        a, b = m["lorafit"].get(key), m["peft"].get(key)
        rows.append([label, a, b, _x(a / b) if a and b else "-"])
    rows.append(["machine load (1-min average before -> after each run)", *(_loads(case, s) for s in ("lorafit", "peft")), ""])
    lines += _table(["figure", "lorafit", "PEFT + Trainer", "lorafit / PEFT"], rows)
    return lines + _errors(case, ("lorafit", "peft")) + [""]


def _scaling(case: dict | None) -> list[str]:
    if not case or "by_rank" not in case:
        return ["## Scaling", "", f"**error** {case.get('error')}", ""] if case else []
    lines = ["## Scaling (training step: forward, backward, AdamW; batch "
             f"{case['batch_size']}, unpadded)", ""]
    for key, label in (("by_rank", f"rank r (length {case['rank_at_length']})"),
                       ("by_length", f"sequence length (r={case['length_at_rank']})")):
        lines += _table([label, "lorafit ms", "PEFT ms", "lorafit / PEFT"],
                        [[k, v["lorafit"]["median_ms"], v["peft"]["median_ms"], _x(v["lorafit"].get("ratio"))]
                         for k, v in case[key].items()])
    return lines


def _qlora(case: dict | None) -> list[str]:
    if not case:
        return []
    from bench.qlora import summary_rows

    return ["", "### QLoRA: SmolLM2 on a 4-bit (nf4) base, against the fp32 base and PEFT's QLoRA", "",
            *summary_rows(case), ""]


def _gpu(case: dict | None, source: str = "") -> list[str]:
    if not case:
        return []
    if "skipped" in case:
        return ["## GPU", "", f"Skipped: {case['skipped']}.", ""]
    lines = ["## GPU suite", ""] + ([source, ""] if source else [])
    lines += [case.get("note", f"Device {case.get('device')}, {case.get('dtype')}, CUDA-event timing; "
                               "roberta-base and a Llama-3.2-1B shape with random weights from configs."), ""]
    if "error" in case:
        return lines + [f"**error** {case['error']}", ""]
    peak = case.get("matmul_peak", {})
    lines += [f"Matmul peak measured there: {peak.get('best_gflops')} GFLOP/s ({case.get('dtype')}).", ""]
    rows = []
    for key, label, unit in (("classifier", "roberta-base training, batch 16", "samples_per_second"),
                             ("llm", "Llama 1B shape training, batch 4 x 256 (q/v)", "tokens_per_second")):
        part = case[key]
        speed, step, memory = part[unit], part["step"], part["peak_memory_mb"]
        rows.append([f"{label}: {unit.replace('_', ' ')}", speed["lorafit"], speed["peft"],
                     _x(speed["lorafit"] / speed["peft"])])
        rows.append([f"{label}: step ms", step["lorafit"]["median_ms"], step["peft"]["median_ms"],
                     _x(step["lorafit"].get("ratio"))])
        if memory.get("lorafit"):
            rows.append([f"{label}: peak MiB", memory["lorafit"], memory["peft"], _x(memory["lorafit"] / memory["peft"])])
    instruct = case.get("instruct")
    if instruct and "tokens_per_second" in instruct:
        speed, memory = instruct["tokens_per_second"], (instruct["lorafit"].get("peak_memory_mb"),
                                                        instruct["peft"].get("peak_memory_mb"))
        label = f"instruction tuning ({instruct['chat_template']}, {instruct['data'].get('examples')} chats)"
        rows.append([f"{label}: tokens/s", speed["lorafit"], speed["peft"], _x(instruct["speedup_vs_peft"])])
        if all(memory):
            rows.append([f"{label}: peak MiB", memory[0], memory[1], _x(instruct.get("peak_memory_ratio"))])
    lines += _table(["figure", "lorafit", "PEFT", "lorafit / PEFT"], rows)
    demoted = _inference(case) + _scaling(case.get("scaling"))
    return lines + [("#" + line if line.startswith("## ") else line) for line in demoted]


def _notes() -> list[str]:
    return ["## How it is measured", "",
            "- Same machine, model, data and hyperparameters for both sides, in one run; training runs alternate "
            "lorafit, PEFT, PEFT grouped (classifier) and lorafit, PEFT (LLM), each in a fresh process.",
            "- Classifier samples/s = training examples / wall time of the training call. For Trainer that is "
            "`trainer.train()`, which includes its per-epoch evaluation, checkpoint save and best-model reload; "
            "lorafit's loop likewise evaluates and saves once per epoch (its own reported samples/s). Evaluation "
            "batch 16 on both sides.",
            "- lorafit runs with its defaults, which is where its lead comes from: batches of similar length "
            "(classifier), the last encoder layer computing only the [CLS] position the head reads, the LM head "
            "only at scored positions and a prompt prefix shared by a whole batch computed once, in one packed "
            "sequence with the rows' own tokens (LLM). Those three are exact (tests check logits and gradients "
            "against the plain computation). Length grouping changes which examples share a batch, as Trainer's "
            "group_by_length does. Dropout masks come from a quarter of the random numbers (same rates to "
            "1/65536), and fp32 CPU loops run without oneDNN, whose per-shape GELU kernel cache held ~120 MiB.",
            "- Peak memory = the process's peak resident set (`ru_maxrss`), libraries and data included.",
            "- Accuracy: the final (best) adapter on the validation set, evaluated after training.",
            "- LLM tokens/s = real (non-pad) tokens of the epoch / wall time of the training call; both sides "
            "train on the examples `lorafit.data.chat.tokenize_lm` builds (responses scored only).",
            "- Inference, mixed batches and scaling time every variant once per round, rotating the order; "
            "ratios are medians of per-round ratios, with a 95% bootstrap interval (this virtual machine's "
            "timings scatter by about 5% from call to call even when idle). Switching: median of `set_adapter` "
            "calls vs reloading the "
            "base model from disk.",
            "- GFLOP/s: 4 x P_matmul x real tokens / seconds (frozen base: forward 2PT + backward input "
            "gradients 2PT; attention score matmuls and LoRA FLOPs left out; the LLM's head counted at scored "
            "tokens only), against the best fp32 `torch.mm` 2048^3 rate measured at the suite's start and end.", ""]
