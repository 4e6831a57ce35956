"""Several processes (lorafit.training.distributed): `lorafit train` on two CPU processes (gloo), launched as
users do: `accelerate launch --multi_gpu --num_processes 2` (which, with no GPU visible, starts CPU processes;
accelerate's `--cpu` starts one) and `torchrun`; sharded evaluation and FSDP saves on two in-process groups.

A two-process run must train the adapter a one-process run trains (same global batch, dropout 0), count
steps and epochs over both processes, write its run folder once, and resume after SIGKILL to the result
of an uninterrupted two-process run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lorafit.training.distributed import share
from lorafit.training.loop import micro_batches
from test_cli import _train_or_fail, adapter_tensors, build_tiny_bert, built_once, make_rows, read_jsonl, write_rows

SRC = Path(__file__).resolve().parents[1] / "src"
# 30 examples in batches of 8: 4 steps an epoch, the last batch of 6 split 3 + 3
STEPS = 6
ARGS = ["--max-length", "32", "--batch-size", "8", "--max-steps", str(STEPS), "--eval-strategy", "steps",
        "--eval-steps", "3", "--lr", "0.01"]
# The two-process adapter differs from the one-process one only by float rounding: each process averages
# its half of the batch, the halves' gradients are averaged by gloo, and padding differs with the share.
# Measured: 1.3e-7 after 3 steps, 1.5e-7 after 6 (lora_B entries up to 0.035).
ADAPTER_TOLERANCE = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list, processes: int = 2, launcher: str = "accelerate", fsdp: int = 0) -> subprocess.Popen:
    """`lorafit train ARGS` on ``processes`` CPU processes started by accelerate or torchrun, on this worktree's
    code and a free port; ``fsdp``: accelerate's FSDP of that version (1 or 2), BERT's layers wrapped."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    if launcher == "accelerate":
        start = ["-m", "accelerate.commands.launch", *(fsdp_options(fsdp) if fsdp else ["--multi_gpu"]),
                 "--num_processes", str(processes),
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", str(free_port())]
    else:
        start = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(free_port())]
    command = [sys.executable, *start, "-m", "lorafit", "train", *map(str, args)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def fsdp_options(version: int) -> list[str]:
    """An FSDP config as `accelerate config` writes it for a BERT model, with its defaults otherwise."""
    options = ["--use_fsdp", "--fsdp_version", str(version), "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
               "--fsdp_transformer_layer_cls_to_wrap", "BertLayer"]
    if version == 1:  # accelerate's sync_module_states needs a GPU (lorafit says so on CPUs)
        options += ["--fsdp_use_orig_params", "true", "--fsdp_reshard_after_forward", "FULL_SHARD",
                    "--fsdp_sync_module_states", "false", "--fsdp_cpu_ram_efficient_loading", "false"]
    return options


def kill_at_first_checkpoint(process, run_dir: Path, steps: int) -> None:
    """SIGKILL a launched run (the launcher and every worker) once its first checkpoint is complete."""
    deadline = time.monotonic() + 300
    while not list(run_dir.glob("checkpoint-*/trainer_state.json")) and process.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    kill_tree(process.pid)
    process.communicate()
    assert not (run_dir / "README.md").exists(), "the run ended before it could be killed"
    assert not (run_dir / f"checkpoint-{steps}").exists()


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process under it at once, as a crash or an out-of-memory kill would: torchrun
    starts each worker in a session of its own, so killing the launcher's process group would leave them running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def launched(args: list, processes: int = 2, launcher: str = "accelerate", fsdp: int = 0) -> str:
    process = launch(args, processes, launcher, fsdp)
    try:
        out, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            kill_tree(process.pid)
    assert process.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    def build(root: Path) -> dict:
        # no dropout in the base model either: with it, each process would draw its own masks
        return {"model": build_tiny_bert(root / "model", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                "train": write_rows(root / "train.jsonl", make_rows(30, seed=1)),
                "validation": write_rows(root / "validation.jsonl", make_rows(9, seed=2))}

    return built_once("distributed_data", tmp_path_factory, build)


def run_args(data: dict, output: Path, *extra) -> list:
    return ["--model", data["model"], "--train-file", data["train"], "--validation-file", data["validation"],
            "--output-dir", output, *ARGS, *extra]


def assert_written_once(run: Path) -> None:
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [3, 6]  # one line per evaluation, not one per process
    assert (run / "best" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in run.iterdir()) == [
        ".lorafit.lock", "README.md", "best", "checkpoint-3", "checkpoint-6", "config.yaml", "curves.png",
        "metrics.jsonl"]  # no second best/, no temporaries left by a second writer


def test_shares_cover_a_batch_once_in_order():
    for count in range(0, 12):
        for parts in (1, 2, 3, 5):
            shares = [share(count, i, parts) for i in range(parts)]
            assert [i for s in shares for i in s] == list(range(count))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    rows = list(range(10, 17))  # 7 rows, 2 processes, 2 micro-batches each
    assert micro_batches(rows, 2, 0, 2) == [[10, 11], [12, 13]]
    assert micro_batches(rows, 2, 1, 2) == [[14, 15], [16]]
    assert micro_batches([10], 2, 1, 1) == [[]]  # a process with nothing still takes part, weighted 0


@pytest.mark.slow
def test_two_processes_train_the_adapter_one_process_trains(data, tmp_path):
    _train_or_fail(["train", *run_args(data, tmp_path / "one", "--lora-dropout", "0")])
    out = launched(run_args(data, tmp_path / "two", "--lora-dropout", "0"))
    one, two = tmp_path / "one", tmp_path / "two"
    assert_written_once(two)
    assert out.count("Adapter saved to") == 1  # the main process alone prints
    assert "train_samples_per_second" in out
    for step in (3, STEPS):
        a, b = adapter_tensors(one / f"checkpoint-{step}" / "adapter"), adapter_tensors(two / f"checkpoint-{step}" / "adapter")
        assert sorted(a) == sorted(b)
        # B starts at zero: training moved it, so the equality below says something
        assert max(b[k].abs().max().item() for k in b if "lora_B" in k) > 1e-3
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        assert diff <= ADAPTER_TOLERANCE, f"step {step}: adapters differ by {diff}"
    metrics_one, metrics_two = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    for r1, r2 in zip(metrics_one, metrics_two, strict=True):
        # epoch counts the examples of both processes: 3 steps of 8 of 30 examples is 0.75 of an epoch
        assert (r2["step"], r2["epoch"]) == (r1["step"], r1["epoch"])
        assert r2["accuracy"] == r1["accuracy"] and r2["confusion_matrix"] == r1["confusion_matrix"]
        assert r2["loss"] == pytest.approx(r1["loss"], abs=2e-6)  # gathered over both shares of validation
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], abs=2e-6)
    assert metrics_two[0]["epoch"] == 0.75


@pytest.mark.slow
def test_a_refusal_on_the_main_process_stops_every_process(data, tmp_path):
    # the main process alone checks the run folder: the others must stop with its error, not wait for it
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    process = launch(run_args(data, taken))
    try:
        out, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            kill_tree(process.pid)
    assert process.returncode != 0
    # rank 1 repeats rank 0's line; the two processes share one pipe, so their lines can run together
    refusal = f"lorafit train: error: output directory '{taken}' is not empty and was not made by lorafit"
    assert out.count(refusal) == 2 and out.count("lorafit train: error:") == 2, out[-3000:]
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_uninterrupted_result(data, tmp_path):
    # dropout on: each process's own random stream must come back from the checkpoint
    steps = 20
    args = ["--lora-dropout", "0.1", "--max-steps", steps, "--eval-steps", "4", "--save-strategy", "steps",
            "--save-steps", "2"]
    launched(run_args(data, tmp_path / "whole", *args), launcher="torchrun")
    killed = tmp_path / "killed"
    kill_at_first_checkpoint(launch(run_args(data, killed, *args), launcher="torchrun"), killed, steps)
    launched(["--output-dir", killed, "--resume"], launcher="torchrun")
    whole = tmp_path / "whole"
    assert read_jsonl(killed / "metrics.jsonl") == read_jsonl(whole / "metrics.jsonl")
    for adapter in ("best", f"checkpoint-{steps}/adapter"):
        a, b = adapter_tensors(whole / adapter), adapter_tensors(killed / adapter)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), adapter
    state = json.loads((killed / f"checkpoint-{steps}" / "trainer_state.json").read_text())["state"]
    assert (state["step"], state["epoch"]) == (steps, 5)  # 20 steps of 4 an epoch


# --- in-process groups: evaluation shards and FSDP saves, on two gloo processes ----------------------------
def on_two_processes(function, tmp_path: Path, *args) -> list:
    """``function(tmp_path, *args)`` on each of two gloo processes; each one's (JSON) result, in rank order."""
    torch.multiprocessing.spawn(_worker, args=(function, tmp_path, args), nprocs=2)
    return [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in range(2)]


def _worker(rank: int, function, tmp_path: Path, args: tuple) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=rank, world_size=2)
    try:
        result = function(tmp_path, *args)
    finally:
        torch.distributed.destroy_process_group()
    (tmp_path / f"result-{rank}.json").write_text(json.dumps(result))


def _pad(features: list[dict]) -> dict:
    width = max(len(f["input_ids"]) for f in features)
    ids = [f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features]
    batch = {"input_ids": torch.tensor(ids), "attention_mask": (torch.tensor(ids) != 0).long()}
    if isinstance(features[0]["labels"], list):
        batch["labels"] = torch.tensor([f["labels"] + [-100] * (width - len(f["labels"])) for f in features])
    else:
        batch["labels"] = torch.tensor([f["labels"] for f in features])
    return batch


def _examples(count: int, lm: bool) -> list[dict]:
    generator = torch.Generator().manual_seed(count)
    rows = []
    for i in range(count):
        ids = torch.randint(3, 100, (3 + i % 5,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100, -100, *ids[2:]] if lm else i % 3})
    return rows


EVAL_CASES = [(count, lm) for lm in (False, True) for count in (7, 1)]  # shares of 4 and 3; of 1 and none


def _evaluate(lm: bool, count: int) -> dict:
    from conftest import tiny_bert_cls, tiny_llama
    from lorafit import LoraConfig, get_lora_model
    from lorafit.tasks.causal_lm import evaluate_lm
    from lorafit.tasks.classification import evaluate_classifier

    base = tiny_llama() if lm else tiny_bert_cls(num_labels=3)
    model = get_lora_model(base, LoraConfig(r=4, target_modules=["query", "value", "q_proj", "v_proj"],
                                            init_lora_weights=False))
    if lm:
        return evaluate_lm(model, _examples(count, lm), _pad, batch_size=2)
    return evaluate_classifier(model, _examples(count, lm), _pad, batch_size=2, names=["a", "b", "c"])


def _evaluate_cases(tmp_path: Path) -> list[dict]:
    return [_evaluate(lm, count) for count, lm in EVAL_CASES]


def test_evaluation_sharded_over_two_processes_gives_one_process_metrics(tmp_path):
    both = on_two_processes(_evaluate_cases, tmp_path)
    assert both[0] == both[1]  # every process gets the whole result
    for (count, lm), sharded in zip(EVAL_CASES, both[0], strict=True):
        alone = _evaluate(lm, count)
        assert sharded.keys() == alone.keys()
        for key, value in alone.items():
            # each share's loss is summed in its own order: the same sum up to float rounding
            assert sharded[key] == (pytest.approx(value, abs=2e-6) if key in ("loss", "perplexity") else value), key
        # every example counted once: no share repeated to even the shares out
        examples = _examples(count, lm)
        assert (sharded["tokens"] == sum(len(e["input_ids"]) - 2 for e in examples) if lm
                else sum(map(sum, sharded["confusion_matrix"])) == count)


def _train_one_step(model, sharded=None) -> None:
    from conftest import make_batch

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    (sharded or model)(**make_batch()).logits.square().mean().backward()
    optimizer.step()


def _lora_bert():
    from conftest import tiny_bert_cls
    from lorafit import LoraConfig, get_lora_model

    return get_lora_model(tiny_bert_cls(), LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))


def _fsdp_train_and_save(tmp_path: Path) -> list[list]:
    """One step under FSDP1 (flat parameters, accelerate's default fsdp_version) and under FSDP2 (fully_shard),
    each adapter saved gathered; the shapes each process held, sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    from lorafit.training.distributed import on_main_process
    from lorafit.training.sharding import whole_model

    held = []
    for version in (1, 2):
        model = _lora_bert()
        shapes = {"default": model.adapter_shapes()}  # whole, before sharding, as the training loop takes them
        if version == 1:
            sharded = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
        else:
            sharded = fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
        _train_one_step(model, sharded)
        factor = model.get_submodule("model.bert.encoder.layer.0.attention.self.query.lora_A.default").weight
        held.append(list((factor.to_local() if version == 2 else factor).shape))
        with whole_model(sharded):
            on_main_process(lambda: model.save_pretrained(tmp_path / f"fsdp{version}", expected_shapes=shapes))
    return held


def test_fsdp_trained_lora_saves_the_whole_adapter(tmp_path):
    held = on_two_processes(_fsdp_train_and_save, tmp_path)
    # each process held a part of each factor (4 x 32): FSDP1 a flat slice (all or none of this one), FSDP2 rows
    assert held == [[[128], [2, 32]], [[0], [2, 32]]]
    initial = _lora_bert()
    initial.save_pretrained(tmp_path / "initial")
    alone = _lora_bert()
    _train_one_step(alone)
    alone.save_pretrained(tmp_path / "alone")
    a, start = adapter_tensors(tmp_path / "alone"), adapter_tensors(tmp_path / "initial")
    assert all(not torch.equal(a[k], start[k]) for k in a)  # the step moved every factor
    for version in (1, 2):
        b = adapter_tensors(tmp_path / f"fsdp{version}")
        assert sorted(a) == sorted(b) and all(a[k].shape == b[k].shape for k in a)
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        assert diff <= 1e-6, f"FSDP{version}: {diff}"  # gradients averaged over two processes' equal batches
