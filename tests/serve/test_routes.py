"""The endpoints over HTTP: classify (parity with predict, tasks, thresholds, 4xx/5xx), model info, healthz."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

for _extra in ("fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_extra)
httpx = pytest.importorskip("httpx")

from guardmerge.models.multihead import MultiHeadModel  # noqa: E402
from guardmerge.serve import ServeSettings, TorchBackend  # noqa: E402
from guardmerge.serve.routes import Service, describe_model  # noqa: E402
from guardmerge.serve.rules import head_rules  # noqa: E402
from tests.builders import TEXTS  # noqa: E402
from tests.serve.conftest import (  # noqa: E402
    JSON,
    TASKS,
    Scores,
    TwoHeads,
    classify,
    classify_texts,
    error_count,
    metric_samples,
)


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


def test_texts_are_nfc_normalised(merged: MultiHeadModel, serve: Callable) -> None:
    seen: list[str] = []

    class Recording(TorchBackend):
        def logits(self, texts: Sequence[str], tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
            seen.extend(texts)
            return super().logits(texts, tasks)

    with serve(Recording(merged)) as url:
        res = httpx.post(f"{url}/v1/classify", json={"texts": ["cafe\u0301"]}, timeout=30)
    assert res.status_code == 200 and seen == ["caf\u00e9"]


def test_lone_surrogate_text_is_422_and_breaks_no_other_request(merged: MultiHeadModel, serve: Callable) -> None:
    normal = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(32)]
    expected = merged.predict(normal)
    poison = b'{"texts": ["fine", "x \\ud800"]}'  # JSON escape of a lone surrogate: valid JSON, not UTF-8 text

    async def fire(url: str) -> tuple[list[Any], list[Any]]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            good = [client.post("/v1/classify", json={"texts": [t]}) for t in normal]
            bad = [client.post("/v1/classify", content=poison, headers=JSON) for _ in range(8)]
            mixed = [[*good[i // 4 * 4 : i // 4 * 4 + 4], bad[i // 4]] for i in range(0, 32, 4)]
            results = await asyncio.gather(*(c for group in mixed for c in group))
        return [r for r in results if r.request.content != poison], [r for r in results if r.request.content == poison]

    with serve(merged, max_batch=8, max_wait_ms=100) as url:
        good, bad = asyncio.run(fire(url))
        errors = error_count(url, "invalid_text")
    assert [r.status_code for r in good] == [200] * 32, [r.text for r in good if r.status_code != 200][:2]
    for i, res in enumerate(good):
        assert res.json()["results"][0]["heads"]["hate"]["label"] == expected["hate"][i]["label"]
    assert [r.status_code for r in bad] == [422] * 8
    err = bad[0].json()["error"]
    assert err["code"] == "invalid_text" and "text 1" in err["message"] and "U+D800" in err["message"]
    assert err["details"] == {"indexes": [1]}
    assert errors == 8


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


def test_inference_past_the_timeout_is_504_never_a_verdict(serve: Callable) -> None:
    release = threading.Event()
    stub = TwoHeads(release=release)
    with serve(stub, inference_timeout=0.5, max_wait_ms=0) as url:
        started = time.monotonic()
        late = classify_texts(url, ["slow"])
        took = time.monotonic() - started
        release.set()
        again = classify_texts(url, ["fast"])
        samples = metric_samples(httpx.get(f"{url}/metrics").text)
    assert late.status_code == 504, late.text
    assert late.json()["error"]["code"] == "inference_timeout" and "0.5 s" in late.json()["error"]["message"]
    assert "results" not in late.json() and took < 10
    assert again.status_code == 200
    assert samples[("guardmerge_errors_total", (("code", "inference_timeout"), ("endpoint", "/v1/classify")))] == 1


def test_model_info_shows_the_base_model_name_only(
    merged: MultiHeadModel, zoo: dict[str, Path], serve: Callable
) -> None:
    assert Path(merged.info["base_model"]).is_absolute()
    with serve(merged) as url:
        info = httpx.get(f"{url}/v1/model").json()
    assert info["base_model"] == zoo["base"].name
    with serve(Scores()) as url:
        assert httpx.get(f"{url}/v1/model").json()["base_model"] == "org/base-model"  # a hub id as given


def test_describe_model_names_the_base_heads_and_limits() -> None:
    settings = ServeSettings(max_texts=5, thresholds={"a": None})
    rules = head_rules(TwoHeads(), settings)
    info = describe_model(Scores(), head_rules(Scores(), ServeSettings()), ServeSettings())
    assert info.base_model == "org/base-model" and info.method == "stub" and info.backend == "stub"
    assert info.precision == "fp32" and info.parameters == {} and [h.task for h in info.heads] == ["injection"]
    two = describe_model(TwoHeads(), rules, settings)
    assert two.base_model is None  # the backend names none
    assert [(h.task, h.threshold, h.benign) for h in two.heads] == [("a", None, []), ("b", 0.5, ["benign"])]
    assert two.limits.max_texts == 5 and two.limits.max_chars == 4000


def test_service_tasks_are_the_heads_in_model_order() -> None:
    rules = head_rules(TwoHeads(), ServeSettings())
    info = describe_model(TwoHeads(), rules, ServeSettings())
    service = Service(ServeSettings(), rules, None, None, None, info)  # type: ignore[arg-type]
    assert service.tasks == ["a", "b"]


def test_requests_are_checked_in_order(serve: Callable) -> None:
    """Too many texts is reported before a long text, a long text before an unknown task."""
    with serve(TwoHeads(), max_texts=2, max_chars=3) as url:
        many = classify(url, {"texts": ["toolong", "a", "b"], "tasks": ["x"]})
        long = classify(url, {"texts": ["toolong", "a"], "tasks": ["x"]})
        unknown = classify(url, {"texts": ["ok"], "tasks": ["x", "a"]})
        repeated = classify(url, {"texts": ["ok"], "tasks": ["b", "b", "a"]})
    assert many.json()["error"]["code"] == "too_many_texts"
    assert long.json()["error"]["code"] == "text_too_long" and long.json()["error"]["details"] == {"indexes": [0]}
    assert unknown.json()["error"]["details"] == {"unknown": ["x"], "tasks": ["a", "b"]}
    assert repeated.status_code == 200 and repeated.json()["tasks"] == ["b", "a"]
