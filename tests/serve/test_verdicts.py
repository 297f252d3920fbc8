"""Verdicts: labels, scores and flags per head kind; a head without a verdict fails closed (flagged)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

for _extra in ("fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_extra)
httpx = pytest.importorskip("httpx")

from guardmerge.serve.rules import HeadRule  # noqa: E402
from guardmerge.serve.schemas import HeadErrorVerdict, HeadVerdict, MultiLabelVerdict, TokenVerdict  # noqa: E402
from guardmerge.serve.verdicts import HeadFailure, failed_rows, has_head_failure, verdicts  # noqa: E402
from tests.serve.conftest import QUIET, Scores, TwoHeads, classify_texts, metric_samples  # noqa: E402


def test_a_head_with_non_finite_scores_fails_closed_while_the_other_answers(serve: Callable) -> None:
    with serve(TwoHeads(), thresholds=QUIET, max_wait_ms=0) as url:
        res = classify_texts(url, ["fine", "nan here"])
        health = httpx.get(f"{url}/healthz")
        samples = metric_samples(httpx.get(f"{url}/metrics").text)
    assert res.status_code == 200, res.text
    fine, bad = res.json()["results"]
    assert fine["flagged"] is False and fine["heads"]["b"]["score"] == 0.5
    assert bad["heads"]["a"] == {"label": "benign", "score": 0.5, "probabilities": {"benign": 0.5, "bad": 0.5},
                                 "flagged": False}  # fmt: skip
    assert bad["heads"]["b"]["error"]["code"] == "non_finite_output" and "'b'" in bad["heads"]["b"]["error"]["message"]
    assert bad["heads"]["b"]["flagged"] is True and bad["flagged"] is True  # never a benign verdict
    assert health.status_code == 503 and health.json()["status"] == "non_finite_output"
    assert samples[("guardmerge_head_errors_total", (("code", "non_finite_output"), ("task", "b")))] == 1


def test_non_finite_output_is_a_flagged_head_error_and_unhealthy_until_a_finite_inference(serve: Callable) -> None:
    with serve(Scores(), max_wait_ms=0, thresholds={"injection": 0.9}) as url:
        first = httpx.get(f"{url}/healthz")
        nan = httpx.post(f"{url}/v1/classify", json={"texts": ["ok", "nan"]}, timeout=30)
        after_nan = httpx.get(f"{url}/healthz")
        inf = httpx.post(f"{url}/v1/classify", json={"texts": ["inf"]}, timeout=30)
        fine = httpx.post(f"{url}/v1/classify", json={"texts": ["ok"]}, timeout=30)
        after_fine = httpx.get(f"{url}/healthz")
        samples = metric_samples(httpx.get(f"{url}/metrics").text)
    assert first.status_code == 200 and first.json() == {"status": "ok", "queued_texts": 0}
    assert nan.status_code == 200, nan.text
    ok_row, nan_row = nan.json()["results"]
    assert ok_row["flagged"] is False and ok_row["heads"]["injection"]["score"] == 0.5
    for row in (nan_row, inf.json()["results"][0]):
        head = row["heads"]["injection"]
        assert head["flagged"] is True and row["flagged"] is True  # fail closed: never a benign verdict
        assert head["error"]["code"] == "non_finite_output" and "label" not in head
    assert after_nan.status_code == 503 and after_nan.json()["status"] == "non_finite_output"
    assert fine.status_code == 200 and fine.json()["results"][0]["heads"]["injection"]["score"] == 0.5
    assert after_fine.status_code == 200
    key = ("guardmerge_head_errors_total", (("code", "non_finite_output"), ("task", "injection")))
    assert samples[key] == 2


SINGLE = HeadRule("single_label", ("benign", "attack"), 0.5, (0.5, 0.5), frozenset({"benign"}))


def test_single_label_verdicts() -> None:
    logits = np.log(np.array([[0.9, 0.1], [0.3, 0.7]], dtype=np.float32))
    first, second = verdicts({"inj": logits}, {"inj": SINGLE}, [False, True])
    head = first.heads["inj"]
    assert isinstance(head, HeadVerdict) and head.label == "benign" and head.score == pytest.approx(0.9)
    assert head.probabilities == pytest.approx({"benign": 0.9, "attack": 0.1}) and not first.flagged
    assert second.heads["inj"].label == "attack" and second.flagged and second.truncated and not first.truncated


def test_a_benign_label_never_flags_and_an_off_threshold_never_does() -> None:
    logits = np.log(np.array([[0.1, 0.9]], dtype=np.float32))
    off = HeadRule("single_label", ("benign", "attack"), None, (None, None), frozenset({"benign"}))
    both_benign = HeadRule("single_label", ("benign", "attack"), 0.5, (0.5, 0.5), frozenset({"benign", "attack"}))
    assert not verdicts({"x": logits}, {"x": off})[0].flagged
    assert not verdicts({"x": logits}, {"x": both_benign})[0].flagged
    assert verdicts({"x": logits}, {"x": SINGLE})[0].flagged


def test_multi_label_verdicts_use_a_sigmoid_per_label() -> None:
    rule = HeadRule("multi_label", ("neutral", "insult", "threat"), 0.5, (0.5, 0.3, None), frozenset({"neutral"}))
    logits = np.array([[3.0, -0.5, 4.0]], dtype=np.float32)  # sigmoid: 0.95, 0.38, 0.98
    (row,) = verdicts({"tox": logits}, {"tox": rule})
    head = row.heads["tox"]
    assert isinstance(head, MultiLabelVerdict)
    assert head.labels == ["neutral", "insult"]  # threat: no threshold; neutral: listed but benign
    assert head.probabilities["insult"] == pytest.approx(1 / (1 + math.exp(0.5)))
    assert head.flagged and row.flagged  # insult >= 0.3


def test_token_verdicts() -> None:
    rule = HeadRule("token", ("O", "B-PER", "B-LOC"), 0.5, entities=frozenset({"PER"}))
    span = {"label": "LOC", "start": 0, "end": 5, "text": "Paris", "score": 0.9}
    person = {"label": "PER", "start": 0, "end": 3, "text": "Ann", "score": 0.8}
    values = np.empty(4, dtype=object)
    for i, value in enumerate([[span], [span, person], None, HeadFailure("inference_failed", "head 'pii' failed: X")]):
        values[i] = value
    rows = verdicts({"pii": values}, {"pii": rule})
    assert isinstance(rows[0].heads["pii"], TokenVerdict) and not rows[0].flagged  # LOC does not flag
    assert rows[1].flagged and [e.label for e in rows[1].heads["pii"].entities] == ["LOC", "PER"]
    assert rows[2].heads["pii"].error.code == "non_finite_output" and rows[2].flagged
    assert rows[3].heads["pii"].error.code == "inference_failed" and rows[3].flagged


def test_a_failed_head_and_a_head_whose_verdicts_raise_fail_closed() -> None:
    broken = np.zeros(2)  # a token head's outputs must be lists of spans
    rows = verdicts(
        {"inj": failed_rows(2, "inference_failed", "head 'inj' failed: E"), "pii": broken},
        {"inj": SINGLE, "pii": HeadRule("token", ("O", "B-PER"), 0.5)},
    )
    for row in rows:
        assert all(isinstance(h, HeadErrorVerdict) and h.flagged for h in row.heads.values())
        assert row.heads["pii"].error.message == "head 'pii' failed: TypeError" and row.flagged
    assert verdicts({}, {}) == []


def test_failed_rows_and_has_head_failure() -> None:
    rows = failed_rows(3, "inference_failed", "m")
    assert rows.dtype == object and list(rows) == [HeadFailure("inference_failed", "m")] * 3
    assert has_head_failure({"a": np.zeros((3, 2)), "b": rows})
    spans = np.empty(2, dtype=object)
    spans[0], spans[1] = [], None
    assert not has_head_failure({"a": np.zeros((3, 2)), "pii": spans, "flags": np.zeros(3, dtype=bool)})
