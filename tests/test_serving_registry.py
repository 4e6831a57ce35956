"""Adapters loaded and unloaded while the engine serves: running requests are untouched, a bad adapter
changes nothing, an adapter of another base gets its own loaded base."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch

from test_generate import build_tokenizer, save_adapter
from test_serving_engine import expected, make_engine, models, reply  # noqa: F401
from test_serving_engine import MAX_TOKENS, PROMPTS
from test_serving_worker import Gate

from lorafit.inference.base_models import load_causal_lm, load_tokenizer
from lorafit.inference.generate import GenerationSettings, generate_replies
from lorafit.errors import LorafitError
from lorafit.model import LoraModel
from lorafit.serialization import WEIGHTS_NAME
from lorafit.serving.engine import SamplingParams
from lorafit.serving.errors import AdapterLoadError, BadRequest, UnknownModel


def alone(base_dir, adapter_dir, prompt: str, max_tokens: int) -> str:
    """The adapter's greedy reply through `lorafit generate`'s path, with only that adapter loaded."""
    from transformers import AutoModelForCausalLM

    model = LoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    tokenizer = load_tokenizer(str(base_dir), padding_side="left")
    return generate_replies(model, tokenizer, [prompt], GenerationSettings(max_new_tokens=max_tokens))[0]


def test_an_adapter_loaded_while_requests_run_serves_and_they_are_untouched(models, expected, tmp_path):
    new = save_adapter(models["base"], tmp_path / "d", seed=4)
    engine = make_engine(models, max_batch=4)

    async def run():
        started = asyncio.Event()
        running = [asyncio.create_task(reply(engine, name, prompt, SamplingParams(max_tokens=n), started))
                   for (name, prompt), n in zip(PROMPTS[:2], MAX_TOKENS[:2])]
        await started.wait()
        entry = await engine.load_adapter("d", new)
        texts = [(await t)[0] for t in running]
        text = (await reply(engine, "d", "hello world", SamplingParams(max_tokens=12)))[0]
        await engine.shutdown()
        return entry, texts, text

    entry, texts, text = asyncio.run(run())
    assert entry.id == "d" and entry.parent == str(models["base"])
    assert texts == expected[:2]
    assert text == alone(models["base"], new, "hello world", 12)
    assert text not in expected


def test_unload_waits_for_running_requests_and_refuses_new_ones(models, expected):
    engine = make_engine(models, max_batch=4)
    gate = Gate(engine, hold_at=3)

    async def run():
        (name, prompt), n = PROMPTS[0], MAX_TOKENS[0]
        running = asyncio.create_task(reply(engine, name, prompt, SamplingParams(max_tokens=n)))
        await gate.wait_entered()
        unloading = asyncio.create_task(engine.unload_adapter("a"))
        await asyncio.sleep(0.05)
        assert not unloading.done()
        with pytest.raises(UnknownModel, match="model 'a' is not served"):
            await reply(engine, "a", prompt, SamplingParams(max_tokens=3))
        gate.open()
        text = (await running)[0]
        await unloading
        other = (await reply(engine, *PROMPTS[1], SamplingParams(max_tokens=MAX_TOKENS[1])))[0]
        ids = [e.id for e in engine.models()]
        worker_adapters = list(engine._workers.values())[0].served.model.peft_config
        await engine.shutdown()
        return text, other, ids, worker_adapters

    text, other, ids, adapters = asyncio.run(run())
    assert text == expected[0] and other == expected[1]
    assert "a" not in ids and "a" not in adapters
    with pytest.raises(UnknownModel):
        asyncio.run(make_engine(models).unload_adapter("nope"))


def test_an_adapter_that_fails_to_load_leaves_the_served_ones_untouched(models, expected, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    damaged = tmp_path / "damaged"
    shutil.copytree(models["a"], damaged)
    (damaged / WEIGHTS_NAME).write_bytes((damaged / WEIGHTS_NAME).read_bytes()[:100])
    # an adapter of a wider model, forced onto this base
    wide_dir = tmp_path / "wide-base"
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64)).save_pretrained(wide_dir)
    tokenizer.save_pretrained(wide_dir)
    wide = save_adapter(wide_dir, tmp_path / "wide", seed=5)
    engine = make_engine(models, max_batch=4)
    before = engine.models()

    async def run():
        for name, path, model, message in [
                ("x", damaged, None, "damaged"), ("x", wide, str(models["base"]), "could not be loaded"),
                ("x", tmp_path / "missing", None, "does not exist")]:
            with pytest.raises(AdapterLoadError, match=message):
                await engine.load_adapter(name, path, model=model)
        with pytest.raises(BadRequest, match="already served"):
            await engine.load_adapter("b", models["c"])
        text = (await reply(engine, *PROMPTS[1], SamplingParams(max_tokens=MAX_TOKENS[1])))[0]
        await engine.shutdown()
        return text

    assert asyncio.run(run()) == expected[1]
    assert engine.models() == before
    assert list(list(engine._workers.values())[0].served.model.peft_config) == ["a", "b", "c"]


def test_an_adapter_of_another_base_gets_its_own_worker(models, tmp_path):
    from test_generate import build_base

    other_base = tmp_path / "other-base"
    tokenizer = build_tokenizer()
    model = build_base(len(tokenizer))
    torch.manual_seed(9)
    for param in model.parameters():  # same shapes, other weights
        param.data.normal_(0, 0.2)
    model.save_pretrained(other_base)
    tokenizer.save_pretrained(other_base)
    other = save_adapter(other_base, tmp_path / "other", seed=6)
    engine = make_engine(models, max_batch=4)

    async def run():
        entry = await engine.load_adapter("o", other)
        texts = await asyncio.gather(reply(engine, "o", "hello world", SamplingParams(max_tokens=10)),
                                     reply(engine, "a", "hello world", SamplingParams(max_tokens=10)))
        await engine.shutdown()
        return entry, [t for t, _ in texts]

    entry, (text_o, text_a) = asyncio.run(run())
    assert entry.parent == str(other_base) and len(engine._workers) == 2
    assert text_o == alone(other_base, other, "hello world", 10)
    assert text_a == alone(models["base"], models["a"], "hello world", 10)
    assert {e.id for e in engine.models()} >= {str(other_base), "o"}


def test_a_name_unloaded_and_loaded_again_waits_for_the_unload(models, expected):
    engine = make_engine(models, max_batch=4)
    gate = Gate(engine, hold_at=3)

    async def run():
        running = asyncio.create_task(reply(engine, *PROMPTS[0], SamplingParams(max_tokens=MAX_TOKENS[0])))
        await gate.wait_entered()
        unloading = asyncio.create_task(engine.unload_adapter("a"))
        await asyncio.sleep(0.01)
        reloading = asyncio.create_task(engine.load_adapter("a", models["c"]))  # "a" now names c's weights
        await asyncio.sleep(0.05)
        gate.open()
        await asyncio.gather(unloading, reloading)
        first = (await running)[0]
        again = (await reply(engine, "a", PROMPTS[3][1], SamplingParams(max_tokens=MAX_TOKENS[3])))[0]
        await engine.shutdown()
        return first, again

    assert asyncio.run(run()) == (expected[0], expected[3])


@pytest.mark.parametrize("task", ["token-classification", "seq2seq"])
def test_an_adapter_of_a_task_the_server_does_not_serve_is_refused_naming_those_it_does(tmp_path, task):
    from conftest import tiny_llama

    from lorafit import LoraConfig
    from lorafit.inference.adapter_info import save_adapter_info
    from lorafit.serving.registry import read_adapter_spec

    LoraModel(tiny_llama(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    save_adapter_info(tmp_path, {"task": task, "base_model": "some-base"})
    with pytest.raises(LorafitError, match=f"is a {task} adapter; lorafit serve serves causal-LM and classifier"):
        read_adapter_spec("x", tmp_path)


def test_a_qlora_adapter_is_served_on_its_quantized_base_as_generate_loads_it(tmp_path):
    """An adapter trained on a 4-bit base gets that base (as `lorafit generate` loads it), not the fp32 one
    plain adapters of the same model share."""
    pytest.importorskip("bitsandbytes")
    from test_causal_lm import save_tiny_model

    from lorafit import LoraConfig
    from lorafit.inference.adapter_info import save_adapter_info
    from lorafit.inference.loading import load_adapter_for_inference
    from lorafit.inference.quantization import adapter_quantization
    from lorafit.quantized import is_quantized
    from lorafit.serving.registry import load_base, read_adapter_spec
    from lorafit.training.settings import QuantizeSettings

    base_dir = save_tiny_model(tmp_path / "base", "llama")
    for name, quantization in [("plain", None), ("qlora", QuantizeSettings("4bit"))]:
        torch.manual_seed(1)
        LoraModel(load_causal_lm(base_dir, quantization=quantization),
                  LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(tmp_path / name)
        save_adapter_info(tmp_path / name, {"task": "causal-lm", "base_model": base_dir,
                                            **adapter_quantization(quantization)})
    plain, qlora = read_adapter_spec("plain", tmp_path / "plain"), read_adapter_spec("qlora", tmp_path / "qlora")
    assert plain.key != qlora.key
    served = load_base(qlora.base, qlora.task, qlora)
    served.add(qlora)
    served.model.set_adapter("qlora")
    assert any(is_quantized(module) for module in served.model.modules())
    reference = load_adapter_for_inference(tmp_path / "qlora").model
    ids = torch.tensor([[5, 17, 33, 21, 41, 9]])
    with torch.no_grad():
        torch.testing.assert_close(served.model(input_ids=ids).logits, reference(input_ids=ids).logits)
