"""Loading a saved adapter with its base model and tokenizer, for the inference commands."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.model import DEFAULT_ADAPTER, LoraModel
from lorafit.inference.adapter_info import load_adapter_info
from lorafit.inference.base_models import (load_causal_lm, load_classifier, load_seq2seq_lm, load_tokenizer,
                                          resolve_model)
from lorafit.inference.quantization import inference_quantization, quantizes
from lorafit.training.settings import QuantizeSettings
from lorafit.serialization import CONFIG_NAME, WEIGHTS_NAME, damaged_weights_error, read_adapter_config


@dataclass
class LoadedAdapter:
    model: LoraModel
    tokenizer: object
    info: dict
    task: str


def adapter_task(adapter_dir: Path, info: dict) -> str:
    """classification, causal-lm, token-classification or seq2seq, from lorafit's info file or the adapter's
    PEFT task_type."""
    if "task" in info:
        return info["task"]
    task_type = read_adapter_config(adapter_dir).task_type
    return {"CAUSAL_LM": "causal-lm", "TOKEN_CLS": "token-classification", "SEQ_2_SEQ_LM": "seq2seq"}.get(
        task_type, "classification")


def check_adapter_dir(adapter: str | Path) -> Path:
    path = Path(adapter)
    if path.is_file():
        raise LorafitError(f"adapter '{path}' is a file; pass the folder holding it (a run's best/ folder)")
    if not path.is_dir():
        raise LorafitError(f"adapter directory '{path}' does not exist; pass the best/ folder of a run "
                           "(or any folder holding adapter_config.json)")
    if not (path / CONFIG_NAME).is_file():
        best = path / "best"
        hint = f"; did you mean '{best}'?" if (best / CONFIG_NAME).is_file() else ""
        raise LorafitError(f"'{path}' holds no {CONFIG_NAME}{hint}")
    return path


def load_adapter_for_inference(adapter: str | Path, model: str | None = None, padding_side: str = "right",
                               quantization: QuantizeSettings | None = None) -> LoadedAdapter:
    """Base model (``model`` or the one the adapter names), its tokenizer, and the adapter on top; the base
    quantized as ``quantization`` says, else as the adapter was trained."""
    adapter_dir = check_adapter_dir(adapter)
    info = load_adapter_info(adapter_dir)
    config = read_adapter_config(adapter_dir)  # a damaged config fails before the base model is loaded
    base_name = model or info.get("base_model") or config.base_model_name_or_path
    if not base_name:
        raise LorafitError(f"adapter '{adapter_dir}' does not say which base model it was trained on; pass --model")
    base_path = resolve_model(base_name)
    tokenizer_dir = adapter_dir / "tokenizer"
    tokenizer = load_tokenizer(str(tokenizer_dir) if tokenizer_dir.is_dir() else base_path, padding_side=padding_side)
    task = adapter_task(adapter_dir, info)
    quantization = inference_quantization(quantization, info)
    if task in ("classification", "token-classification"):
        id2label = info.get("id2label") or id2label_from_weights(adapter_dir)
        base = load_classifier(base_path, num_labels=len(id2label), id2label=id2label,
                               label2id={v: k for k, v in id2label.items()}, pad_token_id=tokenizer.pad_token_id,
                               per_token=task == "token-classification", quantization=quantization)
    elif task == "seq2seq":
        base = load_seq2seq_lm(base_path, quantization=quantization)
    else:
        base = load_causal_lm(base_path, quantization=quantization)
        if base.generation_config.pad_token_id is None:
            base.generation_config.pad_token_id = tokenizer.pad_token_id
    lora_model = LoraModel.from_pretrained(base, adapter_dir)
    lora_model.eval()
    return LoadedAdapter(lora_model, tokenizer, info, task)


def check_adapters(specs: dict[str, Path], model: str | None, quantization: QuantizeSettings | None = None) -> None:
    """Refuse classifier adapters, and adapters of different tasks or bases (or, unless ``quantization`` says how
    to load it, of a base quantized differently), before loading anything."""
    bases: dict[str, str] = {}
    tasks: dict[str, str] = {}
    quantized: dict[str, QuantizeSettings | None] = {}
    for name, directory in specs.items():
        info = load_adapter_info(directory)
        task = tasks[name] = adapter_task(directory, info)
        if task not in ("causal-lm", "seq2seq"):
            raise LorafitError(f"'{directory}' is a {task} adapter; use `lorafit predict` for it")
        if len(set(tasks.values())) > 1:
            raise LorafitError(f"'{directory}' is a {task} adapter but '{specs[next(iter(specs))]}' is a "
                               f"{tasks[next(iter(specs))]} adapter; load adapters of one kind together")
        base = info.get("base_model") or read_adapter_config(directory).base_model_name_or_path
        if base:
            bases[name] = same_base_key(base)
        quantized[name] = inference_quantization(None, info)
    if model is None and len(set(bases.values())) > 1:
        listing = ", ".join(f"{name}: {base}" for name, base in bases.items())
        raise LorafitError(f"the adapters were trained on different base models ({listing}); "
                           "load only adapters of one base model, or pass --model to use one for all")
    first = next(iter(specs))
    other = next((name for name in specs if quantized[name] != quantized[first]), None)
    if other is not None and (quantization is None or quantization.quantize is None):
        raise LorafitError(f"'{other}' was trained on the base {_quantized(quantized[other])} but '{first}' on it "
                           f"{_quantized(quantized[first])}, and the base is loaded once for all: pass --quantize "
                           "(4bit, 8bit or none) to load it one way for every adapter")


def _quantized(settings: QuantizeSettings | None) -> str:
    if not quantizes(settings):
        return "unquantized"
    kind = f" {settings.bnb_4bit_quant_type}" if settings.quantize == "4bit" else ""
    return f"quantized ({settings.quantize}{kind})"


def same_base_key(base: str) -> str:
    """One spelling per base model: local folders as absolute paths, names as given."""
    path = Path(base).expanduser()
    return str(path.resolve()) if path.is_dir() else base


def load_adapters(specs: dict[str, Path], model: str | None,
                  quantization: QuantizeSettings | None = None) -> LoadedAdapter:
    """The base model with every adapter loaded under its name, ready for left-padded batches."""
    check_adapters(specs, model, quantization)
    loaded = load_adapter_for_inference(next(iter(specs.values())), model, padding_side="left",
                                        quantization=quantization)
    if list(specs) != [DEFAULT_ADAPTER]:
        # load_adapter_for_inference names its one adapter "default": start again with the names given
        loaded.model = LoraModel(loaded.model.unload())
        for name, directory in specs.items():
            loaded.model.load_adapter(directory, name)
    loaded.model.eval()
    return loaded


def id2label_from_weights(adapter_dir: Path) -> dict[int, str]:
    """A PEFT adapter without lorafit's info file: count classes from the saved head's output rows."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(adapter_dir / WEIGHTS_NAME), "pt") as f:
            heads = [k for k in f.keys() if k.endswith(("classifier.weight", "out_proj.weight", "score.weight"))]
            num_labels = f.get_slice(heads[0]).get_shape()[0] if heads else 0
    except (SafetensorError, OSError) as err:
        raise damaged_weights_error(adapter_dir / WEIGHTS_NAME, err) from None
    if not heads:
        raise LorafitError(f"adapter '{adapter_dir}' has no classification head; is it a causal-LM adapter?")
    return {i: f"LABEL_{i}" for i in range(num_labels)}
