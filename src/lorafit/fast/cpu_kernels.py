"""Which CPU kernels lorafit's training and evaluation loops let PyTorch use.

In an fp32 transformer on the CPU, oneDNN runs exactly one operator: GELU (forward and backward). It
compiles a kernel for every input shape it meets and caches up to 1,024 of them. Batches padded to
their own longest text, as length-grouped batches are, bring dozens of shapes per epoch. In the
benchmark's MiniLM epoch (3,000 texts, lengths 8-64) those cached kernels raised peak resident memory
from about 950 to 1,075 MiB. ATen's own vectorised GELU keeps nothing between calls and trained as
fast or faster (76-77 against 72-75 samples/s in alternated runs).

Under bf16/fp16 autocast the same fp32 model computes its matmuls in low precision, and there oneDNN
holds the AVX512-BF16/AMX kernels: without them a bf16 MiniLM epoch ran over ten times slower than fp32.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _wants_onednn(model: nn.Module, compute_dtype: torch.dtype | None) -> bool:
    """oneDNN is the fast path for convolutions and for bf16/fp16 matmuls on the CPU: keep it there."""
    if compute_dtype in (torch.bfloat16, torch.float16):
        return True
    for module in model.modules():
        if isinstance(module, _CONVOLUTIONS):
            return True
    parameter = next(model.parameters(), None)
    return parameter is None or parameter.device.type != "cpu" or parameter.dtype != torch.float32


@contextmanager
def shape_free_kernels(model: nn.Module, compute_dtype: torch.dtype | None = None) -> Iterator[None]:
    """Run the block with oneDNN off when ``model`` is an fp32 CPU model without convolutions.

    ``compute_dtype``: what autocast will compute in within the block, when it is not the model's dtype."""
    if _wants_onednn(model, compute_dtype) or not torch.backends.mkldnn.enabled:
        yield
        return
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = True
