"""The training loop, on Hugging Face accelerate: steps, evaluation, checkpoints, best adapter, resume.

The loop knows nothing of the task: it is given examples, a collate function, a loss function and
an evaluation function. Data order is a pure function of (seed, epoch), so a resumed run replays
exactly the batches the interrupted one would have seen.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lorafit.fast import fast_section
from lorafit.training.accelerator import finish_trackers, make_accelerator
from lorafit.training.checkpoint import TrainState, load_newest_checkpoint, process_rng_states, save_checkpoint
from lorafit.training.optimizer import make_optimizer
from lorafit.data.classification import length_grouped_order
from lorafit.errors import Interrupted
from lorafit.files import replace_dir
from lorafit.model import LoraModel
from lorafit.training.distributed import on_main_process, share
from lorafit.training.run_dir import append_metrics, recover_run_dir, rewrite_metrics
from lorafit.training.settings import TrainConfig
from lorafit.training.sharding import ShardedModel, parameter_shapes, whole_model

LossFn = Callable[[LoraModel, dict], torch.Tensor]
EvalFn = Callable[[], dict]


@dataclass
class LoopResult:
    state: TrainState
    seconds: float
    samples_per_second: float
    peak_memory_mb: float | None
    model: ShardedModel  # as trained (under FSDP, sharded): the end of a run uses it whole (sharding.whole_model)


def seed_everything(seed: int) -> None:
    """Seed every global random stream a run may draw from: Python's, NumPy's and torch's (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy takes only 32-bit seeds; torch and Python take any integer
    torch.manual_seed(seed)


# Each epoch's data order has its own seed, so a resumed run rebuilds any epoch's batches from (seed, epoch)
# alone; seeds one apart give unrelated orders for runs of up to this many epochs.
EPOCHS_PER_SEED = 1000


def data_order_seed(seed: int, epoch: int) -> int:
    return seed * EPOCHS_PER_SEED + epoch


def epoch_batches(lengths: Sequence[int], config: TrainConfig, epoch: int) -> list[list[int]]:
    """The batches of one epoch: shuffled (and length-grouped if asked), deterministic per epoch."""
    generator = torch.Generator().manual_seed(data_order_seed(config.seed, epoch))
    if config.group_by_length:
        order = length_grouped_order(list(lengths), config.batch_size, generator)
    else:
        order = torch.randperm(len(lengths), generator=generator).tolist()
    return [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up to the peak learning rate, then linear decay to zero."""
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def total_steps_for(num_examples: int, config: TrainConfig) -> int:
    per_epoch = math.ceil(num_examples / config.batch_size)
    return config.max_steps or max(1, math.ceil(per_epoch * config.epochs))


def run_training(model: LoraModel, examples: Sequence[dict], collate: Callable, loss_fn: LossFn,
                 evaluate: EvalFn | None, config: TrainConfig, run_dir: Path,
                 on_evaluate: Callable[[dict], None] = lambda record: None,
                 weight: Callable[[dict], int] = lambda example: 1) -> LoopResult:
    """Train ``model``'s active adapter; returns when the step budget is spent (or the run is resumed to it).

    ``loss_fn`` gives a batch's mean loss and ``weight`` an example's share of it (1 for a mean over
    examples, its trained tokens for a mean over tokens), so that shares of a batch split over
    processes and micro-batches add up to the loss of the whole batch. With several processes every
    one calls this; only the main one writes into ``run_dir``. Under FSDP ``evaluate`` runs on the whole
    model (sharding.whole_model), and is called on every process.
    """
    accelerator = make_accelerator(config, run_dir)
    seed_everything(config.seed)  # dropout masks start from the seed; a resumed run restores the streams below
    lengths = [len(example["input_ids"]) for example in examples]
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_steps = total_steps_for(len(examples), config)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, total_steps, config.warmup_ratio)  # stepped once per step: not prepared
    shapes = {model.active_adapter: model.adapter_shapes()}  # whole, before FSDP may shard it: saves must match
    param_shapes = parameter_shapes(optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    # without accelerate's autocast around the model's forward: training steps compute in their own
    # accelerator.autocast(), evaluation and the end of the run in the weights' precision (fp32)
    lora_model: LoraModel = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    sharded = ShardedModel(model, lora_model, param_shapes)
    if sharded.version:
        print(f"FSDP{sharded.version}: each of the {accelerator.num_processes} processes holds a shard of the model")

    def save_adapter(directory: Path) -> None:
        lora_model.save_pretrained(directory, expected_shapes=shapes)

    state = TrainState()
    on_main_process(lambda: recover_run_dir(run_dir))
    if config.resume:
        found = load_newest_checkpoint(run_dir, lora_model, optimizer, scheduler, accelerator.scaler, sharded)
        if found:
            state = found[0]
            print(f"Resuming from {found[1].name} (step {state.step} of {total_steps})")
        else:
            print(f"No checkpoint in {run_dir} yet: training starts from step 0")
        # drop what a killed run logged after its newest checkpoint (or before its first)
        on_main_process(lambda: rewrite_metrics(run_dir, state.history))

    def evaluate_and_record(epoch_value: float, train_loss: float | None) -> None:
        record = {"step": state.step, "epoch": round(epoch_value, 4), "train_loss": train_loss}
        if evaluate is not None and config.eval_strategy != "no":
            model.eval()
            with whole_model(model):
                record.update(evaluate())  # every process takes part: evaluation is sharded and gathered
                score = record.get(config.metric)
                if score is not None and _is_better(score, state.best_metric, config.metric):
                    state.best_metric, state.best_step = score, state.step
                    on_main_process(lambda: replace_dir(run_dir / "best", save_adapter))
            model.train()
        state.history.append(record)
        on_main_process(lambda: append_metrics(run_dir, record))
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=state.step)
        on_evaluate(record)

    model.train()
    start, samples = time.perf_counter(), 0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    progress = tqdm(total=total_steps, initial=state.step, desc="training", unit="step",
                    disable=not accelerator.is_main_process, dynamic_ncols=True)
    # the bar is closed first, so that an interruption's message starts a line of its own
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
    with fast_section(lora_model, compute_dtype), _interrupt_names_step(state, run_dir), progress:
        while state.step < total_steps:
            for rows in epoch_batches(lengths, config, state.epoch)[state.batch_in_epoch:]:
                loss = train_step(accelerator, model, examples, rows, collate, loss_fn, weight, config)
                if config.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.batch_in_epoch += 1
                samples += len(rows)
                state.window_loss += loss
                state.window_steps += 1
                elapsed = time.perf_counter() - start
                progress.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples / elapsed:.1f}")
                progress.update(1)
                epoch_end = state.batch_in_epoch == steps_per_epoch
                done = state.step >= total_steps
                at_eval = _due(config.eval_strategy, config.eval_steps, state.step, epoch_end, done)
                at_save = _due(config.save_strategy, config.save_steps, state.step, epoch_end, done)
                if epoch_end:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                if at_eval or (done and config.eval_strategy == "no"):
                    mean_loss = state.window_loss / max(1, state.window_steps)
                    state.window_loss, state.window_steps = 0.0, 0
                    evaluate_and_record(state.step / steps_per_epoch, round(mean_loss, 6))
                if at_save:
                    rng = process_rng_states()  # every process's, gathered by all
                    moments = sharded.optimizer_state(optimizer)  # under FSDP gathered by all
                    with whole_model(model):
                        on_main_process(lambda: save_checkpoint(run_dir, save_adapter, optimizer, scheduler, state,
                                                                config.keep_checkpoints, rng, accelerator.scaler,
                                                                moments))
                if done:
                    break
    finish_trackers(accelerator)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return LoopResult(state, seconds, samples / seconds if seconds else 0.0, peak, sharded)


def micro_batches(rows: list[int], processes: int, index: int, accumulation: int) -> list[list[int]]:
    """Process ``index``'s micro-batches of one batch: its contiguous share, cut into ``accumulation`` parts.
    Some may be empty when the batch has fewer rows than processes times micro-batches."""
    mine = [rows[i] for i in share(len(rows), index, processes)]
    return [[mine[i] for i in share(len(mine), part, accumulation)] for part in range(accumulation)]


def train_step(accelerator, model, examples, rows: list[int], collate: Callable, loss_fn: LossFn,
               weight: Callable[[dict], int], config: TrainConfig) -> float:
    """Forward and backward this process's share of batch ``rows``, gradients synchronised across processes at
    the last micro-batch; returns the whole batch's mean loss (the same on every process).

    Each micro-batch's mean loss is scaled by its share of the batch's weight, times the number of
    processes (their gradients are averaged), so the summed gradient is the whole batch's mean loss's.
    """
    processes = accelerator.num_processes
    parts = micro_batches(rows, processes, accelerator.process_index, config.gradient_accumulation_steps)
    total = max(1, sum(weight(examples[i]) for i in rows))
    batch_loss = torch.zeros((), device=accelerator.device)
    for number, part in enumerate(parts):
        share_of_batch = sum(weight(examples[i]) for i in part) / total
        # an empty share still runs one example, weighted 0: every process must join the gradient sync
        features = [examples[i] for i in (part or rows[:1])]
        batch = {key: value.to(accelerator.device) for key, value in collate(features).items()}
        last = number == len(parts) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                loss = loss_fn(model, batch)
            accelerator.backward(loss * (share_of_batch * processes))
        batch_loss += loss.detach().float() * share_of_batch
    return accelerator.reduce(batch_loss, reduction="sum").item() if processes > 1 else batch_loss.item()


@contextlib.contextmanager
def _interrupt_names_step(state: TrainState, run_dir: Path) -> Iterator[None]:
    """Ctrl-C, or SIGTERM (raised as Interrupted by the command line), says where training stopped and how to
    resume."""
    try:
        yield
    except KeyboardInterrupt as err:
        raise Interrupted(f"interrupted at step {state.step}; resume with: lorafit train --resume --output-dir "
                          f"{run_dir}", getattr(err, "exit_code", 130)) from None


def _due(strategy: str, every: int, step: int, epoch_end: bool, done: bool) -> bool:
    if strategy == "epoch":
        return epoch_end or done
    if strategy == "steps":
        return step % every == 0 or done
    return False


def _is_better(score: float, best: float | None, metric: str) -> bool:
    if best is None:
        return True
    return score < best if metric == "loss" else score > best


def restore_best(model: ShardedModel, run_dir: Path) -> bool:
    """Load best/ into the active adapter, as Trainer's load_best_model_at_end does; every process calls it."""
    best = run_dir / "best"
    if not (best / "adapter_config.json").is_file():
        return False
    model.load_adapter(best)
    return True

