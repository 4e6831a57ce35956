"""`lorafit train`: the article's walkthrough as one command, for a text classifier.

Load and check the data, wrap the base model with LoRA, show predictions before training, train
with per-epoch evaluation, restore the best adapter, show predictions after, write the run folder.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict
from pathlib import Path

from lorafit.data import classification as data
from lorafit.tasks.classification import (ClassificationData, classification_loss, describe_data, evaluate_classifier,
                              load_classification_data, print_predictions)
from lorafit.config import ALL_LINEAR, LoraConfig
from lorafit.fast.first_token import first_token_last_layer
from lorafit.files import write_text
from lorafit.inject import check_each_target_matches
from lorafit.model import get_lora_model
from lorafit.inference.base_models import load_classifier, load_tokenizer, model_reference, resolve_model
from lorafit.training.run_dir import model_card, plot_curves, prepare_run_dir, release_run_dirs, save_adapter_info
from lorafit.training.loop import restore_best, run_training, seed_everything
from lorafit.training.settings import TrainConfig


def default_output_dir(config: TrainConfig) -> Path:
    model_name = Path(config.model).name if config.model else "model"
    return Path("lorafit-runs") / f"{config.task}-{model_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_train(config: TrainConfig) -> dict:
    """Run a fine-tuning job end to end; returns the final metrics."""
    config = config.resolved()
    try:
        if config.task == "causal-lm":
            from lorafit.tasks.causal_lm import train_causal_lm

            return train_causal_lm(config)
        return train_classifier(config)
    finally:
        release_run_dirs()  # locked by prepare_run_dir


def train_classifier(config: TrainConfig) -> dict:
    started = time.perf_counter()
    task_data = load_classification_data(config)
    model_path = resolve_model(config.model)
    tokenizer = load_tokenizer(model_path)
    run_dir = Path(config.output_dir) if config.output_dir else default_output_dir(config)
    tokenized = {split: data.tokenize(ds, tokenizer, max_length=config.max_length,
                                      truncation_side=config.truncation_side)
                 for split, ds in task_data.splits.items()}
    labels = task_data.labels
    # before the load: a base without a classification head (MiniLM has none) gets a new random one
    seed_everything(config.seed)
    base = load_classifier(model_path, num_labels=len(labels.names), id2label=labels.id2label,
                           label2id=labels.label2id, pad_token_id=tokenizer.pad_token_id)
    targets = config.target_modules
    if targets and len(targets) == 1 and targets[0].lower() == ALL_LINEAR:
        targets = ALL_LINEAR  # the keyword, not a module named all-linear
    lora_config = LoraConfig(task_type="SEQ_CLS", r=config.r, lora_alpha=config.lora_alpha,
                             lora_dropout=config.lora_dropout, target_modules=targets)
    check_each_target_matches(base, lora_config.target_modules)
    model = get_lora_model(base, lora_config)
    first_token_last_layer(model)  # the head reads [CLS] alone: the last layer computes only that row
    # only now that the data, model and adapter settings have all been checked is anything written
    prepare_run_dir(run_dir, config)
    print(describe_data(task_data))
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model.print_trainable_parameters()
    id2label = labels.id2label
    show_examples = _is_sentiment(id2label)
    if show_examples:
        print_predictions("Untrained model predictions", model, tokenizer, id2label, config.max_length)

    collate = data.make_collator(tokenizer)
    validation = tokenized.get("validation")
    names = list(labels.names)

    def evaluate() -> dict:
        return evaluate_classifier(model, validation, collate, config.eval_batch_size, names)

    print(f"\n{'Epoch':>6} {'Step':>6} {'Training Loss':>14} {'Validation Loss':>16} {config.metric.capitalize():>10}")

    def show(record: dict) -> None:
        metric = record.get(config.metric)
        print(f"{record['epoch']:>6.2f} {record['step']:>6d} {_num(record['train_loss']):>14} "
              f"{_num(record.get('loss')):>16} {_num(metric):>10}", flush=True)

    result = run_training(model, tokenized["train"], collate, classification_loss,
                          evaluate if validation is not None else None, config, run_dir, show)
    restored = restore_best(model, run_dir)
    if not restored:
        model.save_pretrained(run_dir / "best")
    info = {"task": "classification", "base_model": model_reference(config.model), "id2label": id2label,
            "max_length": config.max_length, "truncation_side": config.truncation_side,
            "text_column": config.text_column, "text_pair_column": config.text_pair_column,
            "label_column": config.label_column}
    save_adapter_info(run_dir / "best", info)
    tokenizer.save_pretrained(run_dir / "best" / "tokenizer")

    if show_examples:
        print_predictions("Trained model predictions", model, tokenizer, id2label, config.max_length)
    final = {"train_seconds": round(result.seconds, 2), "train_samples_per_second": round(result.samples_per_second, 2),
             "peak_rss_mb": peak_rss_mb()}
    if validation is not None:
        final.update({f"validation_{k}": v for k, v in evaluate().items() if not isinstance(v, (dict, list))})
    if "test" in tokenized:
        test = evaluate_classifier(model, tokenized["test"], collate, config.eval_batch_size, names)
        final.update({f"test_{k}": v for k, v in test.items() if not isinstance(v, (dict, list))})
    plot_curves(run_dir, result.state.history, config.metric)
    write_text(run_dir / "README.md", model_card(base_model=config.model, data=task_data.description,
                                                 config=asdict(config), metrics=final, run_dir=run_dir,
                                                 task="classification"))
    final["total_seconds"] = round(time.perf_counter() - started, 1)
    _print_summary(final, run_dir)
    return final


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _is_sentiment(id2label: dict[int, str]) -> bool:
    """The article's example sentences only make sense for a sentiment classifier."""
    return {name.lower() for name in id2label.values()} == {"negative", "positive"}


def _print_summary(final: dict, run_dir: Path) -> None:
    print()
    for key, value in final.items():
        print(f"{key}: {value}")
    print(f"\nAdapter saved to {run_dir / 'best'} (run folder: {run_dir})")


def _num(value) -> str:
    return "-" if value is None else f"{value:.6f}"


__all__ = ["run_train", "ClassificationData"]
