"""The Prometheus metrics of one app: bounded endpoint labels, requests, errors, batches and the queue."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("prometheus_client")
pytest.importorskip("starlette")

from guardmerge.serve.metrics import PATHS, Metrics, endpoint


@pytest.mark.parametrize(
    ("scope", "label"),
    [
        ({"route": SimpleNamespace(path="/v1/classify"), "path": "/v1/classify"}, "/v1/classify"),
        ({"route": SimpleNamespace(path="/items/{id}"), "path": "/items/7"}, "/items/{id}"),  # the template
        ({"path": "/healthz"}, "/healthz"),  # answered before routing (the gate)
        ({"path": "/v2/anything"}, "other"),  # unmatched: one label for all
        ({}, "other"),
    ],
)
def test_endpoint_labels_are_bounded(scope: dict, label: str) -> None:
    assert endpoint(scope) == label


def test_paths_are_the_api() -> None:
    assert {"/v1/classify", "/v1/model", "/healthz", "/metrics"} == PATHS


def test_requests_errors_and_batches_are_counted() -> None:
    metrics = Metrics()
    scope = {"path": "/v1/classify"}
    metrics.on_request(scope, 200, 0.02)
    metrics.on_request(scope, 200, 0.5)
    metrics.on_request({"path": "/nope"}, 404, 0.001)
    metrics.on_error(scope, "too_many_texts")
    metrics.on_batch(8, 0.1)
    metrics.on_batch(3, 0.05)
    value = metrics.registry.get_sample_value
    assert value("guardmerge_requests_total", {"endpoint": "/v1/classify", "status": "200"}) == 2
    assert value("guardmerge_requests_total", {"endpoint": "other", "status": "404"}) == 1
    assert value("guardmerge_request_duration_seconds_count", {"endpoint": "/v1/classify"}) == 2
    assert value("guardmerge_request_duration_seconds_sum", {"endpoint": "/v1/classify"}) == pytest.approx(0.52)
    assert value("guardmerge_errors_total", {"endpoint": "/v1/classify", "code": "too_many_texts"}) == 1
    assert value("guardmerge_texts_total") == 11 and value("guardmerge_batch_size_count") == 2
    assert value("guardmerge_batch_size_bucket", {"le": "4.0"}) == 1
    assert value("guardmerge_batch_duration_seconds_sum") == pytest.approx(0.15)


def test_the_queue_gauge_reads_the_batcher_and_registries_are_separate() -> None:
    first, second = Metrics(), Metrics()
    batcher = SimpleNamespace(queued=5)
    first.watch_queue(batcher)  # type: ignore[arg-type]
    assert first.registry.get_sample_value("guardmerge_queued_texts") == 5
    batcher.queued = 2
    assert first.registry.get_sample_value("guardmerge_queued_texts") == 2
    first.on_batch(1, 0.1)
    assert second.registry.get_sample_value("guardmerge_texts_total") == 0  # one registry per app
