"""GET /metrics: Prometheus's text format with requests, tokens, queue depth, batch size, latency and adapters."""

from __future__ import annotations

import re
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.testclient import TestClient

from personae.serve.metrics import Histogram, Metrics
from tests.e2e.helpers import chat_body

SAMPLE = re.compile(r"^([a-z_]+)(\{[^}]*\})? (\S+)$")


def parse(text: str) -> dict[str, float]:
    """'name{labels}' -> value for every sample line; every family has HELP and TYPE lines."""
    samples, typed = {}, set()
    for line in text.strip().splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif not line.startswith("#"):
            match = SAMPLE.match(line)
            assert match, line
            samples[match[1] + (match[2] or "")] = float(match[3])
            assert re.sub(r"_(bucket|sum|count)$", "", match[1]) in typed, line
    return samples


def test_metrics_count_requests_tokens_and_latency(make_app: Callable[..., FastAPI]) -> None:
    client = TestClient(make_app())
    answer = client.post("/v1/chat/completions", json=chat_body(n=2, max_tokens=5, ignore_eos=True)).json()
    assert client.post("/v1/chat/completions", json=chat_body(n=0)).status_code == 400
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    got = parse(response.text)
    ok = 'personae_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}'
    refused = 'personae_http_requests_total{method="POST",route="/v1/chat/completions",status="400"}'
    assert got[ok] == 1 and got[refused] == 1
    assert got["personae_completion_tokens_total"] == answer["usage"]["completion_tokens"] == 10
    assert got["personae_prompt_tokens_total"] == 2 * answer["usage"]["prompt_tokens"]
    assert got['personae_http_request_duration_seconds_count{route="/v1/chat/completions"}'] == 2
    assert got['personae_http_request_duration_seconds_bucket{le="+Inf",route="/v1/chat/completions"}'] == 2
    assert got["personae_queue_depth"] == 0 and got["personae_batch_size_max"] >= 2
    assert got["personae_decode_row_steps_total"] >= got["personae_decode_steps_total"] > 0
    assert got["personae_adapters_resident"] >= 0
    assert "personae_time_to_first_token_seconds_count" not in got  # nothing was streamed yet
    streamed = client.post("/v1/chat/completions", json=chat_body(max_tokens=3, stream=True))
    assert streamed.status_code == 200
    got = parse(client.get("/metrics").text)
    assert got["personae_time_to_first_token_seconds_count"] == 1
    assert 0 < got["personae_time_to_first_token_seconds_sum"] <= \
        got['personae_http_request_duration_seconds_sum{route="/v1/chat/completions"}']


def test_metrics_need_the_api_key(make_app: Callable[..., FastAPI]) -> None:
    client = TestClient(make_app(api_key="sesame"))
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer sesame"}).status_code == 200


def test_histogram_buckets_are_cumulative_and_labels_escaped() -> None:
    histogram = Histogram([0.1, 1.0])
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(value)
    assert histogram.lines("t", {}) == ['t_bucket{le="0.1"} 2', 't_bucket{le="1.0"} 3', 't_bucket{le="+Inf"} 4',
                                        "t_sum 3.65", "t_count 4"]
    metrics = Metrics()
    metrics.inc("c_total", 2, path='a"b\\c')
    assert 'c_total{path="a\\"b\\\\c"} 2.0' in metrics.render()
