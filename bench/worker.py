"""Run one measurement, in this process or (``python bench/worker.py SPEC.json RESULT.json``) in a fresh one.

A fresh process per training run makes its peak resident memory its own, and keeps one run's
allocator state, caches and threads from colouring the next.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, load_average
from bench.fixtures import Setup


def _registry() -> dict:
    from bench import classifier, cpu_cases, gpu, llm, lora_ops, profile_train, qlora, serve, shared

    return {
        "classifier/lorafit": classifier.run_lorafit,
        "classifier/peft": classifier.run_peft,
        "classifier/tokens": lambda setup, options: classifier.real_tokens(setup),
        "llm/lorafit": llm.run_lorafit,
        "llm/peft": llm.run_peft,
        "inference": cpu_cases.run_inference,
        "mixed": cpu_cases.run_mixed,
        "switching": cpu_cases.run_switching,
        "scaling": cpu_cases.run_scaling,
        "matmul": cpu_cases.run_matmul,
        "shared": shared.run_shared,
        "shared/steps": shared.time_steps,
        "gpu": gpu.run_gpu,
        "serve": serve.run_serve,
        "qlora": qlora.run_side,
        "profile": profile_train.measure,
        "lora_ops": lora_ops.run_lora_ops,
    }


def measure(name: str, setup: Setup, options: dict | None = None) -> dict:
    """The measurement's figures, or {"error": ...} when it failed (the suite carries on)."""
    started = time.perf_counter()
    load_before = load_average()
    try:
        result = _registry()[name](setup, options or {})
    except Exception as error:  # a broken case is reported, not fatal to the whole suite
        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {error}".splitlines()[0][:500]}
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["load_average"] = {"before": load_before, "after": load_average()}
    return result


def measure_in_subprocess(name: str, setup: Setup, options: dict, log_dir: Path, tag: str,
                          timeout: float = 3600, env: dict | None = None) -> dict:
    """``measure`` in a fresh Python process (environment ``env``, default this one's).

    Its output goes to ``log_dir/tag.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    spec = log_dir / f"{tag}.spec.json"
    out = log_dir / f"{tag}.result.json"
    out.unlink(missing_ok=True)
    spec.write_text(json.dumps({"name": name, "setup": setup.to_json(), "options": options}), encoding="utf-8")
    with open(log_dir / f"{tag}.log", "w", encoding="utf-8") as log:
        try:
            code = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(spec), str(out)], cwd=REPO,
                                  stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s (log: {log_dir / tag}.log)"}
    if not out.is_file():
        return {"error": f"worker exited with code {code} and no result (log: {log_dir / tag}.log)"}
    return json.loads(out.read_text(encoding="utf-8"))


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result = measure(spec["name"], Setup.from_json(spec["setup"]), spec.get("options"))
    Path(argv[1]).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
