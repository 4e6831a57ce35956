"""The serving engine on a tiny Llama with three adapters: continuous batching gives each request what it
gets alone (`lorafit generate`'s generate_replies is the reference), and requests, cancellation, load
and unload behave as the HTTP app relies on."""

from __future__ import annotations

import asyncio
import threading

import pytest

from test_generate import build_base, build_tokenizer, save_adapter

from lorafit.inference.base_models import load_tokenizer
from lorafit.inference.generate import GenerationSettings, generate_replies
from lorafit.model import LoraModel
from lorafit.serving.engine import Engine, SamplingParams
from lorafit.serving.errors import BadRequest, ContextTooLong, ShuttingDown, UnknownModel

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


@pytest.fixture(scope="module")
def expected(models) -> list[str]:
    return reference_replies(models)


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


def test_greedy_replies_in_a_running_mixed_batch_equal_each_alone(models, expected):
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


def test_requests_arriving_together_equal_each_alone(models, expected):
    """Prompts of different lengths prefilled in one left-padded batch, then decoded together."""
    engine = make_engine(models, max_batch=8)

    async def together():
        results = await asyncio.gather(*[reply(engine, model_id(models, name), prompt, SamplingParams(max_tokens=n))
                                         for (name, prompt), n in zip(PROMPTS, MAX_TOKENS)])
        await engine.shutdown()
        return results

    assert [text for text, _ in asyncio.run(together())] == expected


def test_one_request_at_a_time_with_max_batch_1(models, expected):
    recorder = Recorder()
    engine = make_engine(models, max_batch=1, observer=recorder)

    async def run():
        results = await asyncio.gather(*[reply(engine, model_id(models, name), prompt, SamplingParams(max_tokens=n))
                                         for (name, prompt), n in zip(PROMPTS[:4], MAX_TOKENS[:4])])
        await engine.shutdown()
        return results

    assert [text for text, _ in asyncio.run(run())] == expected[:4]
    assert {size for _, size in recorder.batches} == {1}


def test_stop_strings_end_the_reply_without_the_match(models, expected):
    words = expected[3].split()
    assert len(words) >= 4
    # one stop inside a word-to-word boundary (two tokens), so a partial match must be held back
    stop = f"{words[1][-2:]} {words[2][:2]}"
    engine = make_engine(models)

    async def run():
        name, prompt = PROMPTS[3]
        ids = engine.encode_chat(name, [{"role": "user", "content": prompt}])
        deltas = [d async for d in engine.generate(name, ids, SamplingParams(max_tokens=MAX_TOKENS[3], stop=[stop]))]
        await engine.shutdown()
        return deltas

    deltas = asyncio.run(run())
    assert "".join(d.text for d in deltas) == expected[3][:expected[3].index(stop)]
    assert deltas[-1].finish_reason == "stop" and deltas[-1].completion_tokens < MAX_TOKENS[3]
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_seeded_sampling_repeats_alone_and_in_a_batch(models):
    engine = make_engine(models, max_batch=4)
    params = dict(max_tokens=16, temperature=1.0, top_p=0.9)

    async def run():
        alone = [(await reply(engine, "b", "hello world", SamplingParams(seed=seed, **params)))[0]
                 for seed in (7, 7, 8)]
        mixed = await asyncio.gather(reply(engine, "b", "hello world", SamplingParams(seed=7, **params)),
                                     reply(engine, "a", "the red cat", SamplingParams(seed=7, **params)),
                                     reply(engine, "c", "one two", SamplingParams(max_tokens=16)))
        await engine.shutdown()
        return alone, mixed[0][0]

    alone, mixed = asyncio.run(run())
    assert alone[0] == alone[1] == mixed
    assert alone[2] != alone[0]


def test_bad_requests_are_refused_before_the_first_delta(models):
    engine = make_engine(models)

    async def first(model, ids, params):
        return await engine.generate(model, ids, params).__anext__()

    async def run():
        ids = engine.encode_chat("a", [{"role": "user", "content": "hello"}])
        with pytest.raises(UnknownModel, match="served models: .*a, b, c"):
            await first("nope", ids, SamplingParams(max_tokens=4))
        with pytest.raises(ContextTooLong, match="max_tokens 200 plus the longest prompt .* context of 128"):
            await first("a", ids, SamplingParams(max_tokens=200))
        with pytest.raises(BadRequest, match="non-empty list of token ids"):
            await first("a", [], SamplingParams(max_tokens=4))
        with pytest.raises(BadRequest, match="token ids from 0"):
            await first("a", [10_000], SamplingParams(max_tokens=4))
        await engine.shutdown()
        with pytest.raises(ShuttingDown):
            await first("a", ids, SamplingParams(max_tokens=4))

    asyncio.run(run())
    for kwargs, message in [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 4, "temperature": -1}, "temperature"),
                            ({"max_tokens": 4, "top_p": 0}, "top_p"), ({"max_tokens": 4, "stop": [""]}, "stop"),
                            ({"max_tokens": 4, "seed": -1}, "seed")]:
        with pytest.raises(BadRequest, match=message):
            SamplingParams(**kwargs)
    with pytest.raises(BadRequest, match="messages must be"):
        engine.encode_chat("a", [{"role": "user", "content": None}])


def test_models_lists_the_base_and_its_adapters(models):
    engine = make_engine(models)
    entries = {e.id: e for e in engine.models()}
    base = str(models["base"])
    assert set(entries) == {base, *ADAPTERS}
    assert entries[base].parent is None and entries[base].kind == "causal-lm"
    assert all(entries[n].parent == base and entries[n].root == str(models[n]) for n in ADAPTERS)
    assert entries["a"].context_length == 128
    assert engine.stop_ids("a") == sorted({2, build_tokenizer().convert_tokens_to_ids("<|im_end|>")})
    asyncio.run(engine.shutdown())
