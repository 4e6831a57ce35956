"""Tests for tasks/task.py: what the one pipeline takes from a task, and the eval-mode helper."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lorafit.tasks.task import eval_mode


def test_eval_mode_restores_the_mode_the_model_had():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    for training in (True, False):
        model.train(training)
        with eval_mode(model):
            assert not model.training and not model[1].training
        assert model.training is training and model[1].training is training
    model.train()
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert model.training  # an evaluation that fails mid-run leaves training in train mode


def test_tasks_do_not_import_the_pipeline():
    """The pipeline imports the tasks; a task importing the pipeline back would be a cycle."""
    code = ("import sys, lorafit.tasks.classification, lorafit.tasks.causal_lm; "
            "print('lorafit.tasks.pipeline' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_each_task_is_registered_under_its_train_config_name():
    from lorafit.tasks.pipeline import TASKS as PIPELINE_TASKS
    from lorafit.training.settings import DEFAULT_MAX_LENGTH, TASKS

    assert set(PIPELINE_TASKS) == set(TASKS) == set(DEFAULT_MAX_LENGTH)
