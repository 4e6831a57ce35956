"""Tests for lorafit.training.settings: checks, task defaults, YAML run files and the saved config."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import yaml

from lorafit.errors import LorafitError
from lorafit.training.settings import TrainConfig, build_config, dump_config, field_docs, load_yaml_config


def test_defaults_resolved_for_classification():
    config = TrainConfig().resolved()
    assert (config.model, config.max_length, config.lr, config.metric) == ("minilm", 128, 1e-3, "accuracy")
    assert (config.save_strategy, config.save_steps) == ("epoch", 100)


def test_defaults_resolved_for_causal_lm():
    config = TrainConfig(task="causal-lm").resolved()
    assert (config.model, config.max_length, config.lr, config.metric) == ("smollm2", 256, 3e-3, "loss")
    assert (config.epochs, config.target_modules) == (2, ["all-linear"])


def test_defaults_resolved_for_seq2seq_leave_the_model_to_the_user():
    config = TrainConfig(task="seq2seq").resolved()
    assert (config.model, config.max_length, config.lr, config.metric) == (None, 256, 1e-3, "loss")
    assert (config.input_column, config.target_column) == ("input", "target")


def test_resolved_keeps_what_was_given():
    config = TrainConfig(model="m", max_length=64, lr=0.5, metric="f1", eval_strategy="steps", eval_steps=7,
                         save_strategy="no").resolved()
    assert (config.model, config.max_length, config.lr, config.metric) == ("m", 64, 0.5, "f1")
    assert (config.save_strategy, config.save_steps) == ("no", 7)  # save steps follow eval steps


def test_resolved_does_not_change_the_original():
    config = TrainConfig()
    config.resolved()
    assert config.model is None and config.lr is None


@pytest.mark.parametrize("settings, fragment", [
    ({"task": "regression"},
     "--task must be one of classification, causal-lm, token-classification, seq2seq; got 'regression'"),
    ({"truncation_side": "middle"}, "--truncation-side must be one of left, right"),
    ({"eval_strategy": "always"}, "--eval-strategy must be one of epoch, steps, no"),
    ({"save_strategy": "always"}, "--save-strategy must be one of epoch, steps, no"),
    ({"metric": "precision"}, "--metric must be one of accuracy, f1, loss"),
    ({"task": "causal-lm", "metric": "accuracy"}, "--metric must be one of loss"),
    ({"r": 0}, "--r must be a positive integer, got 0"),
    ({"r": 2.5}, "--r must be a positive integer, got 2.5"),
    ({"r": True}, "--r must be a positive integer, got True"),
    ({"batch_size": -4}, "--batch-size must be a positive integer"),
    ({"eval_batch_size": 0}, "--eval-batch-size must be a positive integer"),
    ({"eval_steps": 0}, "--eval-steps must be a positive integer"),
    ({"keep_checkpoints": 0}, "--keep-checkpoints must be a positive integer"),
    ({"max_length": 0}, "--max-length must be a positive integer"),
    ({"max_steps": -1}, "--max-steps must be a positive integer"),
    ({"save_steps": 0}, "--save-steps must be a positive integer"),
    ({"max_train_samples": 0}, "--max-train-samples must be a positive integer"),
    ({"lora_alpha": 0}, "--lora-alpha must be a number > 0"),
    ({"epochs": -1}, "--epochs must be a number > 0"),
    ({"lr": 0}, "--lr must be a number > 0"),
    ({"lr": "fast"}, "--lr must be a number > 0 (not inf or nan), got 'fast'"),
    ({"lora_dropout": 1.0}, "--lora-dropout must be in [0, 1), got 1.0"),
    ({"lora_dropout": -0.1}, "--lora-dropout must be in [0, 1)"),
    ({"warmup_ratio": 1.5}, "--warmup-ratio must be in [0, 1)"),
    ({"weight_decay": -0.01}, "--weight-decay must be a number >= 0 (not inf or nan)"),
    ({"dataset": "glue", "train_file": "t.csv"}, "pass either --dataset or --train-file, not both"),
    # non-finite numbers pass every `<= 0` test, then train to NaN or fail deep inside torch
    ({"lr": float("inf")}, "--lr must be a number > 0 (not inf or nan), got inf"),
    ({"lr": float("nan")}, "--lr must be a number > 0 (not inf or nan), got nan"),
    ({"lora_alpha": float("inf")}, "--lora-alpha must be a number > 0 (not inf or nan), got inf"),
    ({"lora_alpha": float("nan")}, "--lora-alpha must be a number > 0 (not inf or nan), got nan"),
    ({"epochs": float("inf")}, "--epochs must be a number > 0 (not inf or nan), got inf"),
    ({"weight_decay": float("nan")}, "--weight-decay must be a number >= 0 (not inf or nan), got nan"),
    ({"weight_decay": float("inf")}, "--weight-decay must be a number >= 0 (not inf or nan), got inf"),
    ({"warmup_ratio": float("nan")}, "--warmup-ratio must be in [0, 1), got nan"),
    ({"lora_dropout": float("nan")}, "--lora-dropout must be in [0, 1), got nan"),
    ({"weight_decay": "lots"}, "--weight-decay must be a number >= 0 (not inf or nan), got 'lots'"),
    ({"seed": 10 ** 22}, "--seed must be an integer from 0 to 4294967295, got 10000000000000000000000"),
    ({"seed": -1}, "--seed must be an integer from 0 to 4294967295, got -1"),
    ({"seed": 2 ** 32}, "--seed must be an integer from 0 to 4294967295"),
    ({"seed": "abc"}, "--seed must be an integer from 0 to 4294967295, got 'abc'"),
    ({"seed": 1.5}, "--seed must be an integer"),
    ({"seed": True}, "--seed must be an integer"),
    # values of the wrong type, as a YAML file can give them
    ({"target_modules": 5}, "--target-modules must be a list of module names, e.g. [query, value]; got 5"),
    ({"target_modules": ["query", 5]}, "--target-modules must be a list of module names"),
    ({"target_modules": []}, "--target-modules must be a list of module names"),
    ({"task": "token-classification", "tag_names": "O"}, "--tag-names must be a list of tag names, e.g. [O, B-PER"),
    ({"task": "token-classification", "metric": "perplexity"},
     "--metric must be one of f1, precision, recall, accuracy, loss"),
    ({"text_column": ["text"]}, "--text-column must be text, got ['text']"),
    ({"output_dir": 5}, "--output-dir must be text, got 5"),
    ({"model": None, "train_file": 3.5}, "--train-file must be text, got 3.5"),
    ({"train_file": ""}, "--train-file is empty"),  # would train on the built-in data instead
    ({"output_dir": " "}, "--output-dir is empty"),
    ({"text_column": ""}, "--text-column is empty"),
    ({"resume": "false"}, "--resume must be true or false, got 'false'"),
    ({"pack": 1}, "--pack must be true or false, got 1"),
    ({"task": ["classification"]}, "--task must be text, got ['classification']"),
])
def test_invalid_settings_name_the_flag(settings, fragment):
    with pytest.raises(LorafitError) as excinfo:
        TrainConfig(**settings)
    assert fragment in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize("settings", [
    {"lora_dropout": 0.0}, {"warmup_ratio": 0.0}, {"weight_decay": 0.0}, {"epochs": 0.5}, {"lora_alpha": 0.5},
    {"max_steps": None}, {"metric": "loss"}, {"seed": 0}, {"seed": 2 ** 32 - 1}, {"lr": 1e-8},
    {"target_modules": ["all-linear"]},
])
def test_edge_values_accepted(settings):
    TrainConfig(**settings)


def test_seed_range_is_what_the_seeding_functions_accept():
    import numpy as np
    import transformers

    top = TrainConfig(seed=2 ** 32 - 1).seed
    torch.manual_seed(top)
    transformers.set_seed(top)  # generate seeds numpy too, which stops at 2**32 - 1
    torch.Generator().manual_seed(top * 1000 + 999)  # the data order's generator (train.py)
    with pytest.raises(ValueError):
        np.random.seed(top + 1)


def test_every_field_has_help():
    docs = field_docs(TrainConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert all(docs.values())
    assert docs["r"] == "LoRA rank."
    assert "\n" not in docs["model"]  # whitespace joined into one line


def test_load_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("r: 4\nlora-alpha: 8\ntarget_modules: [query, value]\nlr: 1e-3\nepochs: 2\n")
    assert load_yaml_config(path) == {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "lr": 0.001,
                                      "epochs": 2}
    path.write_text("")
    assert load_yaml_config(path) == {}


def test_load_yaml_leaves_non_numbers_for_the_checks(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: fast\nmodel: 1e-3\n")  # model is a string setting: kept as written
    settings = load_yaml_config(path)
    assert settings == {"lr": "fast", "model": "1e-3"}
    with pytest.raises(LorafitError, match=re.escape("--lr must be a number > 0 (not inf or nan), got 'fast'")):
        build_config(settings)


@pytest.mark.parametrize("content, fragment", [
    ("r: 4\nbogus: 1\nalso_bogus: 2\n", "unknown setting(s) also_bogus, bogus"),
    ("r: [\n", "is not valid YAML"),
    ("[1, 2]\n", "must hold a mapping of settings"),
    ("just a string\n", "must hold a mapping of settings"),
])
def test_load_yaml_errors(tmp_path, content, fragment):
    path = tmp_path / "run.yaml"
    path.write_text(content)
    with pytest.raises(LorafitError) as excinfo:
        load_yaml_config(path)
    assert fragment in str(excinfo.value) and str(path) in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize("text, value", [("false", False), ("No", False), ("TRUE", True), ("yes", True)])
def test_load_yaml_reads_quoted_booleans_as_booleans(tmp_path, text, value):
    path = tmp_path / "run.yaml"
    path.write_text(f'resume: "{text}"\npack: {text}\n')
    settings = load_yaml_config(path)
    assert settings == {"resume": value, "pack": value}
    assert build_config(settings).resume is value


def test_load_yaml_refuses_other_strings_for_booleans(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text('resume: "maybe"\n')
    with pytest.raises(LorafitError, match="--resume must be true or false, got 'maybe'"):
        build_config(load_yaml_config(path))


def test_load_yaml_single_target_module_as_a_list(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("target_modules: all-linear\n")
    assert load_yaml_config(path) == {"target_modules": ["all-linear"]}


@pytest.mark.parametrize("content", [bytes(range(256)), "text_column: caf\u00e9\n".encode("latin-1"),
                                     "text_column: x\n".encode("utf-16")], ids=["binary", "latin-1", "utf-16"])
def test_load_yaml_binary_or_not_utf8(tmp_path, content):
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    with pytest.raises(LorafitError) as excinfo:
        load_yaml_config(path)
    message = str(excinfo.value)
    assert str(path) in message and "UTF-8" in message and "\n" not in message


def test_load_yaml_utf8_with_bom(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes("text_column: caf\u00e9\n".encode("utf-8-sig"))
    assert load_yaml_config(path) == {"text_column": "caf\u00e9"}


def test_load_yaml_directory(tmp_path):
    with pytest.raises(LorafitError, match="is a directory; pass the path of a YAML file"):
        load_yaml_config(tmp_path)


def test_load_yaml_missing_file(tmp_path):
    with pytest.raises(LorafitError, match="does not exist"):
        load_yaml_config(tmp_path / "none.yaml")


def test_build_config_turns_type_errors_into_lorafit_errors():
    with pytest.raises(LorafitError, match="invalid settings"):
        build_config({"r": 4, "not_a_field": 1})
    assert build_config({"r": 4}).r == 4


def test_dump_config_round_trips():
    config = TrainConfig(model="m", r=4, target_modules=["query"], lr=5e-4, group_by_length=False,
                         epochs=1.5).resolved()
    text = dump_config(config)
    loaded = yaml.safe_load(text)
    assert list(loaded) == [f.name for f in dataclasses.fields(TrainConfig)]  # in field order
    assert TrainConfig(**loaded) == config
