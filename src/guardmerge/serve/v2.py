"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) on the guard server, so
Triton and KServe clients and the gateways that speak it can call the guard.

- ``GET /v2`` and ``GET /v2/models/{name}``: server and model metadata;
- ``GET /v2/health/live``, ``/v2/health/ready`` and ``/v2/models/{name}/ready`` (never behind
  the API key; ready means what ``/healthz`` 200 means);
- ``POST /v2/models/{name}/infer``: one ``BYTES`` input tensor of texts, shape ``[n]`` or
  ``[n, 1]``, as JSON ``data`` or in the binary tensor extension (``Inference-Header-Content-Length``,
  each element a 4-byte little-endian length and its UTF-8 bytes), as Triton clients send it.

The answer holds, per head ``task`` (all, or the ``outputs`` asked for):

- ``task``: FP32 ``[n, C]`` label probabilities (softmax; sigmoid for multi-label heads); a token
  head's is BYTES ``[n]``, each the JSON list of its entity spans;
- ``task.flagged``: BOOL ``[n]``, the head's flag under the server's thresholds;
- ``task.label``: BYTES ``[n]``, the top label (multi-label: the labels at threshold, token: the
  entity types, comma-joined);

and ``flagged``, BOOL ``[n]``: any head flagged the text. Answers are JSON tensors (a client asking
for binary outputs reads them as well). Texts, limits, thresholds, auth and the model's NaN/Inf
refusal are those of ``/v1/classify``. A guard fails closed: a v2 tensor has no place for one
text's error, so when any head gives no verdict for any text (non-finite scores, a failed head)
the whole request fails (500, nothing that could read as benign). Errors are v2's
``{"error": "code: message"}`` with ``/v1``'s status codes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guardmerge import __version__
from guardmerge.errors import NonFiniteWeightsError
from guardmerge.serve.errors import APIError
from guardmerge.serve.inference import TRUNCATED
from guardmerge.serve.schemas import HeadErrorVerdict, HeadVerdict, MultiLabelVerdict, TextVerdict, TokenVerdict
from guardmerge.serve.verdicts import verdicts

__all__ = ["HEADER_LENGTH", "add_v2_routes"]

HEADER_LENGTH = "Inference-Header-Content-Length"
"""The binary tensor extension's header: the JSON part's byte length; binary data follows it."""
PLATFORM = "guardmerge"


class _Tensor(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(..., min_length=1, max_length=256)
    shape: list[int] = Field(..., min_length=1, max_length=2)
    datatype: str
    data: list[Any] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


class _Output(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(..., min_length=1, max_length=256)
    parameters: dict[str, Any] = Field(default_factory=dict)


class _InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None = Field(None, max_length=256)
    inputs: list[_Tensor] = Field(..., min_length=1, max_length=1)
    outputs: list[_Output] | None = Field(None, max_length=4096)
    parameters: dict[str, Any] = Field(default_factory=dict)


def add_v2_routes(app: FastAPI, service: Any) -> None:
    """The v2 routes over the same :class:`~guardmerge.serve.routes.Service` as ``/v1``; left out
    of ``/openapi.json``, since the Open Inference Protocol has a specification of its own."""
    name = service.settings.model_name
    app.add_api_route("/v2", _server_metadata, methods=["GET"], include_in_schema=False, summary="Server metadata")
    app.add_api_route("/v2/health/live", _live, methods=["GET"], include_in_schema=False, summary="Liveness")
    ready = _ready(service)
    app.add_api_route("/v2/health/ready", ready, methods=["GET"], include_in_schema=False, summary="Readiness")
    app.add_api_route(
        "/v2/models/{model}/ready",
        _for_model(name, ready),
        methods=["GET"],
        include_in_schema=False,
        summary="Model ready",
    )
    app.add_api_route(
        "/v2/models/{model}",
        _for_model(name, _model_metadata(service)),
        methods=["GET"],
        include_in_schema=False,
        summary="Model metadata: the text input and each head's outputs",
    )
    app.add_api_route(
        "/v2/models/{model}/infer",
        _infer(service),
        methods=["POST"],
        include_in_schema=False,
        summary="Classify a BYTES tensor of texts with every head (Open Inference Protocol)",
    )


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _unknown_model(model: str, name: str) -> JSONResponse | None:
    """404 ``unknown_model`` when ``model`` is not this server's ``name``."""
    if model == name:
        return None
    return _error(404, f"unknown_model: no model '{model}' here; this server's model is '{name}'")


def _from(exc: APIError) -> JSONResponse:
    return _error(exc.status, f"{exc.code}: {exc.message}", exc.headers)


async def _server_metadata() -> dict[str, Any]:
    return {"name": PLATFORM, "version": __version__, "extensions": ["binary_tensor_data"]}


async def _live() -> Response:
    return Response(status_code=200)


def _ready(service: Any) -> Callable[..., Awaitable[Response]]:
    async def ready() -> Response:
        ok = service.batcher.running and not service.health.bad_weights and service.health.last_output_finite
        return Response(status_code=200 if ok else 503)

    return ready


def _for_model(name: str, endpoint: Callable[[], Awaitable[Any]]) -> Callable[[str], Awaitable[Any]]:
    async def routed(model: str) -> Any:
        return _unknown_model(model, name) or await endpoint()

    return routed


def _model_metadata(service: Any) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def metadata() -> dict[str, Any]:
        outputs: list[dict[str, Any]] = []
        for task, rule in service.rules.items():
            token = rule.kind.flags == "entities"
            outputs.append(
                {
                    "name": task,
                    "datatype": "BYTES" if token else "FP32",
                    "shape": [-1] if token else [-1, len(rule.labels)],
                }
            )
            outputs.append({"name": f"{task}.flagged", "datatype": "BOOL", "shape": [-1]})
            outputs.append({"name": f"{task}.label", "datatype": "BYTES", "shape": [-1]})
        outputs.append({"name": "flagged", "datatype": "BOOL", "shape": [-1]})
        return {
            "name": service.settings.model_name,
            "versions": [],
            "platform": PLATFORM,
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
            "outputs": outputs,
            "parameters": {"labels": {t: list(r.labels) for t, r in service.rules.items()}},
        }

    return metadata


def _infer(service: Any) -> Callable[[str, Request], Awaitable[Any]]:
    from guardmerge.serve.routes import _request_texts, run_inference

    async def infer(model: str, request: Request) -> Any:
        """Every head's probabilities, flag and label for a BYTES tensor of texts (module docstring)."""
        name = service.settings.model_name
        unknown = _unknown_model(model, name)
        if unknown is not None:
            return unknown
        try:
            body, texts = _parse(await request.body(), request.headers.get(HEADER_LENGTH))
            heads = _asked(body.outputs, list(service.rules))
            texts = _request_texts(texts, service.settings)
            if service.health.bad_weights:
                raise APIError(503, "non_finite_weights", str(NonFiniteWeightsError(service.health.bad_weights)))
            logits = await run_inference(service, texts, None)
            rows = verdicts({t: logits[t] for t in service.rules}, service.rules, logits.get(TRUNCATED))
            outputs = _outputs(rows, service.rules, heads)
        except APIError as exc:
            return _from(exc)
        answer: dict[str, Any] = {"model_name": name, "outputs": outputs}
        if body.id is not None:
            answer["id"] = body.id
        return JSONResponse(answer)

    return infer


def _parse(raw: bytes, header_length: str | None) -> tuple[_InferRequest, list[str]]:
    """The request and its texts, from JSON or the binary tensor extension; or a 400 :class:`APIError`."""
    binary = b""
    if header_length is not None:
        try:
            cut = int(header_length)
        except ValueError:
            cut = -1
        if not 0 <= cut <= len(raw):
            raise APIError(
                400, "malformed_request", f"{HEADER_LENGTH} '{header_length}' is not a length within the body"
            )
        raw, binary = raw[:cut], raw[cut:]
    try:
        body = _InferRequest.model_validate(json.loads(raw.decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, "malformed_json", f"the request is not UTF-8 JSON: {exc}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "the body"
        raise APIError(400, "malformed_request", f"{where}: {err.get('msg')}") from None
    tensor = body.inputs[0]
    if tensor.datatype != "BYTES":
        raise APIError(
            400, "malformed_request", f"input '{tensor.name}' is {tensor.datatype}; texts are a BYTES tensor"
        )
    if any(d < 0 for d in tensor.shape) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise APIError(400, "malformed_request", f"input '{tensor.name}' has shape {tensor.shape}; use [n] or [n, 1]")
    count = tensor.shape[0]
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        if tensor.data is not None or not isinstance(size, int) or size != len(binary):
            raise APIError(400, "malformed_request", f"input '{tensor.name}': binary_data_size does not match the body")
        items = _binary_strings(binary, tensor.name)
    else:
        items = _flat(tensor.data if tensor.data is not None else [], tensor.name)
    if len(items) != count:
        raise APIError(
            400, "malformed_request", f"input '{tensor.name}' has {len(items)} texts for shape {tensor.shape}"
        )
    return body, items


def _flat(data: list[Any], name: str) -> list[str]:
    out: list[str] = []
    for item in data:
        if isinstance(item, list):
            out.extend(_flat(item, name))
        elif isinstance(item, str):
            out.append(item)
        else:
            raise APIError(400, "malformed_request", f"input '{name}': every element must be a string of text")
    return out


def _binary_strings(data: bytes, name: str) -> list[str]:
    """BYTES elements of the binary extension: a 4-byte little-endian length, then the bytes."""
    out, at = [], 0
    while at < len(data):
        if at + 4 > len(data):
            raise APIError(400, "malformed_request", f"input '{name}': binary data ends inside an element length")
        (size,) = struct.unpack_from("<I", data, at)
        at += 4
        if at + size > len(data):
            raise APIError(400, "malformed_request", f"input '{name}': binary data ends inside an element")
        try:
            out.append(data[at : at + size].decode("utf-8"))
        except UnicodeDecodeError:
            raise APIError(422, "invalid_text", f"input '{name}': element {len(out)} is not UTF-8") from None
        at += size
    return out


def _asked(outputs: list[_Output] | None, tasks: list[str]) -> list[str] | None:
    """The output names asked for (None: all), each known; else 400 ``unknown_output``."""
    if outputs is None:
        return None
    known = {"flagged", *tasks, *(f"{t}.{s}" for t in tasks for s in ("flagged", "label"))}
    names = list(dict.fromkeys(o.name for o in outputs))
    bad = [n for n in names if n not in known]
    if bad:
        raise APIError(
            400, "unknown_output", f"unknown output(s) {', '.join(bad)}; this model has: {', '.join(sorted(known))}"
        )
    return names


def _outputs(rows: list[TextVerdict], rules: dict[str, Any], asked: list[str] | None) -> list[dict[str, Any]]:
    """The answer's tensors; a head without a verdict on any text fails the request (fails closed)."""
    for i, row in enumerate(rows):
        for task, head in row.heads.items():
            if isinstance(head, HeadErrorVerdict):
                raise APIError(
                    500,
                    head.error.code,
                    f"head '{task}' gave no verdict for text {i} ({head.error.message}); no verdict is given",
                )
    n = len(rows)
    tensors: dict[str, dict[str, Any]] = {}
    for task, rule in rules.items():
        heads = [row.heads[task] for row in rows]
        if rule.kind.flags == "entities":
            data: list[Any] = [json.dumps([e.model_dump() for e in _token(h).entities]) for h in heads]
            tensors[task] = {"name": task, "datatype": "BYTES", "shape": [n], "data": data}
        else:
            probs = [float(_probabilities(h)[label]) for h in heads for label in rule.labels]
            tensors[task] = {"name": task, "datatype": "FP32", "shape": [n, len(rule.labels)], "data": probs}
        flags = [bool(h.flagged) for h in heads]
        tensors[f"{task}.flagged"] = {"name": f"{task}.flagged", "datatype": "BOOL", "shape": [n], "data": flags}
        labels = [_label(h) for h in heads]
        tensors[f"{task}.label"] = {"name": f"{task}.label", "datatype": "BYTES", "shape": [n], "data": labels}
    tensors["flagged"] = {"name": "flagged", "datatype": "BOOL", "shape": [n], "data": [r.flagged for r in rows]}
    return [tensors[name] for name in (asked or tensors)]


def _token(head: Any) -> TokenVerdict:
    assert isinstance(head, TokenVerdict)
    return head


def _probabilities(head: Any) -> dict[str, float]:
    assert isinstance(head, (HeadVerdict, MultiLabelVerdict))
    return head.probabilities


def _label(head: Any) -> str:
    if isinstance(head, HeadVerdict):
        return head.label
    if isinstance(head, MultiLabelVerdict):
        return ",".join(head.labels)
    return ",".join(dict.fromkeys(e.label for e in _token(head).entities))
