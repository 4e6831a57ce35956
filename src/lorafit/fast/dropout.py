"""Dropout on the CPU with a quarter of the random numbers torch's draws.

torch's CPU dropout draws one Mersenne Twister number per element: about 5 ns each here, more than
the rank-r matmul the dropped input feeds. This draws 64 random bits per four elements instead. An
element is kept when its 16 bits clear a threshold, so it is dropped with probability
round(p * 65536) / 65536 (p=0.05 becomes 0.0500031). Kept elements are scaled by the inverse of
the probability actually used, so the expected output is still exactly the input.
On CUDA, torch's fused Philox kernel is already cheap and is used as it is.

LoRA layers use it for their input dropout. Training loops also swap it in, for the length of the
loop, for the base model's own ``nn.Dropout`` layers: MiniLM has 20, 14 of them on hidden states (an
attention module's dropout passes only its rate to the attention kernel, which keeps torch's).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

LEVELS = 1 << 16
"""Each element's randomness: 16 bits, four per 64-bit draw."""


class FastDropout(nn.Dropout):
    """``nn.Dropout(p)`` whose CPU masks cost a quarter of the random numbers (see the module docstring)."""

    def __init__(self, p: float) -> None:
        super().__init__(p)
        dropped_levels = round(p * LEVELS)
        self.threshold = dropped_levels - LEVELS // 2  # int16 lanes at or above it are kept
        self.keep_scale = LEVELS / (LEVELS - dropped_levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu":
            return super().forward(x)
        count = x.numel()
        bits = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # every bit random
        keep = bits.view(torch.int16)[:count].view(x.shape) >= self.threshold
        return x * (keep * self.keep_scale).to(x.dtype)


@contextmanager
def fast_dropouts(model: nn.Module) -> Iterator[None]:
    """Within the block, every plain ``nn.Dropout`` of ``model`` (p > 0) is a FastDropout; put back after."""
    swapped = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Dropout and child.p > 0 and not child.inplace]
    for parent, name, child in swapped:
        parent._modules[name] = FastDropout(child.p).train(child.training)
    try:
        yield
    finally:
        for parent, name, original in swapped:
            original.train(parent._modules[name].training)
            parent._modules[name] = original
