"""What an unmerged rank-r update costs beside its base layer, operation by operation (the `lora_ops` case).

For every Linear shape of the classifier base (on BERT: hidden -> hidden for query, key, value and the
attention output; hidden -> intermediate; intermediate -> hidden), over the inference case's tokens:
the base layer (``F.linear``, a compute-bound GEMM), ``x @ A.T`` (reads all of x for r columns) and
``y.addmm_(h, B.T)`` (reads and rewrites all of y), as lorafit's fast path runs them while training; the
merged weight ``W0 + s B A`` built for one forward, as it runs them without a graph; and one matmul
for the A factors of three layers reading the same input (query, key, value) against three.
The two rank-r products do ~r/in and ~r/out of the base's arithmetic, but both stream a whole
activation through memory, which is what an unmerged adapter's overhead is made of.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import Clock, interleaved, summarize
from bench.fixtures import Setup


def layer_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) of each kind of Linear in a BERT-like encoder layer."""
    hidden, inner = config.hidden_size, config.intermediate_size
    return {"attention (q, k, v, o)": (hidden, hidden), "intermediate": (hidden, inner), "output": (inner, hidden)}


def shape_variants(tokens: int, fan_in: int, fan_out: int, r: int, generator: torch.Generator) -> dict:
    x = torch.randn(tokens, fan_in, generator=generator)
    weight, bias = torch.randn(fan_out, fan_in, generator=generator), torch.randn(fan_out, generator=generator)
    a, b = torch.randn(r, fan_in, generator=generator), torch.randn(fan_out, r, generator=generator)
    y, h = F.linear(x, weight, bias), x @ a.T
    a3 = torch.randn(3 * r, fan_in, generator=generator)
    return {"base": lambda: F.linear(x, weight, bias),
            "lora_A": lambda: x @ a.T,
            "lora_B": lambda: y.addmm_(h, b.T, alpha=2.0),
            "unmerged": lambda: F.linear(x, weight, bias).addmm_(x @ a.T, b.T, alpha=2.0),
            "merged_weight": lambda: F.linear(x, torch.addmm(weight, b, a, alpha=2.0), bias),
            "three_A": lambda: [x @ a.T for _ in range(3)],
            "fused_A": lambda: x @ a3.T}


def run_lora_ops(setup: Setup, options: dict) -> dict:
    from transformers import AutoConfig

    s = setup.sizes
    config = AutoConfig.from_pretrained(setup.cls_model)
    tokens = s.infer_batch * s.infer_tokens
    generator = torch.Generator().manual_seed(0)
    out = {"tokens": tokens, "r": s.r, "threads": torch.get_num_threads(), "shapes": {}}
    with torch.inference_mode():
        for name, (fan_in, fan_out) in layer_shapes(config).items():
            variants = shape_variants(tokens, fan_in, fan_out, s.r, generator)
            times = interleaved(variants, s.infer_rounds, 2, Clock())
            out["shapes"][name] = {"in": fan_in, "out": fan_out, **summarize(times, baseline="base")}
    return out
