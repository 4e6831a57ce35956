"""What llama.cpp calls things: its architecture names, its tensor names, its Q/K row order, its tensor types.

Tensor names come from the `gguf` package's ``TensorNameMap`` (the table llama.cpp's own converter uses).
llama.cpp stores a Llama or Mistral attention's query and key rows interleaved per head (its converter
permutes them; transformers' GGUF loader undoes that when lorafit de-quantizes a base), so any row-side
tensor of ``q_proj``/``k_proj`` (a LoRA B, a merged weight) gets the same permutation on the way out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorafit.errors import LorafitError
from lorafit.files import atomic_path

# transformers model_type -> (llama.cpp architecture, whether its Q/K rows are permuted). Mistral runs as
# "llama" in llama.cpp (its converter maps MistralForCausalLM there).
ARCHITECTURES = {
    "llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False), "qwen3": ("QWEN3", False),
    "gemma": ("GEMMA", False), "gemma2": ("GEMMA2", False), "gemma3_text": ("GEMMA3", False),
    "phi3": ("PHI3", False),
}
OUTTYPES = ("f32", "f16", "q8_0")
BASE_OUTTYPE = "base"  # --merged only: each changed tensor in the base GGUF's own type for it
Q8_BLOCK = 32  # q8_0 packs rows in blocks of 32 values


@dataclass
class GgufArchitecture:
    """One base model's layout in llama.cpp: its architecture name and how its tensors are named."""

    name: str
    permutes_qk: bool
    n_head: int
    n_head_kv: int
    name_map: object  # gguf.TensorNameMap

    def tensor_name(self, module: str) -> str:
        """llama.cpp's name for a transformers module's weight (``model.layers.0.self_attn.q_proj`` ->
        ``blk.0.attn_q.weight``)."""
        found = self.name_map.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if found is None:
            raise LorafitError(f"module '{module}' has no counterpart in llama.cpp's '{self.name}' models, so it "
                               "cannot be exported: train without it (--target-modules) or use --format onnx")
        return found

    def to_llama_rows(self, module: str, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (a tensor whose first axis is the module's output) in llama.cpp's row order."""
        if not self.permutes_qk or not module.endswith(("q_proj", "k_proj")):
            return rows
        heads = self.n_head if module.endswith("q_proj") else self.n_head_kv
        # llama.cpp's converter: per head, the first and second halves of the rotary pairs are interleaved
        return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_architecture(model_config) -> GgufArchitecture:
    """The llama.cpp layout of a transformers config, or a one-line error naming what is supported."""
    import gguf

    model_type = getattr(model_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise LorafitError(f"lorafit exports GGUF for {supported} models, not '{model_type}': "
                           "use `lorafit merge` and llama.cpp's convert_hf_to_gguf.py, or --format onnx for a classifier")
    arch_key, permutes = ARCHITECTURES[model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_key)
    n_head = model_config.num_attention_heads
    return GgufArchitecture(name=gguf.MODEL_ARCH_NAMES[arch], permutes_qk=permutes, n_head=n_head,
                            n_head_kv=getattr(model_config, "num_key_value_heads", None) or n_head,
                            name_map=gguf.get_tensor_name_map(arch, model_config.num_hidden_layers))


def check_outtype(outtype: str, merged: bool = False) -> None:
    allowed = OUTTYPES + (BASE_OUTTYPE,) if merged else OUTTYPES
    if outtype not in allowed:
        extra = "" if merged else f" ('{BASE_OUTTYPE}' too with --merged)"
        raise LorafitError(f"--outtype must be one of {', '.join(allowed)}{extra}, got '{outtype}'")


def encode(tensor: torch.Tensor, outtype: str) -> tuple[np.ndarray, object]:
    """A tensor as GGUF stores it: (numpy data, ggml type). 1-D tensors stay f32, as llama.cpp keeps norms;
    q8_0 needs rows of a multiple of 32 values, so other rows (a rank-8 LoRA B) fall back to f16, as in
    llama.cpp's converter."""
    import gguf

    data = tensor.detach().to(torch.float32).contiguous().numpy()
    if data.ndim < 2 or outtype == "f32":
        return data, gguf.GGMLQuantizationType.F32
    if outtype == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
        kind = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data, kind), kind
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def encode_like(tensor: torch.Tensor, kind, name: str) -> tuple[np.ndarray, object]:
    """A tensor in a given ggml type (the base GGUF's for it), where the `gguf` package can write that type."""
    import gguf

    data = tensor.detach().to(torch.float32).contiguous().numpy()
    if kind == gguf.GGMLQuantizationType.F32:
        return data, kind
    try:
        return gguf.quants.quantize(data, kind), kind
    except (NotImplementedError, gguf.quants.QuantError):
        raise LorafitError(f"the base GGUF stores '{name}' as {kind.name}, which lorafit cannot write: "
                           "pass --outtype q8_0, f16 or f32") from None


def check_writable(output: Path, overwrite: bool, flag: str = "--output") -> None:
    """Refuse to replace an existing file unless asked, before any slow work."""
    from lorafit.files import check_output_file

    check_output_file(output, flag, example="model.gguf")
    if output.exists() and not overwrite:
        raise LorafitError(f"{flag} '{output}' already exists; pass another path, or --overwrite to replace it")


@contextlib.contextmanager
def gguf_file(output: Path, arch_name: str) -> Iterator[object]:
    """A ``gguf.GGUFWriter`` for ``output``: the block adds metadata and tensors, and the file is written
    (header, metadata, tensors) only when it ends without an error, atomically."""
    import gguf

    with atomic_path(output) as tmp:
        writer = gguf.GGUFWriter(tmp, arch_name)
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
