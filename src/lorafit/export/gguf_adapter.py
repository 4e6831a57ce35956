"""A lorafit (or PEFT) LoRA adapter as a GGUF LoRA adapter that llama.cpp applies with ``--lora``.

llama.cpp adds ``scale * B A x`` with ``scale = adapter.lora.alpha / r`` (r read from each B), one alpha for the
whole file. lorafit's per-module scaling (rsLoRA's ``alpha / sqrt(r)``, ``rank_pattern``, ``alpha_pattern``) is
folded into B so that llama.cpp's scale times B equals lorafit's scaling times B. Trained full modules
(``modules_to_save``, resized embeddings), trained biases and DoRA have no place in a GGUF LoRA adapter and are
refused, pointing to ``--merged``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.export.gguf_names import GgufArchitecture, check_outtype, encode, gguf_architecture, gguf_file
from lorafit.layers import LoraEmbedding, LoraLayer, LoraLinear
from lorafit.serialization import CONFIG_NAME, WEIGHTS_NAME, read_config_json

MERGED_HINT = "export the merged model instead with --merged"


@dataclass
class ExportResult:
    """What an export wrote: the file, its size in bytes, how many tensors, and how long it took."""

    path: Path
    size: int
    tensors: int
    seconds: float


def refuse_unrepresentable(adapter_dir: Path) -> None:
    """One line for anything in the adapter's files that a GGUF LoRA adapter cannot carry."""
    from safetensors import safe_open

    config = read_config_json(adapter_dir)
    if config.get("use_dora"):
        raise LorafitError(f"adapter '{adapter_dir}' uses DoRA, whose magnitude vectors llama.cpp's LoRA adapters "
                           f"cannot carry: {MERGED_HINT}")
    with safe_open(str(adapter_dir / WEIGHTS_NAME), "pt") as weights:
        # a targeted embedding or head is saved whole beside its factors (PEFT's save_embedding_layers): those are
        # base weights, skipped as llama.cpp's converter skips them; a resized one fails the base GGUF's shape check
        others = [key for key in weights.keys() if ".lora_" not in key and not key.endswith(".base_layer.weight")]
    if others:
        what = ("a trained bias" if others[0].endswith(".bias")
                else "a fully trained module (modules_to_save or a resized vocabulary)")
        name = others[0].removeprefix("base_model.model.")
        raise LorafitError(f"adapter '{adapter_dir}' holds '{name}', {what}, which llama.cpp's LoRA adapters cannot "
                           f"carry: {MERGED_HINT}")


def llama_lora_tensors(model, arch: GgufArchitecture, alpha: float,
                       adapter: str = "default") -> dict[str, torch.Tensor]:
    """``{gguf name: tensor}`` for every LoRA layer of ``model`` (a LoraModel), in llama.cpp's layout.

    llama.cpp's ``lora_a`` is PEFT's A and its ``lora_b`` is PEFT's B (a GGUF lists sizes innermost first, so both
    read as llama.cpp expects); for the token embedding it looks up rows of A, so there A is stored transposed.
    """
    base = model.get_base_model()
    tensors: dict[str, torch.Tensor] = {}
    for module, layer in base.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.scaling:
            continue
        refuse_tied_head(base, module)
        name = arch.tensor_name(module)
        if isinstance(layer, LoraLinear):
            if layer.fan_in_fan_out:
                raise LorafitError(f"module '{module}' stores its weight transposed (Conv1D), which llama.cpp's "
                                   f"'{arch.name}' models never do: {MERGED_HINT}")
            lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        elif isinstance(layer, LoraEmbedding):
            lora_a, lora_b = layer.lora_embedding_A[adapter].T, layer.lora_embedding_B[adapter]
        else:
            raise LorafitError(f"module '{module}' is a {type(layer).__name__}, which llama.cpp's LoRA adapters "
                               f"cannot carry: {MERGED_HINT}")
        rank = layer.r[adapter]
        fold = layer.scaling[adapter] * rank / alpha  # 1.0 for plain LoRA; rsLoRA and patterns differ
        lora_b = lora_b.detach().float()
        if not math.isclose(fold, 1.0, rel_tol=1e-12):  # plain LoRA's B is written exactly as trained
            lora_b = lora_b * fold
        tensors[f"{name}.lora_a"] = lora_a.detach().float()
        tensors[f"{name}.lora_b"] = arch.to_llama_rows(module, lora_b)
    if not tensors:
        raise LorafitError("the adapter has no LoRA layers to export")
    return tensors


def refuse_tied_head(base, module: str) -> None:
    """llama.cpp keeps one tensor for a tied input embedding and output head, so LoRA on the head has nowhere to go."""
    if module.endswith("lm_head") and getattr(base.config, "tie_word_embeddings", False):
        raise LorafitError(f"the adapter trains '{module}', which this model ties to its input embedding; llama.cpp "
                           f"stores only the embedding, so a LoRA adapter cannot change the head alone: {MERGED_HINT}")


def check_against_base(tensors: dict[str, torch.Tensor], arch: GgufArchitecture, base_gguf: Path) -> None:
    """Every LoRA pair names a tensor of the base GGUF and fits its shape, as llama.cpp will check on load."""
    import gguf

    reader = gguf.GGUFReader(base_gguf)
    field = reader.get_field("general.architecture")
    base_arch = field.contents() if field is not None else None
    if base_arch != arch.name:
        raise LorafitError(f"the base GGUF '{base_gguf}' is a '{base_arch}' model but the adapter's base is "
                           f"'{arch.name}': pass the GGUF of the model the adapter was trained on")
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # innermost size first
    for key, tensor in tensors.items():
        if not key.endswith(".lora_a"):
            continue
        name = key.removesuffix(".lora_a")
        lora_b = tensors[f"{name}.lora_b"]
        embedding = name == "token_embd.weight"
        wanted = (lora_b.shape[0], tensor.shape[0]) if embedding else (tensor.shape[1], lora_b.shape[0])
        if shapes.get(name) != wanted:
            found = f"has shape {shapes[name]}" if name in shapes else "is missing"
            raise LorafitError(f"tensor '{name}' {found} in the base GGUF '{base_gguf}' but the adapter needs {wanted}: "
                               "pass the GGUF of the model the adapter was trained on (a vocabulary resized in "
                               "training cannot be exported)")


def export_gguf_adapter(model, adapter_dir: Path, output: Path, outtype: str = "f32",
                        base_gguf: Path | None = None) -> ExportResult:
    """Write the adapter loaded in ``model`` (a LoraModel) as a GGUF LoRA adapter at ``output``, atomically."""
    import gguf

    started = time.perf_counter()
    check_outtype(outtype)
    refuse_unrepresentable(adapter_dir)
    arch = gguf_architecture(model.get_base_model().config)
    alpha = float(model.peft_config["default"].lora_alpha)
    tensors = llama_lora_tensors(model, arch, alpha)
    if base_gguf is not None:
        check_against_base(tensors, arch, base_gguf)
    with gguf_file(output, arch.name) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(adapter_dir.resolve().name)
        for name, tensor in tensors.items():
            data, kind = encode(tensor, outtype)
            writer.add_tensor(name, data, raw_dtype=kind)
    return ExportResult(output, output.stat().st_size, len(tensors), time.perf_counter() - started)
