"""What is served: adapters read from their folders, and the base models they share, loaded once each.

Adapters that can share one loaded model share it: causal-LM adapters of one base, and classifier
adapters of one base with the same number of classes (their heads are per-adapter copies of the
base's head, so they must have its shape). Everything else gets its own loaded model and worker.
Loading goes through lorafit's inference loaders, as `lorafit generate` and `lorafit predict` do.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafit.data.classification import check_max_length
from lorafit.errors import LorafitError
from lorafit.fast import use_fast_paths
from lorafit.inference.base_models import load_causal_lm, load_classifier, load_tokenizer, resolve_model
from lorafit.inference.generate import stop_token_ids
from lorafit.inference.quantization import inference_quantization, quantizes
from lorafit.inference.loading import adapter_task, check_adapter_dir, id2label_from_weights, same_base_key
from lorafit.model import LoraModel
from lorafit.serialization import read_adapter_config
from lorafit.serving.schema import BASE_ROUTE, ModelEntry
from lorafit.inference.adapter_info import load_adapter_info
from lorafit.training.settings import DEFAULT_MAX_LENGTH, QuantizeSettings

CAUSAL, CLASSIFICATION = "causal-lm", "classification"


@dataclass
class AdapterSpec:
    """An adapter folder, read (not loaded): what it is and which loaded model it can join."""

    name: str
    directory: Path
    task: str
    base: str  # the base model as the adapter (or --model) names it
    labels: list[str] | None = None  # classifiers: class names in class order
    max_length: int | None = None  # classifiers: texts are truncated as in training
    truncation_side: str = "right"
    quantization: QuantizeSettings | None = None  # the base as the adapter was trained on it (QLoRA)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def key(self) -> tuple:
        """Adapters with equal keys share one loaded model."""
        return base_key(self.base, self.task, len(self.labels) if self.labels else None, self.quantization)


def base_key(base: str, task: str, num_labels: int | None = None,
             quantization: QuantizeSettings | None = None) -> tuple:
    return (same_base_key(base), task, num_labels, repr(quantization) if quantizes(quantization) else None)


def read_adapter_spec(name: str, directory: str | Path, model: str | None = None) -> AdapterSpec:
    """Read an adapter's folder without loading it; a LorafitError names what is wrong with it."""
    if name == BASE_ROUTE:
        raise LorafitError(f"adapter name {BASE_ROUTE!r} is reserved for the base model; pick another name")
    path = check_adapter_dir(directory)
    info = load_adapter_info(path)
    config = read_adapter_config(path)
    base = model or info.get("base_model") or config.base_model_name_or_path
    if not base:
        raise LorafitError(f"adapter '{path}' does not say which base model it was trained on; pass its base model")
    task = adapter_task(path, info)
    if task not in (CAUSAL, CLASSIFICATION):
        command = "lorafit predict" if task == "token-classification" else "lorafit generate"
        raise LorafitError(f"adapter '{path}' is a {task} adapter; lorafit serve serves causal-LM and classifier "
                           f"adapters: use `{command} --adapter {path}` for it")
    spec = AdapterSpec(name, path, task, str(base), quantization=inference_quantization(None, info))
    if task == CLASSIFICATION:
        if info.get("text_pair_column"):
            raise LorafitError(f"adapter '{path}' classifies text pairs; the server classifies single texts, "
                               "use `lorafit predict --input FILE` for it")
        id2label = info.get("id2label") or id2label_from_weights(path)
        spec.labels = [id2label[i] for i in range(len(id2label))]
        spec.max_length = info.get("max_length") or DEFAULT_MAX_LENGTH[CLASSIFICATION]
        spec.truncation_side = info.get("truncation_side", "right")
    return spec


class ServedBase:
    """One loaded base model with its adapters; only its worker thread touches ``model``."""

    def __init__(self, base: str, task: str, model: LoraModel, tokenizer, num_labels: int | None = None,
                 quantization: QuantizeSettings | None = None) -> None:
        self.id = base
        self.task = task
        self.key = base_key(base, task, num_labels, quantization)
        self.model = model
        self.tokenizer = tokenizer
        self.adapters: dict[str, AdapterSpec] = {}
        self.created = int(time.time())
        config = model.get_base_model().config
        self.context_length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.stop_ids = stop_token_ids(model.get_base_model(), tokenizer) if task == CAUSAL else []
        self.pad_id = next((i for i in (tokenizer.pad_token_id, *self.stop_ids, 0) if i is not None))
        self.decoder = copy.deepcopy(tokenizer)  # the worker decodes with its own copy while the app encodes
        self.text_tokenizers: dict[str, object] = {}  # classifiers: per adapter, truncating on its side

    def add(self, spec: AdapterSpec) -> None:
        """Load the adapter's weights under its name; one that does not fit leaves the model as it was."""
        if self.task == CLASSIFICATION:
            tokenizer = copy.deepcopy(self.tokenizer)
            tokenizer.truncation_side = spec.truncation_side
            check_max_length(tokenizer, spec.max_length, pair=False)
        self.model.load_adapter(spec.directory, spec.name)
        self.model.eval()
        if self.task == CLASSIFICATION:
            self.text_tokenizers[spec.name] = tokenizer
            use_fast_paths(self.model)  # as `lorafit predict` runs it
        self.adapters[spec.name] = spec

    def remove(self, name: str) -> None:
        self.model.delete_adapter(name)
        self.adapters.pop(name)
        self.text_tokenizers.pop(name, None)

    def entry(self) -> ModelEntry:
        return ModelEntry(self.id, self.task, None, self.id, self.created, self.context_length, None)

    def adapter_entry(self, name: str) -> ModelEntry:
        spec = self.adapters[name]
        return ModelEntry(name, self.task, self.id, str(spec.directory), spec.created, self.context_length,
                          list(spec.labels) if spec.labels else None)


def load_base(base: str, task: str, first: AdapterSpec | None = None, device: str | None = None) -> ServedBase:
    """Load a base model (and its tokenizer) for serving; ``first`` is a classifier adapter giving the labels."""
    path = resolve_model(base)
    quantization = first.quantization if first is not None else None
    tokenizer_dir = first.directory / "tokenizer" if first is not None else None
    tokenizer = load_tokenizer(str(tokenizer_dir) if tokenizer_dir and tokenizer_dir.is_dir() else path,
                               padding_side="right" if task == CLASSIFICATION else "left")
    if task == CLASSIFICATION:
        if first is None:
            raise LorafitError(f"base model '{base}' has no trained classification head to serve alone; "
                               "serve a classifier adapter trained on it")
        id2label = dict(enumerate(first.labels))
        model = load_classifier(path, num_labels=len(id2label), id2label=id2label,
                                label2id={v: k for k, v in id2label.items()}, pad_token_id=tokenizer.pad_token_id,
                                quantization=quantization)
    else:
        model = load_causal_lm(path, quantization=quantization)
        unsupported = cache_layers_supported(model.config)
        if unsupported:
            raise LorafitError(f"base model '{base}' cannot be batched by lorafit serve ({unsupported}); "
                               "serve a model with full attention in every layer (Llama, GPT-2, Qwen2, ...)")
    if not quantizes(quantization):  # a quantized base stays where it was loaded: 8-bit layers cannot be moved
        model.to(torch.device(device or default_device()))
    lora_model = LoraModel(model)
    lora_model.eval()
    return ServedBase(base, task, lora_model, tokenizer, len(first.labels) if task == CLASSIFICATION else None,
                      quantization)


def cache_layers_supported(config) -> str | None:
    """None if the model's cache is plain full-attention layers (which merging handles), else why not."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    kinds = {type(layer).__name__ for layer in DynamicCache(config=config).layers if type(layer) is not DynamicLayer}
    return f"its cache has {', '.join(sorted(kinds))} layers" if kinds else None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
