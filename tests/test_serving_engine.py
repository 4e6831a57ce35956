"""The serving engine on a tiny Llama with three adapters: continuous batching gives each request what it
gets alone (`lorafit generate`'s generate_replies is the reference), and requests, cancellation, load
and unload behave as the HTTP app relies on."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from test_generate import build_base, build_tokenizer, save_adapter

from lorafit.inference.base_models import load_tokenizer
from lorafit.inference.generate import GenerationSettings, generate_replies
from lorafit.model import LoraModel
from lorafit.serving.engine import Engine, SamplingParams
from lorafit.serving.errors import (AdapterLoadError, BadRequest, ContextTooLong, ModelFailed, QueueFull,
                                    ShuttingDown, UnknownModel)

ADAPTERS = ("a", "b", "c")
PROMPTS = [("a", "hello world"), ("b", "the cat sat on the mat and the dog sat on a red book"), ("base", "good day"),
           ("c", "one two three"), ("a", "sun moon star tree river stone fire water wind"), ("b", "how are you"),
           ("c", "red blue green"), ("base", "the dog sat on a mat")]
MAX_TOKENS = [14, 9, 16, 12, 7, 15, 11, 13]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serving")
    tokenizer = build_tokenizer()
    base = root / "base"
    build_base(len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return {"base": base, **{name: save_adapter(base, root / name, seed=i + 1) for i, name in enumerate(ADAPTERS)}}


class Recorder:
    """An Observer keeping every call, to see how batches were formed."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, int]] = []
        self.depths: list[int] = []
        self.ended: list[tuple[str, int, int]] = []
        self.lock = threading.Lock()

    def batch(self, base, kind, size):
        with self.lock:
            self.batches.append((kind, size))

    def queue_depth(self, base, depth):
        with self.lock:
            self.depths.append(depth)

    def tokens(self, model_id, prompt, completion):
        with self.lock:
            self.ended.append((model_id, prompt, completion))


def make_engine(models, **kwargs) -> Engine:
    engine = Engine(**kwargs)
    for name in ADAPTERS:
        engine.add_adapter(name, models[name])
    engine.start()
    return engine


def model_id(models, name: str) -> str:
    return str(models["base"]) if name == "base" else name


async def reply(engine: Engine, name: str, prompt: str, params: SamplingParams, started: asyncio.Event | None = None):
    """The whole reply text and the last delta."""
    ids = engine.encode_chat(name, [{"role": "user", "content": prompt}])
    texts, last = [], None
    async for delta in engine.generate(name, ids, params):
        texts.append(delta.text)
        last = delta
        if started is not None and delta.completion_tokens >= 2:
            started.set()
    if started is not None:
        started.set()
    return "".join(texts), last


def reference_replies(models) -> list[str]:
    """Each prompt alone, through the one generation path (`lorafit generate`), with its adapter."""
    from transformers import AutoModelForCausalLM

    model = LoraModel(AutoModelForCausalLM.from_pretrained(models["base"]))
    for name in ADAPTERS:
        model.load_adapter(models[name], name)
    model.eval()
    tokenizer = load_tokenizer(str(models["base"]), padding_side="left")
    return [generate_replies(model, tokenizer, [prompt], GenerationSettings(batch_size=1, max_new_tokens=n),
                             adapter_names=["__base__" if name == "base" else name])[0]
            for (name, prompt), n in zip(PROMPTS, MAX_TOKENS)]


def test_greedy_replies_in_a_running_mixed_batch_equal_each_alone(models):
    recorder = Recorder()
    engine = make_engine(models, max_batch=4, observer=recorder)

    async def staggered():
        # each request starts once the previous one has produced tokens, so it joins a running batch;
        # with max_batch 4 later ones wait for rows to free up and join as others leave
        tasks, started = [], None
        for (name, prompt), n in zip(PROMPTS, MAX_TOKENS):
            if started is not None:
                await started.wait()
            started = asyncio.Event()
            tasks.append(asyncio.create_task(reply(engine, model_id(models, name), prompt,
                                                   SamplingParams(max_tokens=n), started)))
        results = await asyncio.gather(*tasks)
        await engine.shutdown()
        return results

    results = asyncio.run(staggered())
    expected = reference_replies(models)
    assert len(set(expected)) == len(expected), "the prompts and adapters should give different replies"
    assert [text for text, _ in results] == expected
    # the requests really shared batches: several joined a running batch, and decoding steps held 3+ rows
    decode_sizes = [size for kind, size in recorder.batches if kind == "decode"]
    joins = [i for i, (kind, _) in enumerate(recorder.batches) if kind == "prefill" and i > 0
             and recorder.batches[i - 1][0] == "decode"]
    assert max(decode_sizes) >= 3 and len(joins) >= 4
    for (text, last), n in zip(results, MAX_TOKENS):
        assert last.finish_reason in ("stop", "length")
        assert (last.finish_reason == "length") == (last.completion_tokens == n)
