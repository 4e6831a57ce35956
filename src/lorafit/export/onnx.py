"""A classifier adapter, merged into its base, as an ONNX model for ONNX Runtime, with its tokenizer and labels.

The folder holds ``model.onnx`` (inputs ``input_ids``, ``attention_mask`` and, where the tokenizer makes them,
``token_type_ids``, each (batch, sequence) with both sizes free; output ``logits`` (batch, labels)), the tokenizer
files (their ``model_max_length`` and truncation side are the ones training used), ``config.json`` and
``labels.json`` (label names in class-id order). Probabilities are ``softmax(logits)``.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
from torch import nn

from lorafit.errors import LorafitError
from lorafit.export.gguf_adapter import ExportResult
from lorafit.files import replace_dir, write_json
from lorafit.training.settings import DEFAULT_MAX_LENGTH

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.json"
OPSET = 17
# rows of different lengths, so the traced graph handles padding; a pair, so token_type_ids vary where used
_SAMPLE_TEXTS = ["a short one", "a somewhat longer sample sentence for tracing the graph"]


class _Logits(nn.Module):
    """The classifier with positional inputs and the logits alone as output, as the exporter traces it."""

    def __init__(self, model: nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.model, self.input_names = model, input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, inputs))).logits


def export_onnx(loaded, output: Path) -> ExportResult:
    """Merge the classifier adapter of ``loaded`` (a LoadedAdapter, consumed) and write the ONNX folder ``output``."""
    if loaded.task != "classification":
        raise LorafitError(f"--format onnx exports classifiers; this is a {loaded.task} adapter: "
                           "use --format gguf for llama.cpp or Ollama")
    try:
        import onnx  # noqa: F401  (the exporter writes through it)
    except ImportError:
        raise LorafitError("--format onnx needs the onnx package: pip install 'lorafit[export]'") from None
    started = time.perf_counter()
    merged = loaded.model.merge_and_unload().eval()
    tokenizer = loaded.tokenizer
    tokenizer.model_max_length = loaded.info.get("max_length") or DEFAULT_MAX_LENGTH["classification"]
    tokenizer.truncation_side = loaded.info.get("truncation_side", "right")
    sample = tokenizer(_SAMPLE_TEXTS, padding=True, return_tensors="pt")
    names = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in sample]
    labels = [merged.config.id2label[i] for i in range(merged.config.num_labels)]

    def write(folder: Path) -> None:
        axes = {name: {0: "batch", 1: "sequence"} for name in names} | {"logits": {0: "batch"}}
        with warnings.catch_warnings(), torch.no_grad():
            # the TorchScript exporter traces fixed-shape checks in transformers' masking code; the outputs are
            # compared with the model's at other shapes by the tests
            warnings.simplefilter("ignore")
            torch.onnx.export(_Logits(merged, names), tuple(sample[name] for name in names), folder / MODEL_FILE,
                              input_names=names, output_names=["logits"], dynamic_axes=axes, opset_version=OPSET,
                              dynamo=False)
        tokenizer.save_pretrained(folder)
        merged.config.save_pretrained(folder)
        write_json(folder / LABELS_FILE, labels)

    replace_dir(output, write)
    return ExportResult(output / MODEL_FILE, (output / MODEL_FILE).stat().st_size, len(names),
                        time.perf_counter() - started)
