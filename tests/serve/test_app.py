"""The real server over HTTP: every endpoint, every error, auth, micro-batching, parity with predict."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

for _extra in ("fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_extra)
httpx = pytest.importorskip("httpx")

import guardmerge  # noqa: E402
from guardmerge.errors import GuardmergeError  # noqa: E402
from guardmerge.models.multihead import MultiHeadModel  # noqa: E402
from guardmerge.serve import ServeSettings, TorchBackend, create_app, parse_thresholds  # noqa: E402
from tests.builders import TEXTS  # noqa: E402
from tests.serve.conftest import TASKS, metric_samples  # noqa: E402


def classify(url: str, body: Any, **kw: Any) -> Any:
    return httpx.post(f"{url}/v1/classify", json=body, timeout=30, **kw)


def test_classify_equals_model_predict(merged: MultiHeadModel, serve: Callable) -> None:
    expected = merged.predict(TEXTS)
    logits = merged.logits(TEXTS)
    with serve(merged) as url:
        res = classify(url, {"texts": TEXTS})
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["tasks"] == list(TASKS)
    assert len(body["results"]) == len(TEXTS)
    for i, row in enumerate(body["results"]):
        assert set(row["heads"]) == set(TASKS)
        for task in TASKS:
            got = row["heads"][task]
            assert got["label"] == expected[task][i]["label"]
            assert got["score"] == pytest.approx(expected[task][i]["score"], abs=1e-5)
            probs = np.exp(logits[task][i].double().numpy())
            probs /= probs.sum()
            assert list(got["probabilities"]) == merged.labels(task)
            assert list(got["probabilities"].values()) == pytest.approx(probs.tolist(), abs=1e-5)
            assert sum(got["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
            assert got["flagged"] == (max(list(got["probabilities"].values())[1:]) >= 0.5)
        assert row["flagged"] == any(h["flagged"] for h in row["heads"].values())


def test_requested_tasks_only_in_the_order_asked(merged: MultiHeadModel, serve: Callable) -> None:
    with serve(merged) as url:
        res = classify(url, {"texts": ["sure", "i love this"], "tasks": ["sentiment", "hate", "sentiment"]})
    assert res.status_code == 200, res.text
    assert res.json()["tasks"] == ["sentiment", "hate"]
    expected = merged.predict(["sure", "i love this"], tasks=["sentiment"])["sentiment"]
    for row, exp in zip(res.json()["results"], expected):
        assert list(row["heads"]) == ["sentiment", "hate"]
        assert row["heads"]["sentiment"]["label"] == exp["label"]


def test_thresholds_per_task_and_off(merged: MultiHeadModel, serve: Callable) -> None:
    with serve(merged, thresholds={"hate": 0.0, "injection": 1.0, "sentiment": None}) as url:
        rows = classify(url, {"texts": TEXTS}).json()["results"]
        info = httpx.get(f"{url}/v1/model").json()
    assert all(r["heads"]["hate"]["flagged"] for r in rows)  # threshold 0: any non-benign label flags
    assert not any(r["heads"]["injection"]["flagged"] for r in rows)
    assert not any(r["heads"]["sentiment"]["flagged"] for r in rows)
    assert all(r["flagged"] for r in rows)
    assert {h["task"]: h["threshold"] for h in info["heads"]} == {"hate": 0.0, "injection": 1.0, "sentiment": None}


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


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "needle"),
    [
        ({"json": {"texts": ["a"], "tasks": ["spam", "hate"]}}, 400, "unknown_task", "'spam'"),
        (
            {"content": b'{"texts": ["a"', "headers": {"content-type": "application/json"}},
            400,
            "malformed_json",
            "JSON",
        ),
        ({"json": {"texts": [1]}}, 422, "invalid_request", "texts.0"),
        ({"json": {"text": ["a"]}}, 422, "invalid_request", "texts"),
        ({"json": {"texts": []}}, 422, "invalid_request", "texts"),
        ({"json": {"texts": ["a"], "tasks": []}}, 422, "invalid_request", "tasks"),
        ({"json": {"texts": "a"}}, 422, "invalid_request", "texts"),
        ({"json": [1, 2]}, 422, "invalid_request", "JSON object"),
        ({"content": b"", "headers": {"content-type": "application/json"}}, 422, "invalid_request", "JSON object"),
        ({"content": b'{"texts": ["a"]}'}, 415, "unsupported_media_type", "got none"),  # no Content-Type
        ({"content": b""}, 415, "unsupported_media_type", "application/json"),
        (
            {"content": b'{"texts": ["a"]}', "headers": {"content-type": "application/x-www-form-urlencoded"}},
            415,
            "unsupported_media_type",
            "x-www-form-urlencoded",
        ),
        (
            {"content": b'{"texts": ["caf\xe9"]}', "headers": {"content-type": "application/json"}},
            400,
            "malformed_json",
            "UTF-8",
        ),
        (
            {"content": b'{"texts": ["a"]}', "headers": {"content-type": "application/json; charset=utf-16"}},
            200,
            "",
            "",
        ),
        (
            {"content": b"[" * 2100 + b"]" * 2100, "headers": {"content-type": "application/json"}},
            400,
            "malformed_json",
            "JSON",
        ),  # nested too deep for the parser: not http_error
        ({"json": {"texts": ["a", "b", "c", "d"]}}, 413, "too_many_texts", "limit is 3"),
        ({"json": {"texts": ["ok", "x" * 21]}}, 413, "text_too_long", "text 1 has 21 characters"),
        ({"content": b"x" * 100_000, "headers": {"content-type": "application/json"}}, 413, "body_too_large", "limit"),
        (
            {"content": b'{"texts": ["a"]}', "headers": {"content-type": "text/plain"}},
            415,
            "unsupported_media_type",
            "application/json",
        ),
    ],
)
def test_errors_are_clear_json(
    merged: MultiHeadModel, serve: Callable, kwargs: dict, status: int, code: str, needle: str
) -> None:
    with serve(merged, max_texts=3, max_chars=20) as url:
        res = httpx.post(f"{url}/v1/classify", timeout=30, **kwargs)
        samples = metric_samples(httpx.get(f"{url}/metrics").text)
    assert res.status_code == status, res.text
    if status == 200:
        return
    err = res.json()["error"]
    assert err["code"] == code and needle in err["message"]
    if code == "unknown_task":
        assert err["details"]["unknown"] == ["spam"]
    endpoint = "/v1/classify"
    assert samples[("guardmerge_errors_total", (("code", code), ("endpoint", endpoint)))] == 1
    assert samples[("guardmerge_requests_total", (("endpoint", endpoint), ("status", str(status))))] == 1


def test_unknown_path_and_method_are_json(merged: MultiHeadModel, serve: Callable) -> None:
    with serve(merged) as url:
        missing = httpx.get(f"{url}/v2/nothing")
        wrong = httpx.get(f"{url}/v1/classify")
        samples = metric_samples(httpx.get(f"{url}/metrics").text)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert samples[("guardmerge_requests_total", (("endpoint", "other"), ("status", "404")))] == 1


def test_api_key_required_except_healthz(merged: MultiHeadModel, serve: Callable) -> None:
    good = {"Authorization": "Bearer s3cret"}
    with serve(merged, api_key="s3cret") as url:
        none = classify(url, {"texts": ["a"]})
        wrong = classify(url, {"texts": ["a"]}, headers={"Authorization": "Bearer nope"})
        basic = classify(url, {"texts": ["a"]}, headers={"Authorization": "Basic czNjcmV0"})
        ok = classify(url, {"texts": ["a"]}, headers=good)
        model_no, model_ok = httpx.get(f"{url}/v1/model"), httpx.get(f"{url}/v1/model", headers=good)
        metrics_no, metrics_ok = httpx.get(f"{url}/metrics"), httpx.get(f"{url}/metrics", headers=good)
        health = httpx.get(f"{url}/healthz")
        spec = httpx.get(f"{url}/openapi.json").json()
        # auth is checked before the body: a bad body without a key is still 401
        bad_body = httpx.post(f"{url}/v1/classify", json={"nope": 1})
    for res in (none, wrong, basic, model_no, metrics_no, bad_body):
        assert res.status_code == 401, res.text
        assert res.json()["error"]["code"] == "unauthorized"
        assert res.headers["www-authenticate"] == "Bearer"
    assert "missing" in none.json()["error"]["message"] and "wrong" in wrong.json()["error"]["message"]
    assert ok.status_code == 200 and model_ok.status_code == 200 and metrics_ok.status_code == 200
    assert health.status_code == 200
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert 'code="unauthorized"' in metrics_ok.text


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


class _Stub:
    """A backend with fixed logits that can fail or block, for the 5xx paths."""

    name = "stub"

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    @property
    def tasks(self) -> list[str]:
        return ["injection"]

    def labels(self, task: str) -> list[str]:
        return ["benign", "injection"]

    @property
    def info(self) -> dict[str, Any]:
        return {"method": "stub"}

    def logits(self, texts: Sequence[str], tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        self.entered.set()
        self.release.wait(30)
        if self.fail:
            raise RuntimeError("boom")
        return {"injection": np.zeros((len(texts), 2), dtype=np.float32)}

    def close(self) -> None:
        pass


def test_inference_failure_is_500_json(serve: Callable) -> None:
    with serve(_Stub(fail=True)) as url:
        res = classify(url, {"texts": ["a"]})
        samples = metric_samples(httpx.get(f"{url}/metrics").text)
    assert res.status_code == 500
    assert res.json()["error"] == {
        "code": "inference_failed",
        "message": "inference failed: RuntimeError",
        "details": None,
    }
    assert samples[("guardmerge_errors_total", (("code", "inference_failed"), ("endpoint", "/v1/classify")))] == 1


def test_full_queue_is_503_with_retry_after(serve: Callable) -> None:
    stub = _Stub()
    stub.release.clear()
    with serve(stub, max_texts=2, max_queue=2, max_wait_ms=0) as url, httpx.Client(base_url=url, timeout=30) as c:
        first = threading.Thread(target=c.post, args=("/v1/classify",), kwargs={"json": {"texts": ["a", "b"]}})
        first.start()
        assert stub.entered.wait(10)  # the first batch runs (blocked); the queue is empty again
        second = threading.Thread(target=c.post, args=("/v1/classify",), kwargs={"json": {"texts": ["c", "d"]}})
        second.start()
        for _ in range(500):
            if c.get("/healthz").json()["queued_texts"] == 2:
                break
            threading.Event().wait(0.01)
        third = c.post("/v1/classify", json={"texts": ["e"]})
        stub.release.set()
        first.join(10)
        second.join(10)
    assert third.status_code == 503
    assert third.json()["error"]["code"] == "overloaded" and third.headers["retry-after"] == "1"
    assert stub.entered.is_set()


def test_bad_settings_are_refused(merged: MultiHeadModel) -> None:
    with pytest.raises(GuardmergeError, match="unknown task.*spam"):
        create_app(merged, ServeSettings(thresholds={"spam": 0.5}))
    with pytest.raises(GuardmergeError, match="max_texts"):
        create_app(TorchBackend(merged), ServeSettings(max_texts=0))


def test_parse_thresholds() -> None:
    assert parse_thresholds(["injection=0.8", " hate = 1 ", "emotion=off"]) == {
        "injection": 0.8,
        "hate": 1.0,
        "emotion": None,
    }
    for bad, msg in [("injection", "task=0.8"), ("x=1.5", "outside"), ("x=abc", "not a number"), ("=0.1", "task=0.8")]:
        with pytest.raises(GuardmergeError, match=msg):
            parse_thresholds([bad])
