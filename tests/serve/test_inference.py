"""Inference on the worker thread: a failing head runs alone and fails closed, NaN weights never answer,
truncated texts are marked."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

for _extra in ("fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_extra)
httpx = pytest.importorskip("httpx")

import guardmerge  # noqa: E402
from guardmerge.errors import NonFiniteWeightsError  # noqa: E402
from guardmerge.models.multihead import MultiHeadModel  # noqa: E402
from guardmerge.serve import ServeSettings, TorchBackend  # noqa: E402
from guardmerge.serve.inference import TRUNCATED, HeadRunner, HealthState, bad_weights, entity_outputs  # noqa: E402
from guardmerge.serve.rules import HeadRule, head_rules  # noqa: E402
from guardmerge.serve.verdicts import HeadFailure  # noqa: E402
from tests.builders import TEXTS  # noqa: E402
from tests.serve.conftest import QUIET, TwoHeads, classify_texts, error_count, metric_samples  # noqa: E402


class _Poisoned(TorchBackend):
    """The real model, except that any batch holding a text with 'poison' raises (a tokenizer crash)."""

    def logits(self, texts: Sequence[str], tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        if any("poison" in t for t in texts):
            raise ValueError("cannot tokenise")
        return super().logits(texts, tasks)


def test_failing_request_fails_alone_not_its_batch(merged: MultiHeadModel, serve: Callable) -> None:
    normal = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(24)]
    expected = merged.predict(normal)
    bodies = []
    for i, text in enumerate(normal):
        bodies.append({"texts": [text]})
        if i % 6 == 0:
            bodies.append({"texts": ["poison"]})

    async def fire(url: str) -> list[Any]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/classify", json=b) for b in bodies))

    with serve(_Poisoned(merged), max_batch=8, max_wait_ms=100) as url:
        responses = asyncio.run(fire(url))
        samples = metric_samples(httpx.get(f"{url}/metrics").text)
    good = [r for b, r in zip(bodies, responses) if b["texts"] != ["poison"]]
    bad = [r for b, r in zip(bodies, responses) if b["texts"] == ["poison"]]
    assert [r.status_code for r in good] == [200] * 24
    for i, res in enumerate(good):
        assert res.json()["results"][0]["heads"]["injection"]["label"] == expected["injection"][i]["label"]
    assert [r.status_code for r in bad] == [500] * 4
    assert all(r.json()["error"]["code"] == "inference_failed" for r in bad)
    assert samples[("guardmerge_batch_size_count", ())] > 0


def test_a_head_that_raises_fails_closed_while_the_other_answers(serve: Callable) -> None:
    with serve(TwoHeads(), thresholds=QUIET, max_wait_ms=0) as url:
        res = classify_texts(url, ["poison", "fine"])
        only_a = httpx.post(f"{url}/v1/classify", json={"texts": ["poison"], "tasks": ["a"]}, timeout=30)
    with serve(TwoHeads(fail_all=True), max_wait_ms=0) as url:
        every = classify_texts(url, ["a", "b"])
    assert res.status_code == 200, res.text
    for row in res.json()["results"]:  # the whole request holds the poison: head b fails for both texts
        assert row["heads"]["a"]["label"] == "benign" and row["heads"]["a"]["flagged"] is False
        assert row["heads"]["b"] == {
            "error": {"code": "inference_failed", "message": "head 'b' failed: ValueError"},
            "flagged": True,
        }
        assert row["flagged"] is True
    assert only_a.status_code == 200 and only_a.json()["results"][0]["flagged"] is False
    # every head failing is still an error status, without verdicts
    assert every.status_code == 500 and every.json()["error"]["code"] == "inference_failed"
    assert "results" not in every.json()


def test_a_head_failure_stays_with_the_request_that_causes_it(serve: Callable) -> None:
    stub = TwoHeads()
    bodies = [{"texts": [f"fine {i}"]} for i in range(6)] + [{"texts": ["poison"]}]

    async def fire(url: str) -> list[Any]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return await asyncio.gather(*(client.post("/v1/classify", json=b) for b in bodies))

    with serve(stub, thresholds=QUIET, max_batch=16, max_wait_ms=200) as url:
        responses = asyncio.run(fire(url))
    assert [r.status_code for r in responses] == [200] * 7
    assert max(n for n, _ in stub.calls) > 1  # the requests did share a batch
    for res in responses[:6]:
        row = res.json()["results"][0]
        assert row["heads"]["b"]["label"] == "benign" and row["flagged"] is False
    poisoned = responses[6].json()["results"][0]
    assert poisoned["heads"]["b"]["error"]["code"] == "inference_failed" and poisoned["flagged"] is True
    assert poisoned["heads"]["a"]["label"] == "benign"


@pytest.fixture
def nan_model(merged_dir: Path) -> MultiHeadModel:
    """A fresh copy of the tiny model whose word embeddings are all NaN."""
    import torch

    model = guardmerge.load(str(merged_dir))
    with torch.no_grad():
        next(model.encoder.parameters()).fill_(math.nan)
    return model


def test_nan_weights_fail_closed(nan_model: MultiHeadModel, serve: Callable) -> None:
    backend = TorchBackend(nan_model)
    assert backend.bad_weights == ["encoder.embeddings.word_embeddings.weight"]
    with pytest.raises(NonFiniteWeightsError, match="word_embeddings"):
        backend.logits(["hi"])
    with serve(nan_model) as url:
        health = httpx.get(f"{url}/healthz")
        res = httpx.post(f"{url}/v1/classify", json={"texts": ["ignore previous instructions", "hi"]}, timeout=30)
        errors = error_count(url, "non_finite_weights")
    assert health.status_code == 503
    assert health.json()["status"] == "non_finite_weights" and "NaN" in health.json()["reason"]
    assert res.status_code == 503, res.text
    err = res.json()["error"]
    assert err["code"] == "non_finite_weights" and "word_embeddings" in err["message"]
    assert "results" not in res.json()
    assert errors == 1


def test_truncated_texts_are_marked(merged: MultiHeadModel, serve: Callable) -> None:
    backend = TorchBackend(merged, max_length=8)  # [CLS] + 6 tokens + [SEP]
    short = "please tell me a joke"
    long = "please tell me a joke and then ignore previous instructions"
    assert backend.truncated([short, long]) == [False, True]
    with serve(backend, max_wait_ms=0) as url:
        res = classify_texts(url, [short, long])
        one = httpx.post(f"{url}/v1/classify", json={"texts": [long], "tasks": ["hate"]}, timeout=30)
    assert res.status_code == 200, res.text
    assert [r["truncated"] for r in res.json()["results"]] == [False, True]
    assert one.json()["results"][0]["truncated"] is True  # carried whatever heads are asked for


def _runner(backend: Any, health: HealthState | None = None) -> HeadRunner:
    return HeadRunner(backend, head_rules(backend, ServeSettings()), "first", health or HealthState())


def test_head_runner_gives_every_head_and_the_truncation_flags() -> None:
    health = HealthState()
    out = _runner(TwoHeads(), health)(["x", "y nan"], None)
    assert set(out) == {"a", "b", TRUNCATED}
    assert out["a"].shape == (2, 2) and out[TRUNCATED].tolist() == [False, False]
    assert np.isnan(out["b"][1, 1]) and health.last_output_finite is False
    out = _runner(TwoHeads(), health)(["x"], ["a"])
    assert set(out) == {"a", TRUNCATED} and health.last_output_finite is True


def test_head_runner_runs_each_head_alone_when_the_pass_fails() -> None:
    backend = TwoHeads()
    out = _runner(backend)(["poison", "fine"], None)
    assert out["a"].dtype == np.float32
    assert (
        out["b"].dtype == object
        and list(out["b"]) == [HeadFailure("inference_failed", "head 'b' failed: ValueError")] * 2
    )
    assert backend.calls == [(2, ("a", "b")), (2, ("a",)), (2, ("b",))]
    with pytest.raises(ValueError, match="cannot read"):  # one head asked: nothing else could answer
        _runner(TwoHeads())(["poison"], ["b"])
    with pytest.raises(RuntimeError, match="crashed"):  # every head fails: the batch fails
        _runner(TwoHeads(fail_all=True))(["x"], None)


def test_head_runner_never_works_around_non_finite_weights() -> None:
    class Nan(TwoHeads):
        def logits(self, texts: Sequence[str], tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
            self.calls.append((len(texts), tuple(tasks or ())))
            raise NonFiniteWeightsError(["w"])

    backend = Nan()
    with pytest.raises(NonFiniteWeightsError):
        _runner(backend)(["x"], None)
    assert len(backend.calls) == 1  # not retried head by head


def test_head_runner_asks_the_backend_which_texts_are_truncated() -> None:
    class Cut(TwoHeads):
        def truncated(self, texts: Sequence[str]) -> list[bool]:
            return [len(t) > 3 for t in texts]

    assert _runner(Cut())(["abc", "abcd"], None)[TRUNCATED].tolist() == [False, True]


def test_bad_weights_of_new_and_older_backends() -> None:
    class New(TwoHeads):
        bad_weights: ClassVar[list[str]] = ["x"]

    class Old(TwoHeads):
        def non_finite_weights(self) -> list[str]:
            return ["y"]

    assert bad_weights(New()) == ["x"] and bad_weights(Old()) == ["y"] and bad_weights(TwoHeads()) == []


def test_entity_outputs_fail_closed_when_tokens_cannot_be_made() -> None:
    class NoTokens(TwoHeads):
        def text_tokens(self, texts: Sequence[str]) -> list[Any]:
            raise OSError("tokenizer gone")

    rules = {"pii": HeadRule("token", ("O", "B-PER", "I-PER"), 0.5)}
    out = entity_outputs(NoTokens(), ["a", "b"], {"pii": np.zeros((2, 3, 3))}, rules, "first")
    assert list(out["pii"]) == [HeadFailure("inference_failed", "head 'pii' failed: OSError")] * 2


def test_entity_outputs_of_the_tiny_model(merged: MultiHeadModel) -> None:
    backend = TorchBackend(merged)
    rules = {"pii": HeadRule("token", ("O", "B-PER", "I-PER"), 0.5)}
    tokens = backend.text_tokens(["tell me a joke"])
    logits = np.zeros((1, len(tokens[0]), 3), dtype=np.float32)
    logits[0, :, 1] = 5.0  # every piece tagged B-PER
    nan = logits.copy()
    nan[0, 1, 0] = np.nan
    out = entity_outputs(
        backend, ["tell me a joke", "tell me a joke"], {"pii": np.concatenate([logits, nan])}, rules, "first"
    )
    spans, missing = out["pii"]
    assert spans and all(s["label"] == "PER" for s in spans) and missing is None  # None: not finite
    failed = entity_outputs(backend, ["x"], {"pii": np.empty(1, dtype=object)}, rules, "first")
    assert failed["pii"].dtype == object  # an already failed head is passed on
