"""create_app: the app wires settings, backend, batcher, metrics, gate and routes; its OpenAPI document."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ClassVar

import pytest

for _extra in ("fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_extra)
httpx = pytest.importorskip("httpx")

import guardmerge  # noqa: E402
from guardmerge.errors import GuardmergeError  # noqa: E402
from guardmerge.models.multihead import MultiHeadModel  # noqa: E402
from guardmerge.serve import ServeSettings, TorchBackend, create_app  # noqa: E402
from tests.builders import TEXTS  # noqa: E402
from tests.serve.conftest import TASKS, TwoHeads, classify, metric_samples  # noqa: E402


def test_model_info_healthz_and_openapi(merged: MultiHeadModel, serve: Callable) -> None:
    with serve(merged, max_texts=7, max_chars=99) as url:
        info = httpx.get(f"{url}/v1/model").json()
        health = httpx.get(f"{url}/healthz")
        spec = httpx.get(f"{url}/openapi.json").json()
    benign = {"hate": ["not-hate"], "injection": ["benign"], "sentiment": ["neu"]}  # guessed, guessed, stored
    assert info["heads"] == [
        {"task": t, "labels": merged.labels(t), "threshold": 0.5, "benign": benign[t]} for t in TASKS
    ]
    assert info["method"] == "task_arithmetic" and info["parameters"] == {"scaling": 0.4}
    assert info["base_model"] and info["backend"] == "torch" and info["precision"] == "fp32"
    assert info["guardmerge_version"] == guardmerge.__version__
    assert info["limits"] == {"max_texts": 7, "max_chars": 99, "max_batch": 32, "max_wait_ms": 5.0}
    assert health.status_code == 200 and health.json() == {"status": "ok", "queued_texts": 0}
    assert set(spec["paths"]) == {"/v1/classify", "/v1/model", "/healthz", "/metrics"}
    post = spec["paths"]["/v1/classify"]["post"]
    assert {"200", "400", "401", "413", "415", "422", "503"} <= set(post["responses"])
    schemas = spec["components"]["schemas"]
    assert schemas["ClassifyRequest"]["properties"]["texts"]["description"]
    assert schemas["HeadVerdict"]["properties"]["flagged"]["description"]
    assert "securitySchemes" not in spec["components"]  # no API key: no security


def test_concurrent_requests_share_micro_batches(merged: MultiHeadModel, serve: Callable) -> None:
    texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(24)]
    expected = merged.predict(texts)

    async def fire(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return await asyncio.gather(*(client.post("/v1/classify", json={"texts": [t]}) for t in texts))

    with serve(merged, max_batch=8, max_wait_ms=200) as url:
        responses = asyncio.run(fire(url))
        samples = metric_samples(httpx.get(f"{url}/metrics").text)
    assert all(r.status_code == 200 for r in responses)
    for text_i, res in enumerate(responses):  # every caller got its own row back
        heads = res.json()["results"][0]["heads"]
        for task in TASKS:
            assert heads[task]["label"] == expected[task][text_i]["label"]
            assert heads[task]["score"] == pytest.approx(expected[task][text_i]["score"], abs=1e-5)
    batches = samples[("guardmerge_batch_size_count", ())]
    assert samples[("guardmerge_batch_size_sum", ())] == 24
    assert batches < 24  # some batch held more than one request
    assert samples[("guardmerge_batch_size_bucket", (("le", "1.0"),))] < batches
    assert samples[("guardmerge_batch_size_bucket", (("le", "8.0"),))] == batches  # never above max_batch
    assert samples[("guardmerge_texts_total", ())] == 24
    assert samples[("guardmerge_requests_total", (("endpoint", "/v1/classify"), ("status", "200")))] == 24
    assert samples[("guardmerge_request_duration_seconds_count", (("endpoint", "/v1/classify"),))] == 24


def test_request_larger_than_max_batch_is_split_and_reassembled(merged: MultiHeadModel, serve: Callable) -> None:
    texts = [f"{t} {i}" for i, t in enumerate(TEXTS * 3)]  # 24 texts, batches of 5
    with serve(merged, max_batch=5) as url:
        rows = classify(url, {"texts": texts}).json()["results"]
        samples = metric_samples(httpx.get(f"{url}/metrics").text)
    expected = merged.predict(texts)
    assert [r["heads"]["sentiment"]["label"] for r in rows] == [e["label"] for e in expected["sentiment"]]
    assert samples[("guardmerge_batch_size_bucket", (("le", "4.0"),))] == 1  # 5+5+5+5+4
    assert samples[("guardmerge_batch_size_count", ())] == 5


def test_bad_settings_are_refused(merged: MultiHeadModel) -> None:
    with pytest.raises(GuardmergeError, match="unknown task.*spam"):
        create_app(merged, ServeSettings(thresholds={"spam": 0.5}))
    with pytest.raises(GuardmergeError, match="max_texts"):
        create_app(TorchBackend(merged), ServeSettings(max_texts=0))


class _SecretHead(TwoHeads):
    tasks: ClassVar[list[str]] = ["zz_private_head"]


def test_openapi_and_docs_name_no_head_behind_a_key(serve: Callable) -> None:
    with serve(_SecretHead()) as url:  # no key: the document may name the heads, as /v1/model does
        open_spec = httpx.get(f"{url}/openapi.json")
    with serve(_SecretHead(), api_key="k") as url:
        spec = httpx.get(f"{url}/openapi.json")
        docs = httpx.get(f"{url}/docs")
        model = httpx.get(f"{url}/v1/model")
        authorised = httpx.get(f"{url}/v1/model", headers={"Authorization": "Bearer k"})
    assert "zz_private_head" in open_spec.json()["info"]["description"]
    assert spec.status_code == 200 and docs.status_code == 200  # public: clients and tools read them
    assert "zz_private_head" not in spec.text and "zz_private_head" not in docs.text
    assert "GET /v1/model" in spec.json()["info"]["description"]
    assert model.status_code == 401
    assert authorised.json()["heads"][0]["task"] == "zz_private_head"


def test_the_lifespan_starts_and_stops_the_batcher_and_checks_the_weights() -> None:
    from fastapi.testclient import TestClient

    class Broken(TwoHeads):
        bad_weights: ClassVar[list[str]] = ["encoder.weight"]

    app = create_app(Broken(), ServeSettings(max_wait_ms=0))
    assert not app.state.batcher.running  # not before the app starts
    with TestClient(app) as client:
        assert app.state.batcher.running
        assert app.state.health.bad_weights == ["encoder.weight"]
        res = client.post("/v1/classify", json={"texts": ["a"]})
    assert res.status_code == 503 and res.json()["error"]["code"] == "non_finite_weights"
    assert not app.state.batcher.running


def test_app_state_holds_the_pieces() -> None:
    backend, settings = TwoHeads(), ServeSettings(max_texts=3)
    app = create_app(backend, settings)
    assert app.state.backend is backend and app.state.settings is settings
    assert app.state.batcher.max_queue == 4096  # max(max_queue, max_texts)
    assert list(app.openapi()["paths"]) == ["/v1/classify", "/v1/model", "/metrics", "/healthz"]


def test_the_body_limit_follows_the_text_limits() -> None:
    from fastapi.testclient import TestClient

    limit = 2 * (6 * 10 + 8) + 4096  # max_texts * (6 bytes per char * max_chars + 8) + 4096
    body = b'{"texts": ["a"]}'
    json = {"content-type": "application/json"}
    with TestClient(create_app(TwoHeads(), ServeSettings(max_texts=2, max_chars=10, max_wait_ms=0))) as client:
        over = client.post("/v1/classify", content=body.ljust(limit + 1), headers=json)
        at = client.post("/v1/classify", content=body.ljust(limit), headers=json)
    assert over.status_code == 413 and over.json()["error"]["code"] == "body_too_large"
    assert at.status_code == 200, at.text  # at the limit: read and classified
