"""A merged model as one GGUF file for llama.cpp: the base model's GGUF with the tensors the adapter changed
replaced by their merged values.

Everything else comes from the base GGUF unchanged: its metadata (architecture settings, tokenizer, chat
template) and the tensors the adapter does not touch, bit for bit in their own quantization. The merged
tensors (``W0 + scaling * B A``, with ``W0`` de-quantized as lorafit trained on it) are written in
``--outtype`` (f16 by default; f32 is exact, q8_0 smaller; ``base`` re-quantizes each in the base GGUF's own type,
where the `gguf` package can write it: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, not the K-quants).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.export.gguf_adapter import ExportResult
from lorafit.export.gguf_names import (BASE_OUTTYPE, GgufArchitecture, check_outtype, encode, encode_like,
                                       gguf_architecture, gguf_file)
from lorafit.layers import LoraLayer
from lorafit.serialization import WEIGHTS_NAME, plain_name

_ADAPTER_KEY_PREFIX = "base_model.model."


def changed_parameters(model, adapter_dir: Path) -> list[str]:
    """Names (in the transformers model) of the parameters merging the adapter changes: each LoRA layer's weight,
    and whatever the adapter file holds in full (trained heads, biases, resized embeddings)."""
    from safetensors import safe_open

    names = [f"{module}.weight" for module, layer in model.get_base_model().named_modules()
             if isinstance(layer, LoraLayer)]
    with safe_open(str(adapter_dir / WEIGHTS_NAME), "pt") as weights:
        names += [plain_name(key.removeprefix(_ADAPTER_KEY_PREFIX)) for key in weights.keys() if ".lora_" not in key]
    return list(dict.fromkeys(names))


def merged_gguf_tensors(merged, names: list[str], arch: GgufArchitecture) -> dict[str, torch.Tensor]:
    """``{gguf name: merged tensor}`` for the changed parameters, in llama.cpp's row order."""
    state = merged.state_dict()
    tensors = {}
    for name in names:
        module, _, kind = name.rpartition(".")
        found = arch.name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if found is None or name not in state:
            raise LorafitError(f"the adapter changes '{name}', which llama.cpp's '{arch.name}' models do not have: "
                               "use --format onnx, or `lorafit merge` and convert that folder with llama.cpp")
        tensors[found] = arch.to_llama_rows(module, state[name].detach().float())
    return tensors


def copy_metadata(reader, writer) -> None:
    """Every key of the base GGUF (the writer adds the architecture itself; GGUF.* are the reader's own)."""
    import gguf

    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == gguf.Keys.General.ARCHITECTURE:
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub_type)


def export_gguf_merged(model, adapter_dir: Path, base_gguf: Path, output: Path, outtype: str = "f16") -> ExportResult:
    """Merge the adapter loaded in ``model`` (a LoraModel, consumed) and write the whole model as one GGUF."""
    import gguf

    started = time.perf_counter()
    check_outtype(outtype, merged=True)
    arch = gguf_architecture(model.get_base_model().config)
    reader = gguf.GGUFReader(base_gguf)
    base_arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if base_arch is None or base_arch.contents() != arch.name:
        found = base_arch.contents() if base_arch is not None else "no"
        raise LorafitError(f"--base-gguf '{base_gguf}' is a {found!r} model, but the adapter's base is a "
                           f"'{arch.name}' model: pass the GGUF of the model the adapter was trained on")
    names = changed_parameters(model, adapter_dir)
    merged = model.merge_and_unload()
    changed = merged_gguf_tensors(merged, names, arch)
    base_tensors = {t.name: t for t in reader.tensors}
    for name, tensor in changed.items():
        if name not in base_tensors or tuple(int(n) for n in base_tensors[name].shape) != tuple(reversed(tensor.shape)):
            raise LorafitError(f"tensor '{name}' of the merged model does not fit --base-gguf '{base_gguf}': "
                               "pass the GGUF of the model the adapter was trained on")
    with gguf_file(output, arch.name) as writer:
        copy_metadata(reader, writer)
        for name, base in base_tensors.items():
            if name in changed and outtype == BASE_OUTTYPE:
                data, kind = encode_like(changed[name], base.tensor_type, name)
            elif name in changed:
                data, kind = encode(changed[name], outtype)
            else:
                data, kind = base.data, base.tensor_type
            writer.add_tensor(name, data, raw_dtype=kind)
    return ExportResult(output, output.stat().st_size, len(base_tensors), time.perf_counter() - started)
