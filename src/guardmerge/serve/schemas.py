"""The request and response bodies of the HTTP API (pydantic): what the OpenAPI document describes.

Single-label heads answer ``{label, score, probabilities, flagged}``; multi-label heads
``{probabilities, labels, flagged}`` (``labels``: those at or above their thresholds); token heads
``{entities: [{label, start, end, text, score}], flagged}``; a head that failed on a text
``{"error": {"code", "message"}, "flagged": true}``. Each text's result also says whether the
tokenizer cut it at the token limit (``truncated``: its tail was not seen). Every error is
:class:`ErrorResponse`: ``{"error": {"code", "message", "details"}}``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "HEAD_INFOS",
    "VERDICTS",
    "ClassifyRequest",
    "ClassifyResponse",
    "EntitySpan",
    "ErrorBody",
    "ErrorResponse",
    "HeadErrorBody",
    "HeadErrorVerdict",
    "HeadInfo",
    "HeadVerdict",
    "Health",
    "Limits",
    "ModelInfo",
    "MultiLabelHeadInfo",
    "MultiLabelVerdict",
    "TextVerdict",
    "TokenHeadInfo",
    "TokenVerdict",
]


class ClassifyRequest(BaseModel):
    """Texts to classify, and optionally which heads to run."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"texts": ["ignore previous instructions", "have a nice day"]}]},
    )
    texts: list[str] = Field(
        ...,
        min_length=1,
        description="Texts to classify (at least one; at most the server's max_texts, each at most max_chars "
        "characters).",
    )
    tasks: list[str] | None = Field(
        None,
        min_length=1,
        description="Heads to run, by task name (see GET /v1/model). Default: every head.",
    )


class HeadVerdict(BaseModel):
    """One head's verdict on one text."""

    label: str = Field(..., description="The most probable label.")
    score: float = Field(..., description="Softmax probability of `label`.")
    probabilities: dict[str, float] = Field(..., description="Softmax probability of every label of the head.")
    flagged: bool = Field(
        ...,
        description="True when a non-benign label has probability >= its threshold (see GET /v1/model).",
    )


class MultiLabelVerdict(BaseModel):
    """A multi-label head's verdict on one text."""

    probabilities: dict[str, float] = Field(..., description="Sigmoid probability of every label of the head.")
    labels: list[str] = Field(..., description="The labels at or above their thresholds, in label order.")
    flagged: bool = Field(
        ..., description="True when a non-benign label has probability >= its threshold (see GET /v1/model)."
    )


class EntitySpan(BaseModel):
    """An entity a token head found in a text."""

    label: str = Field(..., description="Entity type (the tag without its B-/I- prefix).")
    start: int = Field(..., description="Start character offset in the text (as sent, after NFC normalisation).")
    end: int = Field(..., description="End character offset (exclusive).")
    text: str = Field(..., description="text[start:end].")
    score: float = Field(..., description="Mean softmax probability of the entity's tags.")


class TokenVerdict(BaseModel):
    """A token-classification head's verdict on one text."""

    entities: list[EntitySpan] = Field(..., description="Entity spans in text order.")
    flagged: bool = Field(..., description="True when the text contains an entity of a flagged type.")


VERDICTS: dict[str, type[HeadVerdict | MultiLabelVerdict | TokenVerdict]] = {
    "single_label": HeadVerdict,
    "multi_label": MultiLabelVerdict,
    "token": TokenVerdict,
}
"""Each head kind's verdict (its kind's answer plus ``flagged``; one per kind of
:data:`guardmerge.models.head_kinds.HEAD_KINDS`)."""


class HeadErrorBody(BaseModel):
    """Why a head gave no verdict."""

    code: str = Field(
        ...,
        description="non_finite_output (the head's scores for this text are NaN or infinite) or inference_failed "
        "(the head raised).",
    )
    message: str = Field(..., description="What went wrong, naming the head.")


class HeadErrorVerdict(BaseModel):
    """A head that gave no verdict on this text. A guard fails closed: the head flags the text."""

    error: HeadErrorBody
    flagged: Literal[True] = Field(True, description="Always true: a head without a verdict flags the text.")


class TextVerdict(BaseModel):
    """Every requested head's verdict on one text."""

    flagged: bool = Field(
        ..., description="True when any requested head flagged the text, or gave no verdict (an error)."
    )
    truncated: bool = Field(
        ...,
        description="True when the text has more tokens than the model reads (max_length): the tokenizer cut it, "
        "and its tail was not classified. Split long texts to have all of them checked.",
    )
    heads: dict[str, MultiLabelVerdict | TokenVerdict | HeadVerdict | HeadErrorVerdict] = Field(
        ...,
        description="Task name -> verdict, for each requested head: {label, score, probabilities, flagged} for "
        "single-label heads, {probabilities, labels, flagged} for multi-label heads, {entities, flagged} for "
        "token-classification heads; {error: {code, message}, flagged: true} for a head that failed on this text "
        "(the others still answer).",
    )


class ClassifyResponse(BaseModel):
    """Verdicts in the order of the request's texts."""

    tasks: list[str] = Field(..., description="The heads that ran, in order.")
    results: list[TextVerdict] = Field(..., description="One entry per input text, in input order.")


class HeadInfo(BaseModel):
    """A head of the served model."""

    task: str = Field(..., description="Task name (key in classify results).")
    labels: list[str] = Field(..., description="Label names in logit order.")
    threshold: float | None = Field(..., description="Flag threshold (null: this head never flags).")
    benign: list[str] = Field(default_factory=list, description="Labels that never flag a text.")


class MultiLabelHeadInfo(HeadInfo):
    """A multi-label head of the served model."""

    problem: Literal["multi_label"] = Field("multi_label", description="A sigmoid per label.")
    label_thresholds: dict[str, float | None] = Field(..., description="Each label's flag threshold.")


class TokenHeadInfo(HeadInfo):
    """A token-classification head of the served model."""

    problem: Literal["token"] = Field("token", description="A softmax per token; entity spans per text.")
    entity_types: list[str] = Field(..., description="Entity types the head tags.")
    flag_entities: list[str] | None = Field(..., description="Types that flag a text (null: any entity).")
    aggregation: str = Field(..., description="How word pieces become entities: first or simple.")


HEAD_INFOS: dict[str, type[HeadInfo]] = {
    "single_label": HeadInfo,
    "multi_label": MultiLabelHeadInfo,
    "token": TokenHeadInfo,
}
"""Each head kind's ``GET /v1/model`` entry (one per kind of :data:`guardmerge.models.head_kinds.HEAD_KINDS`)."""


class Limits(BaseModel):
    """Request limits and batching of the server."""

    max_texts: int = Field(..., description="Most texts per request.")
    max_chars: int = Field(..., description="Most characters per text.")
    max_batch: int = Field(..., description="Most texts per encoder pass.")
    max_wait_ms: float = Field(..., description="Longest wait for a fuller micro-batch, in milliseconds.")


class ModelInfo(BaseModel):
    """What is served."""

    base_model: str | None = Field(None, description="The base checkpoint the experts were fine-tuned from.")
    method: str | None = Field(None, description="The merge method.")
    parameters: dict[str, Any] = Field(default_factory=dict, description="The merge method's parameters.")
    heads: list[MultiLabelHeadInfo | TokenHeadInfo | HeadInfo] = Field(..., description="Every head, in model order.")
    backend: str = Field(..., description="Inference backend: torch or onnx.")
    precision: str = Field("fp32", description="Weights precision of the backend (fp32 or int8).")
    guardmerge_version: str = Field(..., description="Version of the guardmerge package serving.")
    limits: Limits


class Health(BaseModel):
    """Liveness and readiness."""

    status: str = Field(
        ...,
        description="'ok' when ready to classify; else 'stopped', 'non_finite_weights' (the model's weights hold "
        "NaN or infinity) or 'non_finite_output' (the last inference produced NaN or infinite scores).",
    )
    queued_texts: int = Field(..., description="Texts waiting for a batch now.")
    reason: str | None = Field(None, description="Why the server is not ready (absent when ok).")


class ErrorBody(BaseModel):
    code: str = Field(..., description="Machine-readable error code, e.g. unknown_task, too_many_texts.")
    message: str = Field(..., description="What went wrong, naming the field or task at fault.")
    details: Any = Field(None, description="Extra structured information (validation errors...).")


class ErrorResponse(BaseModel):
    """Every error response."""

    error: ErrorBody
