"""The running batch itself: merged caches keep each row's own tokens, leaving rows trim the padding, and
the real SmolLM2 with two adapters batches as it generates alone."""

from __future__ import annotations

import asyncio

import pytest
import torch

from conftest import tiny_gpt2
from test_generate import build_base, build_tokenizer

from lorafit.config import LoraConfig
from lorafit.model import LoraModel, get_lora_model
from lorafit.serving.decoding import TextStream, sampler
from lorafit.serving.generation import GenerateRequest, RunningBatch


def request(ids: list[int], adapter: str = "__base__") -> GenerateRequest:
    return GenerateRequest("m", adapter, ids, 8, sampler(0, 1, None, torch.device("cpu")), TextStream(None, []),
                           frozenset(), handoff=None)


def greedy_alone(model, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding the slow way: the whole sequence through the model at every step, no cache, no padding."""
    sequence = list(ids)
    for _ in range(steps):
        sequence.append(int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[len(ids):]


@pytest.mark.parametrize("build", [lambda: build_base(len(build_tokenizer())), tiny_gpt2], ids=["llama", "gpt2"])
def test_rows_that_leave_take_their_padding_with_them(build):
    """Llama's rotary positions and GPT-2's learned ones both follow each row's own position ids."""
    model = LoraModel(build()).eval()
    batch = RunningBatch(model, pad_id=0)
    prompts = {"long": list(range(10, 40)), "short": [11, 12, 13], "mid": list(range(20, 30))}
    generated = {name: [] for name in prompts}
    with torch.inference_mode():
        for name in ("long", "short"):  # the long one first, so the short one is left-padded by 30 - 3 columns
            logits, cache, mask = batch.prefill([request(prompts[name])])
            batch.add([request(prompts[name])], [int(logits[0].argmax())], cache, mask)
            generated[name].append(batch.rows[-1].next_token)
        for step in range(6):
            if step == 2:  # the long row leaves: the short row's padding columns go with it
                batch.keep([1])
                assert batch.mask.shape[1] == 3 + 2 and bool(batch.mask.all())
                assert batch.cache.layers[0].keys.shape[2] == batch.mask.shape[1]
                logits, cache, mask = batch.prefill([request(prompts["mid"])])
                batch.add([request(prompts["mid"])], [int(logits[0].argmax())], cache, mask)
                generated["mid"].append(batch.rows[-1].next_token)
            names = ["short", "mid"] if step >= 2 else ["long", "short"]
            logits = batch.step()
            for row, name, row_logits in zip(batch.rows, names, logits):
                row.next_token = int(row_logits.argmax())
                generated[name].append(row.next_token)
    with torch.inference_mode():
        for name, tokens in generated.items():
            assert tokens == greedy_alone(model.model, prompts[name], len(tokens)), name


@pytest.mark.slow
def test_smollm2_two_adapters_batched_equal_each_alone(tmp_path):
    """Four requests on two adapters and the base at once on the real model, each as `lorafit generate` gives it."""
    from transformers import AutoModelForCausalLM

    from lorafit.inference.base_models import load_tokenizer, resolve_model
    from lorafit.inference.generate import GenerationSettings, generate_replies
    from lorafit.serving.engine import Engine, SamplingParams
    from lorafit.inference.adapter_info import save_adapter_info

    path = resolve_model("smollm2")
    for i, name in enumerate(("poet", "coder")):
        torch.manual_seed(i)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        lora = get_lora_model(AutoModelForCausalLM.from_pretrained(path), config)
        for param in lora.parameters():
            if param.requires_grad:  # small non-zero factors: the adapters change replies without wrecking them
                torch.nn.init.normal_(param, std=0.02)
        lora.save_pretrained(tmp_path / name)
        save_adapter_info(tmp_path / name, {"task": "causal-lm", "base_model": "smollm2"})
    rows = [("poet", "Write a haiku about autumn."), ("coder", "What is a Python list?"),
            ("smollm2", "Name three colours."), ("poet", "Say hello.")]
    engine = Engine(max_batch=4)
    for name in ("poet", "coder"):
        engine.add_adapter(name, tmp_path / name)
    engine.start()

    async def run():
        async def one(name, prompt):
            ids = engine.encode_chat(name, [{"role": "user", "content": prompt}])
            return "".join([d.text async for d in engine.generate(name, ids, SamplingParams(max_tokens=24))])

        replies = await asyncio.gather(*[one(name, prompt) for name, prompt in rows])
        await engine.shutdown()
        return replies

    replies = asyncio.run(run())
    model = LoraModel(AutoModelForCausalLM.from_pretrained(path))
    for name in ("poet", "coder"):
        model.load_adapter(tmp_path / name, name)
    model.eval()
    tokenizer = load_tokenizer(path, padding_side="left")
    alone = [generate_replies(model, tokenizer, [prompt], GenerationSettings(batch_size=1, max_new_tokens=24),
                              adapter_names=["__base__" if name == "smollm2" else name])[0] for name, prompt in rows]
    assert replies == alone
    assert len(set(alone[:3])) == 3 and all(alone)
