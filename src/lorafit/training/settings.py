"""TrainConfig: everything a `lorafit train` run needs; the single source for its flags and YAML file."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lorafit.errors import LorafitError
from lorafit.variants.residual_init import PISSA_NITER, changes_base

TASKS = ("classification", "causal-lm", "token-classification", "seq2seq")
STRATEGIES = ("epoch", "steps", "no")
METRICS = {"classification": ("accuracy", "f1", "loss"), "causal-lm": ("loss",),
           "token-classification": ("f1", "precision", "recall", "accuracy", "loss"),
           "seq2seq": ("loss",)}  # the first is the default
PRECISIONS = ("no", "bf16", "fp16")
TRACKERS = ("none", "tensorboard", "wandb", "mlflow")
# Tokens per example (text, text pair or conversation) when --max-length is not given; every command
# that tokenizes for a task (train, eval, predict) falls back to its task's value.
DEFAULT_MAX_LENGTH = {"classification": 128, "causal-lm": 256, "token-classification": 128, "seq2seq": 256}


QUANTIZE_CHOICES = ("4bit", "8bit", "none")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class QuantizeSettings:
    """How the base model is loaded: as is, or quantized by bitsandbytes (QLoRA). Every field is a flag of
    train, eval, predict, generate and merge; the names after --quantize are transformers' BitsAndBytesConfig's."""

    quantize: str | None = None
    """Load the base model's linear layers quantized, 4bit or 8bit (QLoRA; needs `pip install lorafit[qlora]`),
    or none. Default: as the adapter was trained (eval, predict, generate, merge), else none."""
    bnb_4bit_quant_type: str = "nf4"
    """With --quantize 4bit: the 4-bit number format, nf4 (QLoRA's NormalFloat) or fp4."""
    bnb_4bit_use_double_quant: bool = False
    """With --quantize 4bit: quantize the quantization constants too (about 0.4 bits less per weight)."""
    bnb_4bit_compute_dtype: str = "float32"
    """With --quantize 4bit: the dtype the de-quantized weights are multiplied in: float32, bfloat16 or float16."""

    def __post_init__(self) -> None:
        _check_types(self)
        _choice("quantize", self.quantize, QUANTIZE_CHOICES + (None,))
        _choice("bnb_4bit_quant_type", self.bnb_4bit_quant_type, ("nf4", "fp4"))
        _choice("bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype, COMPUTE_DTYPES)


@dataclass
class TrainConfig(QuantizeSettings):
    """A fine-tuning run. Every field is also a command-line flag (``max_length`` -> ``--max-length``)."""

    task: str = "classification"
    """What to train: classification (a text classifier), causal-lm (instruction-tune an LLM),
    token-classification (a tag per word: named entities, ...) or seq2seq (an encoder-decoder such as T5 or
    BART: an input text to a target text)."""
    model: str | None = None
    """Base model: a local directory, a Hugging Face hub id, or a built-in alias (minilm, smollm2).
    Default: minilm for classification and token-classification, smollm2 for causal-lm; seq2seq has none."""
    train_file: str | None = None
    """Training data: CSV, TSV, JSON Lines, JSON, Parquet, or a `datasets` directory. Default: the
    built-in dataset of the task."""
    validation_file: str | None = None
    """Validation data, same formats; evaluated per --eval-strategy and used to pick best/."""
    test_file: str | None = None
    """Test data, evaluated once at the end with the best adapter."""
    dataset: str | None = None
    """A Hugging Face hub dataset instead of files, e.g. glue (needs network)."""
    dataset_config: str | None = None
    """The hub dataset's configuration, e.g. sst2."""
    text_column: str = "text"
    """Column holding the text to classify."""
    text_pair_column: str | None = None
    """Optional second text column (sentence pairs, e.g. premise/hypothesis)."""
    label_column: str = "label"
    """Column holding the labels (strings or integers)."""
    tokens_column: str = "tokens"
    """token-classification tables: column holding each sentence's words (a list, or in CSV a JSON list or
    words separated by spaces). CoNLL files (.conll, .txt, .iob, .bio, .bioes) need no columns."""
    tags_column: str | None = None
    """token-classification tables: column holding one tag per word. Default: tags, else ner_tags."""
    tag_names: list[str] | None = None
    """token-classification: the names of integer tags in id order (e.g. O B-PER I-PER), when the data holds
    class ids without a datasets ClassLabel naming them; names given with name tags fix the tag order."""
    input_column: str = "input"
    """seq2seq: column holding the input text (what the encoder reads)."""
    target_column: str = "target"
    """seq2seq: column holding the target text (what the decoder learns to write)."""
    encoding: str | None = None
    """Text encoding of CSV/TSV/JSON files when not UTF-8, e.g. latin-1."""
    max_length: int | None = None
    """Longest input in tokens; longer inputs are cut. Default: 128 (classification, token-classification),
    256 (causal-lm; seq2seq, for the input and the target each)."""
    truncation_side: str = "right"
    """Which end of a too-long text is cut: right (keep the start) or left (keep the end)."""
    train_on_prompt: bool = False
    """causal-lm: also train on prompt tokens (default: the loss covers the response only)."""
    pack: bool = False
    """causal-lm: pack several short examples into one sequence of --max-length tokens."""
    r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16
    """LoRA scale numerator: the update is multiplied by lora_alpha / r."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch's input."""
    use_dora: bool = False
    """DoRA: also train a magnitude per output feature of each adapted layer (PEFT's use_dora)."""
    init_lora_weights: str | None = None
    """How the adapter starts (PEFT's init_lora_weights): gaussian, pissa, pissa_niter_<K> (a randomised SVD
    with K iterations, e.g. pissa_niter_4) or olora. Default: A random, B zero. pissa and olora start from a
    slice of the base weights; best/ is then saved as the plain LoRA of rank 2r it equals on the unchanged
    base model, and initial_adapter/ keeps the starting factors."""
    target_modules: list[str] | None = None
    """Modules to adapt, e.g. query value, or all-linear. Default: all-linear for causal-lm; for
    classification the architecture's query and value projections (query/value, q_proj/v_proj, c_attn).
    Each name must match a module of the model."""
    lr: float | None = None
    """Peak learning rate (AdamW, linear decay). Default: 1e-3 (classification), 3e-3 (causal-lm), 5e-3
    (token-classification)."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: train B (and biases, DoRA magnitudes) with this many times --lr, e.g. 16; PEFT's grouping."""
    loraplus_lr_embedding: float = 1e-6
    """LoRA+: the learning rate of embedding LoRA factors (PEFT's default 1e-6)."""
    batch_size: int = 16
    """Training examples per optimizer step, over all processes together (each of N processes takes 1/N of
    every batch), so a run's steps and weights do not depend on the number of processes."""
    gradient_accumulation_steps: int = 1
    """Split each process's share of a batch into this many micro-batches whose gradients are summed before
    the optimizer step: less memory, the same step (up to rounding)."""
    max_grad_norm: float | None = None
    """Clip the gradients' global norm to this before each optimizer step (default: no clipping)."""
    mixed_precision: str = "no"
    """Compute in no (fp32), bf16 (GPUs; CPUs with AVX512-BF16 or AMX) or fp16 (GPUs, with loss scaling);
    the adapter's weights and optimizer stay fp32."""
    eval_batch_size: int = 64
    """Examples per batch when evaluating."""
    epochs: float | None = None
    """Passes over the training data. Default: 3 (classification), 2 (causal-lm)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides --epochs)."""
    weight_decay: float = 0.01
    """AdamW weight decay on the LoRA matrices and trained heads."""
    warmup_ratio: float = 0.06
    """Fraction of steps over which the learning rate rises linearly from 0."""
    seed: int = 42
    """Seed for initialisation, dropout and data order (0 to 4294967295)."""
    group_by_length: bool = True
    """Batch texts of similar length together (less padding, faster); --no-group-by-length to turn off."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    fast: bool = True
    """Use the speed tricks of lorafit.fast (same results); --no-fast, like LORAFIT_FAST=0, runs the plain path."""
    output_dir: str | None = None
    """Run directory. Default: lorafit-runs/<task>-<model>-<time>."""
    eval_strategy: str = "epoch"
    """When to evaluate: epoch, steps (every --eval-steps), or no."""
    eval_steps: int = 100
    """Optimizer steps between evaluations with --eval-strategy steps."""
    save_strategy: str | None = None
    """When to write checkpoint-<step>/: epoch, steps (every --save-steps), or no. Default: as --eval-strategy."""
    save_steps: int | None = None
    """Optimizer steps between checkpoints with --save-strategy steps. Default: --eval-steps."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep (best/ is kept separately)."""
    metric: str | None = None
    """Validation metric that picks best/: accuracy, f1 or loss (classification); loss (causal-lm); f1,
    precision, recall (entity level), accuracy (per word) or loss (token-classification); loss (seq2seq)."""
    report_to: str = "none"
    """Also log metrics to tensorboard (in <output-dir>/tensorboard), wandb or mlflow; metrics.jsonl is always written."""
    resume: bool = False
    """Continue the run in --output-dir from its newest complete checkpoint."""
    max_train_samples: int | None = None
    """Use only the first N training examples (quick experiments)."""
    max_eval_samples: int | None = None
    """Evaluate on only the first N validation examples."""

    def __post_init__(self) -> None:
        # the one check of every setting, whether it came from a flag, a YAML file or Python,
        # run before anything is loaded or written
        super().__post_init__()
        _choice("task", self.task, TASKS)
        _choice("truncation_side", self.truncation_side, ("left", "right"))
        _choice("eval_strategy", self.eval_strategy, STRATEGIES)
        _choice("save_strategy", self.save_strategy, STRATEGIES + (None,))
        _choice("mixed_precision", self.mixed_precision, PRECISIONS)
        _choice("report_to", self.report_to, TRACKERS)
        _choice("metric", self.metric, METRICS[self.task] + (None,))
        for name in ("r", "batch_size", "eval_batch_size", "eval_steps", "keep_checkpoints", "gradient_accumulation_steps"):
            check_positive_int(name, getattr(self, name))
        for name in ("max_length", "max_steps", "save_steps", "max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        check_seed("seed", self.seed)
        check_number("lora_alpha", self.lora_alpha, "> 0")
        for name in ("epochs", "lr", "loraplus_lr_ratio", "max_grad_norm"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), "> 0")
        check_number("lora_dropout", self.lora_dropout, "in [0, 1)")
        check_number("warmup_ratio", self.warmup_ratio, "in [0, 1)")
        check_number("weight_decay", self.weight_decay, ">= 0")
        check_number("loraplus_lr_embedding", self.loraplus_lr_embedding, "> 0")
        init = self.init_lora_weights
        if init is not None and not (init in ("gaussian", "pissa", "olora") or PISSA_NITER.fullmatch(init)):
            raise LorafitError(f"--init-lora-weights must be gaussian, pissa, pissa_niter_<K> (K iterations, "
                               f"e.g. pissa_niter_4) or olora; got {init!r}")
        if self.use_dora and init is not None and changes_base(init):
            raise LorafitError(f"--use-dora with --init-lora-weights {init}: the run saves a PiSSA/OLoRA adapter as "
                               "the plain LoRA it equals on the unchanged base, which a DoRA adapter has no form "
                               "of; drop one of the two")
        if self.dataset and self.train_file:
            raise LorafitError("pass either --dataset or --train-file, not both")

    def resolved(self) -> "TrainConfig":
        """A copy with every task-dependent default filled in."""
        causal = self.task == "causal-lm"
        defaults = {
            "model": {"causal-lm": "smollm2", "seq2seq": None}.get(self.task, "minilm"),
            "max_length": DEFAULT_MAX_LENGTH[self.task],
            # causal-lm: measured on the built-in quickstart (SmolLM2, 2 CPU cores): exact match 0 -> ~90%
            # token-classification: on a synthetic 200-sentence NER set (MiniLM, r=8), entity F1 0.95 after 2
            # epochs at 5e-3, 0.79 after 3 at 1e-3: the new head needs the larger steps
            "lr": {"causal-lm": 3e-3, "token-classification": 5e-3}.get(self.task, 1e-3),
            "epochs": 2 if causal else 3,
            "target_modules": ["all-linear"] if causal else None,
            "metric": METRICS[self.task][0],
            "save_strategy": self.eval_strategy,
            "save_steps": self.eval_steps,
        }
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        shown = ", ".join(a for a in allowed if a is not None)
        raise LorafitError(f"--{name.replace('_', '-')} must be one of {shown}; got {value!r}")


# torch accepts seeds up to 2**64 - 1, but numpy (seeded by `generate --seed`) stops at 2**32 - 1, and the
# data order's seed (training.loop.data_order_seed) must stay below 2**64; one range that every command accepts
MAX_SEED = 2 ** 32 - 1
_RANGES = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 1)": lambda v: 0 <= v < 1,
           "in (0, 1]": lambda v: 0 < v <= 1}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any) -> None:
    """An integer >= 1, or a one-line error naming the flag."""
    if not _is_int(value) or value < 1:
        raise LorafitError(f"{_flag(name)} must be a positive integer, got {value!r}")


def check_number(name: str, value: Any, bounds: str) -> None:
    """A finite int or float within ``bounds`` (one of "> 0", ">= 0", "in [0, 1)", "in (0, 1]")."""
    ok = (_is_int(value) or isinstance(value, float)) and math.isfinite(value) and _RANGES[bounds](value)
    if not ok:
        what = bounds if bounds.startswith("in") else f"a number {bounds} (not inf or nan)"
        raise LorafitError(f"{_flag(name)} must be {what}, got {value!r}")


def check_seed(name: str, value: Any) -> None:
    if not _is_int(value) or not 0 <= value <= MAX_SEED:
        raise LorafitError(f"{_flag(name)} must be an integer from 0 to {MAX_SEED}, got {value!r}")


def _check_types(config) -> None:
    """Text, true/false and name-list settings hold what their fields declare (numbers are checked with their ranges)."""
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), _field_kind(type(config), f.name)
        if value is None and _optional(type(config), f.name):
            continue
        if kind is str and not isinstance(value, str):
            hint = f"; in a YAML file, quote it: '{value}'" if isinstance(value, (int, float)) else ""
            raise LorafitError(f"{_flag(f.name)} must be text, got {value!r}{hint}")
        if kind is str and not value.strip():  # an empty path would quietly mean "the default"
            raise LorafitError(f"{_flag(f.name)} is empty; give a value or leave the setting out")
        if kind is bool and not isinstance(value, bool):
            raise LorafitError(f"{_flag(f.name)} must be true or false, got {value!r}")
        if typing.get_origin(kind) is list and not (
                isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
            example = "tag names, e.g. [O, B-PER, I-PER]" if f.name == "tag_names" else \
                "module names, e.g. [query, value]"
            raise LorafitError(f"{_flag(f.name)} must be a list of {example}; got {value!r}")


def _field_kind(cls: type, name: str) -> Any:
    return _field_kinds(cls)[name][0]


def _optional(cls: type, name: str) -> bool:
    return _field_kinds(cls)[name][1]


@functools.cache
def _field_kinds(cls: type) -> dict[str, tuple[Any, bool]]:
    """Each field's type without its None, and whether None is allowed (``int | None`` -> (int, True))."""
    kinds = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        optional = type(None) in args
        kinds[name] = (next(a for a in args if a is not type(None)) if optional else hint, optional)
    return kinds


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field, read from the source (help texts come from here)."""
    docs = {}
    for parent in cls.__mro__[1:]:  # a config's fields include those it inherits (TrainConfig's quantization)
        if dataclasses.is_dataclass(parent):
            docs.update(field_docs(parent))
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def load_yaml_config(path: str | Path, cls: type = TrainConfig) -> dict[str, Any]:
    """The settings in a YAML run file, keys checked against the config's fields."""
    path = Path(path)
    if path.is_dir():
        raise LorafitError(f"config file '{path}' is a directory; pass the path of a YAML file")
    if not path.is_file():
        raise LorafitError(f"config file '{path}' does not exist; pass the path of a YAML file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise LorafitError(f"config file '{path}' is not UTF-8 text (byte {err.start}); pass a YAML file saved "
                           "as UTF-8") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise LorafitError(f"config file '{path}' is not valid YAML ({str(err).splitlines()[0]}); fix the syntax") from None
    if not isinstance(data, dict):
        raise LorafitError(f"config file '{path}' must hold a mapping of settings, e.g. 'r: 8'")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LorafitError(f"config file '{path}' has unknown setting(s) {', '.join(unknown)}; "
                           f"run `lorafit train --help` for the valid ones")
    return {key: _yaml_value(cls, key, value) for key, value in data.items()}


_BOOLEAN_WORDS = {"true": True, "yes": True, "false": False, "no": False}


def _yaml_value(cls: type, key: str, value: Any) -> Any:
    """A YAML value as the flag would give it; anything else is left for the config's own checks to name.

    YAML 1.1 reads 5e-4 (no dot) as a string, and a quoted "false" is a string that Python takes as true;
    a single name where a list is expected (``target_modules: all-linear``) is that one-name list."""
    kind = _field_kind(cls, key)
    if isinstance(value, str) and kind is float:
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, str) and kind is bool:
        return _BOOLEAN_WORDS.get(value.strip().lower(), value)
    if isinstance(value, str) and typing.get_origin(kind) is list:
        return [value]
    return value


def build_config(settings: dict[str, Any], cls: type = TrainConfig):
    """Construct a config, turning type mistakes into one-line errors."""
    try:
        return cls(**settings)
    except TypeError as err:
        raise LorafitError(f"invalid settings: {err}") from None


def dump_config(config) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
