"""Tests for the Prometheus text at GET /metrics (serving/metrics.py): it parses with prometheus_client's
reader, and its counts move with the requests served by the real engine."""

from __future__ import annotations

from fastapi.testclient import TestClient

from lorafit.serving.metrics import Metrics
from test_serve_app import assert_openai_error, client, complete, engine, metrics, served  # noqa: F401


def scrape(c: TestClient) -> dict[tuple, float]:
    """Every sample of /metrics, parsed by prometheus_client (an independent reader of the format)."""
    from prometheus_client.parser import text_string_to_metric_families

    response = c.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str, **labels) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_metrics_parse_and_move_with_requests(engine, metrics):
    c = client(engine, metrics)
    before = scrape(c)
    usage = complete(c, max_tokens=5).json()["usage"]
    assert_openai_error(complete(c, "nope"), 404)
    c.post("/v1/classify", json={"model": "sst", "input": ["good", "bad", "fine"]})
    after = scrape(c)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("lorafit_requests_total", endpoint="/v1/completions", model="a", status="200") == 1
    assert moved("lorafit_requests_total", endpoint="/v1/completions", model="", status="404") == 1
    assert moved("lorafit_requests_total", endpoint="/v1/classify", model="sst", status="200") == 1
    assert moved("lorafit_prompt_tokens_total", model="a") == usage["prompt_tokens"]
    assert moved("lorafit_completion_tokens_total", model="a") == usage["completion_tokens"]
    def forwards(name, kind):
        return total(after, name, kind=kind) - total(before, name, kind=kind)

    assert forwards("lorafit_batch_size_count", "prefill") >= 1
    assert forwards("lorafit_batch_size_count", "decode") >= usage["completion_tokens"] - 1
    assert forwards("lorafit_batch_size_sum", "classify") == 3  # the three texts
    assert moved("lorafit_request_duration_seconds_count", endpoint="/v1/completions") == 2
    assert any(n == "lorafit_queue_depth" for n, _ in after)
    assert value(after, "lorafit_request_duration_seconds_bucket", endpoint="/v1/completions", le="+Inf") == \
        value(after, "lorafit_request_duration_seconds_count", endpoint="/v1/completions")


def test_metric_labels_are_escaped():
    observer = Metrics()
    observer.tokens('we"ird\\name\n', 3, 4)
    from prometheus_client.parser import text_string_to_metric_families

    samples = {s.name: s for f in text_string_to_metric_families(observer.render()) for s in f.samples}
    assert samples["lorafit_prompt_tokens_total"].labels == {"model": 'we"ird\\name\n'}
    assert samples["lorafit_completion_tokens_total"].value == 4
