"""The llama.cpp reference for the serving case: SmolLM2's Q4_1 GGUF with the same LoRA adapter, one request at
a time on two threads (llama-cpp-python), over the same held-out prompts, greedy, the same max_tokens.

The adapter becomes a GGUF LoRA file through `lorafit export --format gguf` when this lorafit has that
command, else through llama.cpp's own `convert_lora_to_gguf.py` when ``LLAMA_CPP_DIR`` names a llama.cpp
checkout; with neither, the base model runs alone and the result says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO, load_average
from bench.fixtures import Setup

THREADS = 2


def open_llama(**kwargs):
    """``llama_cpp.Llama(**kwargs)``; on a CPU with AMX, without llama.cpp's extra weight buffers (repacked
    weights): llama-cpp-python 0.3.36 built there crashes (segfault) in the first decode of SmolLM2's Q4_1 file
    with them, and runs it without them."""
    import llama_cpp
    from llama_cpp import llama as module

    if not _cpu_has_amx():
        return llama_cpp.Llama(**kwargs)
    defaults = module.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    module.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(**kwargs)
    finally:
        module.llama_cpp.llama_model_default_params = defaults


def _cpu_has_amx() -> bool:
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def reference(setup: Setup, adapter_dir: Path, prompts: list[str], max_tokens: int, work: Path,
              lorafit_outputs: list[str | None]) -> dict:
    if setup.smoke:
        return {"skipped": "smoke run: the tiny model has no GGUF"}
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install llama-cpp-python)"}
    from lorafit.inference.base_models import smollm2_gguf_path

    lora_path, adapter_note = adapter_gguf(adapter_dir, setup.llm_model, work / "llama-cpp")
    before = load_average()
    started = time.perf_counter()
    model = open_llama(model_path=str(smollm2_gguf_path()), lora_path=lora_path, n_ctx=1024, n_threads=THREADS,
                  n_threads_batch=THREADS, seed=0, verbose=False)
    load_seconds = time.perf_counter() - started
    outputs, completion = [], 0
    started = time.perf_counter()
    for prompt in prompts:
        answer = model.create_chat_completion(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                              temperature=0.0)
        outputs.append(answer["choices"][0]["message"]["content"])
        completion += answer["usage"]["completion_tokens"]
    seconds = time.perf_counter() - started
    same = sum(a == b for a, b in zip(outputs, lorafit_outputs))
    return {"model": f"{smollm2_gguf_path().name} (Q4_1)", "adapter": adapter_note, "threads": THREADS,
            "prompts": len(prompts), "max_tokens": max_tokens, "load_seconds": round(load_seconds, 2),
            "seconds": round(seconds, 2), "completion_tokens": completion,
            "completion_tokens_per_second": round(completion / seconds, 2),
            "same_output_as_lorafit": f"{same}/{len(prompts)} (Q4_1 weights against fp32: not expected to match)",
            "load_average": {"before": before, "after": load_average()}}


def adapter_gguf(adapter_dir: Path, base_dir: str, out: Path) -> tuple[str | None, str]:
    """A GGUF LoRA file of the adapter, and how it was made (or why the base runs alone)."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / "adapter.gguf"
    target.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    if _has_command("export", env):
        done = subprocess.run([sys.executable, "-m", "lorafit", "export", str(adapter_dir), "--format", "gguf",
                               "--output", str(target)], capture_output=True, text=True, env=env)
        if done.returncode == 0 and target.is_file():
            return str(target), "LoRA r=8 q/v, converted by `lorafit export --format gguf`"
        failure = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        export_note = f"`lorafit export --format gguf` failed ({failure[0][:200]}); "
    else:
        export_note = "this lorafit has no `export` command; "
    script = Path(os.environ.get("LLAMA_CPP_DIR", "/nonexistent")) / "convert_lora_to_gguf.py"
    if script.is_file():
        done = subprocess.run([sys.executable, str(script), str(adapter_dir), "--base", base_dir, "--outtype", "f32",
                               "--outfile", str(target)], capture_output=True, text=True, env=env)
        if done.returncode == 0 and target.is_file():
            return str(target), export_note + f"LoRA r=8 q/v converted by llama.cpp's {script.name}"
        failure = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, export_note + f"{script.name} failed ({failure[0][:200]}): base model alone"
    return None, export_note + "no llama.cpp checkout (LLAMA_CPP_DIR) for convert_lora_to_gguf.py: base model alone"


def _has_command(name: str, env: dict) -> bool:
    done = subprocess.run([sys.executable, "-m", "lorafit", name, "--help"], capture_output=True, text=True, env=env)
    return done.returncode == 0
