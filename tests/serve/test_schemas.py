"""The request and response bodies: what requests are valid, and how verdicts and heads are told apart."""

from __future__ import annotations

import pytest

pytest.importorskip("pydantic")
from pydantic import ValidationError

from guardmerge.models.head_kinds import HEAD_KINDS
from guardmerge.serve.schemas import (
    HEAD_INFOS,
    VERDICTS,
    ClassifyRequest,
    ErrorResponse,
    HeadErrorVerdict,
    HeadInfo,
    HeadVerdict,
    ModelInfo,
    MultiLabelHeadInfo,
    MultiLabelVerdict,
    TextVerdict,
    TokenHeadInfo,
    TokenVerdict,
)


def test_classify_request() -> None:
    assert ClassifyRequest(texts=["a"]).tasks is None
    assert ClassifyRequest(texts=["a", "b"], tasks=["hate"]).tasks == ["hate"]
    for bad in ({"texts": []}, {"texts": ["a"], "tasks": []}, {"texts": ["a"], "extra": 1}, {"texts": "a"}, {}):
        with pytest.raises(ValidationError):
            ClassifyRequest.model_validate(bad)


def test_a_head_error_always_flags() -> None:
    verdict = HeadErrorVerdict.model_validate({"error": {"code": "inference_failed", "message": "head 'a' failed"}})
    assert verdict.flagged is True
    with pytest.raises(ValidationError):
        HeadErrorVerdict.model_validate({"error": {"code": "x", "message": "y"}, "flagged": False})


def test_text_verdicts_tell_the_head_kinds_apart() -> None:
    row = TextVerdict.model_validate(
        {
            "flagged": True,
            "truncated": False,
            "heads": {
                "single": {"label": "a", "score": 0.9, "probabilities": {"a": 0.9, "b": 0.1}, "flagged": False},
                "multi": {"probabilities": {"a": 0.9}, "labels": ["a"], "flagged": True},
                "token": {
                    "entities": [{"label": "PER", "start": 0, "end": 3, "text": "Ann", "score": 0.8}],
                    "flagged": True,
                },
                "failed": {"error": {"code": "non_finite_output", "message": "m"}, "flagged": True},
            },
        }
    )
    kinds = {task: type(head) for task, head in row.heads.items()}
    assert kinds == {
        "single": HeadVerdict,
        "multi": MultiLabelVerdict,
        "token": TokenVerdict,
        "failed": HeadErrorVerdict,
    }


def test_every_head_kind_has_a_verdict_and_a_head_info_schema() -> None:
    assert set(VERDICTS) == set(HEAD_INFOS) == set(HEAD_KINDS)
    assert VERDICTS["multi_label"] is MultiLabelVerdict and HEAD_INFOS["token"] is TokenHeadInfo
    assert VERDICTS["single_label"] is HeadVerdict and HEAD_INFOS["single_label"] is HeadInfo


def test_model_info_tells_the_head_kinds_apart() -> None:
    info = ModelInfo.model_validate(
        {
            "heads": [
                {"task": "s", "labels": ["a", "b"], "threshold": 0.5},
                {
                    "task": "m",
                    "labels": ["a"],
                    "threshold": 0.5,
                    "problem": "multi_label",
                    "label_thresholds": {"a": 0.3},
                },
                {
                    "task": "t",
                    "labels": ["O", "B-PER"],
                    "threshold": None,
                    "problem": "token",
                    "entity_types": ["PER"],
                    "flag_entities": None,
                    "aggregation": "first",
                },
            ],
            "backend": "torch",
            "guardmerge_version": "0",
            "limits": {"max_texts": 1, "max_chars": 2, "max_batch": 3, "max_wait_ms": 4.0},
        }
    )
    assert [type(h) for h in info.heads] == [HeadInfo, MultiLabelHeadInfo, TokenHeadInfo]
    assert info.heads[0].benign == [] and info.precision == "fp32" and info.base_model is None


def test_error_response_shape() -> None:
    body = ErrorResponse.model_validate({"error": {"code": "unknown_task", "message": "m"}})
    assert body.model_dump() == {"error": {"code": "unknown_task", "message": "m", "details": None}}
