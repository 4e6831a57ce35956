"""Classification through the engine: queued texts of several adapters scored in one mixed forward give
the probabilities `lorafit predict` gives each adapter alone."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from test_cli import build_tiny_bert
from test_serving_engine import Recorder
from test_serving_worker import Gate

from lorafit.config import LoraConfig
from lorafit.inference.loading import load_adapter_for_inference
from lorafit.inference.predict import PredictSettings, predict_rows
from lorafit.model import get_lora_model
from lorafit.serving.classify import length_chunks
from lorafit.serving.engine import Engine, SamplingParams
from lorafit.serving.errors import ModelFailed, WrongTask
from lorafit.inference.adapter_info import save_adapter_info

TEXTS = ["a great and lovely film", "the plot was dull", "an okay movie", "terrible",
         "the acting was wonderful but the story dragged on and on for far too long"]


def classifier_adapter(base: Path, out: Path, labels: list[str], seed: int, max_length: int = 16,
                       truncation_side: str = "right") -> Path:
    """A classifier adapter with random non-zero LoRA factors and its own perturbed head."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(base)
    torch.manual_seed(seed)
    lora = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS",
                                            init_lora_weights=False, modules_to_save=["classifier"]))
    with torch.no_grad():
        for param in lora.model.classifier.modules_to_save["default"].parameters():
            param.add_(torch.randn_like(param))
    lora.save_pretrained(out)
    save_adapter_info(out, {"task": "classification", "base_model": str(base), "max_length": max_length,
                            "truncation_side": truncation_side, "id2label": dict(enumerate(labels))})
    return out


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("classifiers")
    three, two = build_tiny_bert(root / "base3", num_labels=3), build_tiny_bert(root / "base2", num_labels=2, seed=1)
    return {"x": classifier_adapter(three, root / "x", ["neg", "neu", "pos"], seed=1),
            "y": classifier_adapter(three, root / "y", ["sad", "calm", "glad"], seed=2, max_length=6,
                                    truncation_side="left"),
            "z": classifier_adapter(two, root / "z", ["no", "yes"], seed=3)}


def predicted(adapter: Path, texts: list[str]) -> list[dict]:
    loaded = load_adapter_for_inference(adapter)
    return predict_rows(loaded, texts, None, PredictSettings())


def test_mixed_batch_probabilities_equal_predict(classifiers):
    recorder = Recorder()
    engine = Engine(max_batch=32, observer=recorder)
    for name, path in classifiers.items():
        engine.add_adapter(name, path)
    engine.start()
    gate = Gate(engine, hold_at=1, model_id="x")  # holds x's worker so the x and y requests queue together

    async def run():
        first = asyncio.create_task(engine.classify("x", TEXTS[:1]))
        await gate.wait_entered()
        queued = [asyncio.create_task(engine.classify(name, TEXTS[i:] + TEXTS[:i]))
                  for i, name in enumerate(["x", "y", "x", "y"])]
        other = asyncio.create_task(engine.classify("z", TEXTS))
        await asyncio.sleep(0.05)
        gate.open()
        results = [await first, *[await t for t in queued], await other]
        await engine.shutdown()
        return results

    results = asyncio.run(run())
    assert ("classify", 4 * len(TEXTS)) in recorder.batches  # the four queued requests ran as one mixed batch
    for (name, texts), got in zip([("x", TEXTS[:1]), *[(n, TEXTS[i:] + TEXTS[:i]) for i, n in enumerate("xyxy")],
                                   ("z", TEXTS)], results):
        want = predicted(classifiers[name], texts)
        assert [r.label for r in got] == [w["label"] for w in want]
        for r, w in zip(got, want):
            assert list(r.probs) == list(w["probabilities"])
            assert r.probs == pytest.approx(w["probabilities"], abs=1e-5)
    labels = {e.id: e.labels for e in engine.models() if e.parent}
    assert labels == {"x": ["neg", "neu", "pos"], "y": ["sad", "calm", "glad"], "z": ["no", "yes"]}


def test_a_request_larger_than_max_batch_runs_in_chunks(classifiers):
    engine = Engine(max_batch=2)
    engine.add_adapter("y", classifiers["y"])
    engine.start()

    async def run():
        result = await engine.classify("y", TEXTS)
        await engine.shutdown()
        return result

    got = asyncio.run(run())
    want = predicted(classifiers["y"], TEXTS)
    assert [r.probs for r in got] == [pytest.approx(w["probabilities"], abs=1e-5) for w in want]


def test_tasks_are_refused_where_they_do_not_apply(classifiers):
    engine = Engine()
    engine.add_adapter("x", classifiers["x"])
    engine.start()
    base = next(e.id for e in engine.models() if e.parent is None)

    async def run():
        with pytest.raises(WrongTask, match="is a classifier; generate with a causal-LM model"):
            await engine.generate("x", [1, 2], SamplingParams(max_tokens=2)).__anext__()
        with pytest.raises(WrongTask, match="without a trained classification head"):
            await engine.classify(base, ["hi"])
        await engine.shutdown()

    asyncio.run(run())
    with pytest.raises(WrongTask):
        engine.encode_chat("x", [{"role": "user", "content": "hi"}])



def test_a_forward_that_raises_fails_its_requests_and_the_worker_goes_on(classifiers):
    engine = Engine(max_batch=4)
    engine.add_adapter("x", classifiers["x"])
    engine.start()
    failing = threading.Event()
    failing.set()
    Gate(engine, fail_when=lambda kwargs: failing.is_set(), model_id="x")

    async def run():
        with pytest.raises(ModelFailed, match="injected failure"):
            await engine.classify("x", TEXTS[:2])
        failing.clear()
        result = await engine.classify("x", TEXTS[:2])
        await engine.shutdown()
        return result

    got = asyncio.run(run())
    assert [r.probs for r in got] == [pytest.approx(w["probabilities"], abs=1e-5)
                                      for w in predicted(classifiers["x"], TEXTS[:2])]


def test_texts_run_longest_first_in_forwards_of_near_lengths():
    # 16 and 15 pad to 32 tokens for 31 real; a 3 beside them would pad 48 for 34 (over a quarter): a new forward
    assert length_chunks([16, 3, 3, 3, 15]) == [[0, 4], [1, 2, 3]]
    assert length_chunks([5] * 70) == [list(range(70))]
    assert length_chunks([]) == []
