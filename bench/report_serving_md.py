"""results.md's serving section: `lorafit serve` under concurrent clients, and the llama.cpp reference."""

from __future__ import annotations

from bench.markdown import fmt as _fmt, get as _get, ratio as _x, table as _table


def serving(case: dict | None, results: dict) -> list[str]:
    if not case:
        return []
    lines = ["## Serving: `lorafit serve` under concurrent clients", ""]
    update = next((u for u in reversed(results["meta"].get("updates", [])) if "serve" in u.get("cases", [])), None)
    if update:
        lines += [f"Measured by `{update['command'].strip()}` ({update['started']} to {update.get('finished', '?')}, "
                  f"lorafit commit {update.get('lorafit_commit')}), after the rest of this file.", ""]
    if "error" in case:
        return lines + [f"**error** {case['error']}", ""]
    c = case["config"]
    lines += [f"One server on loopback serving both bases: LLM {c['llm']}; classifier {c['classifier']}. "
              f"{c['llm_requests']} chat requests from {c['llm_clients']} concurrent clients ({c['prompts']}, "
              f"max_tokens {c['max_tokens']}), spread over the adapters in turn; {c['cls_requests']} classify requests "
              f"of {c['cls_texts_per_request']} text from {c['cls_clients']} clients. Batched: `--max-batch "
              f"{c['max_batch']}`; one at a time: the same server with `--max-batch 1`, given the first "
              f"{c.get('baseline_llm_requests', c['llm_requests'])} of the same chat requests (its rate is steady "
              "after the first few; replies are compared on those). Server threads: "
              f"{c['server_threads']}. Machine load: 1-minute load average before -> after each load, and "
              f"{_arrow(case.get('load_average'))} over the whole case; the clients share the server's cores, and a load over "
              "the machine's core count means other work shared them too (the server then had only part of them).", ""]
    rows = []
    for kind, title in (("llm", "LLM chat"), ("classify", "classifier")):
        for variant, name in (("batched", f"batched (max batch {c['max_batch']})"), ("one_at_a_time", "one at a time")):
            f = case.get(variant, {}).get(kind, {})
            rows.append([title, name, f.get("requests"), f.get("clients"), f.get("errors"), f.get("requests_per_second"),
                         f.get("completion_tokens_per_second", "-"), f.get("p50_latency_s"), f.get("p99_latency_s"),
                         f"{_fmt(f.get('client_cpu_seconds'))} / {_fmt(f.get('server_cpu_seconds'))}",
                         _arrow(f.get("load_average"))])
    lines += _table(["load", "server", "requests", "clients", "errors", "requests/s", "completion tokens/s",
                     "p50 latency s", "p99 latency s", "CPU s: clients / server", "load"], rows)
    figures = results.get("figures", {})
    lines += [f"Batched over one at a time: LLM requests/s {_x(figures.get('serve_llm_throughput_ratio'))}, completion "
              f"tokens/s {_x(figures.get('serve_llm_tokens_ratio'))}, p99 latency {_x(figures.get('serve_llm_p99_ratio'))}; "
              f"classifier requests/s {_x(figures.get('serve_classify_throughput_ratio'))}, p99 latency "
              f"{_x(figures.get('serve_classify_p99_ratio'))}. The server's CPU seconds per request, one at a time over "
              f"batched (what batching saves, whatever share of the cores the machine's other work left the server): "
              f"LLM {_x(figures.get('serve_llm_cpu_ratio'))}, classifier {_x(figures.get('serve_classify_cpu_ratio'))}. "
              f"Identical greedy replies batched and one at a time: "
              f"{_pct(case.get('llm_same_output_fraction'))} of LLM requests, "
              f"{_pct(case.get('classify_same_output_fraction'))} of classifier labels. Server start-up with every "
              f"adapter: {_get(case, 'batched', 'startup_seconds')} s / {_get(case, 'one_at_a_time', 'startup_seconds')} s.",
              ""]
    ceiling = case.get("classifier_forward_ceiling")
    if ceiling:
        lines += [f"The classifier's forward alone (no HTTP, no queue; {ceiling['texts']} of the same texts, before the "
                  f"servers start): {ceiling['one_at_a_time_ms_per_text']} ms per text one at a time, "
                  f"{ceiling['batched_ms_per_text']} ms per text in batches of {ceiling['batch']}: "
                  f"{_x(ceiling['ratio'])}, the most batching can gain on this CPU, where a forward costs about its "
                  f"tokens (load {_arrow(ceiling.get('load_average'))}).", ""]
    return lines + _llama_reference(case)

def _llama_reference(case: dict) -> list[str]:
    ref, ours = case.get("llama_cpp") or {}, _get(case, "batched", "reference_prompts") or {}
    lines = ["### llama.cpp reference (same run)", ""]
    if "skipped" in ref or "error" in ref:
        return lines + [f"Not run: {ref.get('skipped') or ref.get('error')}.", ""]
    lines += [f"The {ref.get('prompts')} held-out prompts, greedy, max_tokens {ref.get('max_tokens')}, with adapter "
              f"chat0. llama.cpp: llama-cpp-python, {ref.get('model')}, {ref.get('threads')} threads, one request at "
              f"a time; adapter: {ref.get('adapter')}. lorafit: the batched server above, "
              f"{ours.get('clients')} concurrent clients. Same replies: {ref.get('same_output_as_lorafit')}.", ""]
    rows = [["seconds for all prompts (model already loaded)", ours.get("wall_seconds"), ref.get("seconds")],
            ["completion tokens", ours.get("completion_tokens"), ref.get("completion_tokens")],
            ["completion tokens/s", ours.get("completion_tokens_per_second"), ref.get("completion_tokens_per_second")],
            ["p50 / p99 latency s", f"{_fmt(ours.get('p50_latency_s'))} / {_fmt(ours.get('p99_latency_s'))}", "-"],
            ["model load s", f"{_get(case, 'batched', 'startup_seconds')} (server start, both bases)",
             ref.get("load_seconds")],
            ["machine load", _arrow(ours.get("load_average")), _arrow(ref.get("load_average"))]]
    return lines + _table(["", "lorafit serve (batched)", "llama.cpp"], rows)

def _arrow(load: dict | None) -> str:
    if not load or not load.get("before") or not load.get("after"):
        return "-"
    return f"{load['before'][0]} -> {load['after'][0]}"

def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"
