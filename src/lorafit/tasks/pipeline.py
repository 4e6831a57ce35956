"""`lorafit train`: the article's walkthrough as one command, the same for every task.

Load and check the data, wrap the base model with LoRA, show the task's demo before training,
train with per-epoch evaluation, restore the best adapter, show the demo after, write the run folder.
A task (classification.py, causal_lm.py, token_classification.py, seq2seq.py) supplies its data, model head, loss,
evaluation and demo.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from dataclasses import asdict
from pathlib import Path

from lorafit.config import ALL_LINEAR, LoraConfig
from lorafit.fast import use_fast_paths
from lorafit.files import replace_dir, write_text
from lorafit.inference.base_models import load_tokenizer, model_reference, resolve_model
from lorafit.inference.quantization import adapter_quantization
from lorafit.inject import check_each_target_matches
from lorafit.model import get_lora_model
from lorafit.tasks.causal_lm import CausalLmTask
from lorafit.tasks.classification import ClassificationTask
from lorafit.tasks.seq2seq import Seq2SeqTask
from lorafit.tasks.task import Task
from lorafit.tasks.token_classification import TokenClassificationTask
from lorafit.inference.adapter_info import save_adapter_info
from lorafit.training.accelerator import check_accelerator_settings
from lorafit.training.distributed import gather_lists, is_main_process, on_main_process, start_processes
from lorafit.training.loop import LoopResult, restore_best, run_training, seed_everything
from lorafit.training.run_dir import INITIAL_ADAPTER, model_card, plot_curves, prepare_run_dir, release_run_dirs
from lorafit.training.settings import TrainConfig
from lorafit.training.sharding import whole_model
from lorafit.variants.residual_init import changes_base

TASKS: dict[str, type[Task]] = {task.name: task for task in (ClassificationTask, CausalLmTask, TokenClassificationTask,
                                                              Seq2SeqTask)}


def default_output_dir(config: TrainConfig) -> Path:
    model_name = Path(config.model).name if config.model else "model"
    return Path("lorafit-runs") / f"{config.task}-{model_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_train(config: TrainConfig) -> dict:
    """Run a fine-tuning job end to end; returns the final metrics."""
    config = config.resolved()
    try:
        return train(TASKS[config.task](config))
    finally:
        release_run_dirs()  # locked by prepare_run_dir


def train(task: Task) -> dict:
    """Fine-tune with LoRA for ``task`` (its config already resolved); returns the final metrics.

    With several processes every one runs this; only the main one prints and writes the run folder."""
    config = task.config
    check_accelerator_settings(config)
    start_processes()
    with contextlib.ExitStack() as stack:
        if not is_main_process():  # one copy of every printed line
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        return _train(task, config)


def _train(task: Task, config: TrainConfig) -> dict:
    started = time.perf_counter()
    task.load_data()
    model_path = resolve_model(config.model)
    tokenizer = load_tokenizer(model_path)
    run_dir = Path(config.output_dir) if config.output_dir else default_output_dir(config)
    tokenized = task.tokenize(tokenizer)
    model = build_model(task, model_path, tokenizer)
    # only now that the data, model and adapter settings have all been checked is anything written
    on_main_process(lambda: prepare_run_dir(run_dir, config))
    if changes_base(config.init_lora_weights):  # what best/ is converted against at the end
        on_main_process(lambda: replace_dir(run_dir / INITIAL_ADAPTER, model.save_pretrained))
    print(task.describe_data(tokenized))
    if is_main_process():
        model.print_trainable_parameters()
    final = task.demo("before", model, tokenizer) if is_main_process() else {}

    collate = task.collator(tokenizer)
    counted = {"tokens": 0}

    def collate_counting(features: list[dict]) -> dict:
        batch = collate(features)
        counted["tokens"] += int(batch["attention_mask"].sum())
        return batch

    validation = tokenized.get("validation")

    def evaluate() -> dict:
        return task.evaluate(model, validation, collate)

    metric = task.table_metric()
    width = max(10, len(metric) + 1)
    print(f"\n{'Epoch':>6} {'Step':>6} {'Training Loss':>14} {'Validation Loss':>16} {metric.capitalize():>{width}}")

    def show(record: dict) -> None:
        print(f"{record['epoch']:>6.2f} {record['step']:>6d} {_num(record['train_loss']):>14} "
              f"{_num(record.get('loss')):>16} {_num(record.get(metric)):>{width}}", flush=True)

    result = run_training(model, tokenized["train"], collate_counting if task.counts_tokens else collate, task.loss,
                          evaluate if validation is not None else None, config, run_dir, show, task.loss_weight)
    restored = result.state.best_step is not None and restore_best(result.model, run_dir)
    # with several processes each counted the tokens of its own shares
    figures = run_figures(result, sum(gather_lists([counted["tokens"]])) if task.counts_tokens else None)
    # under FSDP the end of the run uses the whole model on every process (its memory on each)
    with whole_model(result.model.prepared):
        final.update(_finish(task, model, tokenizer, run_dir, tokenized, collate, restored, figures))

    def write_summary() -> None:
        plot_curves(run_dir, result.state.history, metric)
        write_text(run_dir / "README.md", model_card(base_model=config.model, data=task.description,
                                                     config=asdict(config), metrics=final, run_dir=run_dir,
                                                     task=task.name))

    on_main_process(write_summary)
    final["total_seconds"] = round(time.perf_counter() - started, 1)
    _print_summary(final, run_dir)
    return final


def _finish(task: Task, model, tokenizer, run_dir: Path, tokenized: dict, collate, restored: bool,
            figures: dict) -> dict:
    """best/ completed, the demo after training, then ``figures`` and the final evaluation; every process calls it."""
    config = task.config
    initial = run_dir / INITIAL_ADAPTER if changes_base(config.init_lora_weights) else None
    if not restored or initial:
        # a PiSSA/OLoRA adapter is saved as the plain LoRA it equals on the base model as it is on disk
        on_main_process(lambda: replace_dir(run_dir / "best", lambda tmp: model.save_pretrained(
            tmp, path_initial_model_for_weight_conversion=initial)))
    info = {"task": task.name, "base_model": model_reference(config.model), **task.adapter_info(tokenizer),
            **adapter_quantization(config)}
    on_main_process(lambda: (save_adapter_info(run_dir / "best", info),
                             tokenizer.save_pretrained(run_dir / "best" / "tokenizer")))
    final = task.demo("after", model, tokenizer) if is_main_process() else {}
    final.update(figures)
    for split in ("validation", "test"):
        if split in tokenized:
            metrics = task.evaluate(model, tokenized[split], collate)
            final.update({f"{split}_{k}": v for k, v in metrics.items() if not isinstance(v, (dict, list))})
    return final


def build_model(task: Task, model_path: str, tokenizer):
    """The fp32 base model with the task's head and a fresh LoRA adapter, optionally gradient-checkpointed."""
    config = task.config
    # before the load: a base saved without its head (MiniLM has no classification head; a causal LM
    # may lack its LM head) gets new random weights, the same ones for the same seed
    seed_everything(config.seed)
    base = task.load_base(model_path, tokenizer)
    lora_config = LoraConfig(task_type=task.lora_task_type, r=config.r, lora_alpha=config.lora_alpha,
                             lora_dropout=config.lora_dropout, target_modules=lora_targets(config),
                             use_dora=config.use_dora, init_lora_weights=config.init_lora_weights or True)
    check_each_target_matches(base, lora_config.target_modules)
    model = get_lora_model(base, lora_config)
    use_fast_paths(model, config.fast)  # every speed trick, or none with --no-fast
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    return model


def lora_targets(config: TrainConfig) -> list[str] | str | None:
    """--target-modules as LoraConfig wants it: the single word all-linear is a keyword, not a module name."""
    targets = config.target_modules
    if targets and len(targets) == 1 and targets[0].lower() == ALL_LINEAR:
        return ALL_LINEAR
    return targets


def run_figures(result: LoopResult, tokens: int | None) -> dict:
    """Speed and memory of the training loop, for the summary and the model card (tokens/s when counted)."""
    figures = {"train_seconds": round(result.seconds, 2),
               "train_samples_per_second": round(result.samples_per_second, 2)}
    if tokens is not None:
        figures["train_tokens_per_second"] = round(tokens / result.seconds, 1) if result.seconds else 0.0
    figures["peak_rss_mb"] = peak_rss_mb()
    if result.peak_memory_mb is not None:
        figures["peak_gpu_memory_mb"] = round(result.peak_memory_mb, 1)
    return figures


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _print_summary(final: dict, run_dir: Path) -> None:
    print()
    for key, value in final.items():
        print(f"{key}: {value}")
    print(f"\nAdapter saved to {run_dir / 'best'} (run folder: {run_dir})")


def _num(value) -> str:
    return "-" if value is None else f"{value:.6f}"
