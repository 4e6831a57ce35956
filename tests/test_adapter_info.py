"""lorafit.json beside an adapter: written by training, read by the inference commands."""

import subprocess
import sys

from lorafit.inference.adapter_info import load_adapter_info, save_adapter_info


def test_adapter_info_round_trip(tmp_path):
    save_adapter_info(tmp_path, {"task": "classification", "id2label": {0: "neg", 1: "pos"}})
    assert load_adapter_info(tmp_path) == {"task": "classification", "id2label": {0: "neg", 1: "pos"}}
    assert load_adapter_info(tmp_path / "nothing-here") == {}


def test_loading_adapters_and_run_folders_imports_without_fcntl():
    """fcntl exists on POSIX only: with it unimportable (as on Windows), lorafit's loading and run-folder
    modules still import; only locking a run folder needs it."""
    code = ("import sys; sys.modules['fcntl'] = None\n"
            "import lorafit.inference.loading, lorafit.training.run_dir, lorafit.tasks.pipeline\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
