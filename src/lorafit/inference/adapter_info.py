"""lorafit.json: what lorafit's commands need beside a saved adapter (task, base model, labels, lengths).

Written by `lorafit train` into best/ and read by the inference commands; its format lives here, once.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.files import write_json

INFO_NAME = "lorafit.json"


def save_adapter_info(adapter_dir: Path, info: dict) -> None:
    """What lorafit's commands need beside the adapter: task, base model as given, label names, lengths."""
    write_json(adapter_dir / INFO_NAME, info)


def load_adapter_info(adapter_dir: Path) -> dict:
    """lorafit.json, checked: a damaged file is one error naming it, not a traceback further on."""
    path = adapter_dir / INFO_NAME
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(info, dict):
            raise ValueError(f"a JSON {type(info).__name__}, not a JSON object")
        for key, types in _INFO_TYPES.items():
            if key in info and (not isinstance(info[key], types) or isinstance(info[key], bool) and types is not bool):
                raise ValueError(f"'{key}' is {info[key]!r}")
        if info.get("task", "classification") not in _INFO_TASKS:
            raise ValueError(f"'task' is {info['task']!r}, not {', '.join(_INFO_TASKS)}")
        if "id2label" in info:
            if sorted(info["id2label"], key=lambda k: (len(k), k)) != [str(i) for i in range(len(info["id2label"]))]:
                raise ValueError(f"'id2label' has keys {list(info['id2label'])!r}, not the class numbers 0, 1, ...")
            info["id2label"] = {int(k): v for k, v in info["id2label"].items()}
    except (OSError, UnicodeDecodeError, ValueError) as err:  # json's decode errors are ValueErrors
        raise LorafitError(f"'{path}' is damaged ({err}): copy it again from the run that trained the adapter, or "
                           "delete it (then pass --model, and labels show as LABEL_0, LABEL_1, ...)") from None
    return info


# what lorafit writes into lorafit.json, by type
_INFO_TYPES = {"task": str, "base_model": (str, type(None)), "id2label": dict, "max_length": (int, type(None)),
               "truncation_side": str, "text_column": str, "text_pair_column": (str, type(None)),
               "label_column": str, "chat": bool, "train_on_prompt": bool, "tokens_column": str,
               "tags_column": (str, type(None)), "input_column": str, "target_column": str,
               "quantization": dict}
_INFO_TASKS = ("classification", "causal-lm", "token-classification", "seq2seq")
