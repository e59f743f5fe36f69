"""The OpenAPI 3.1 document at `/openapi.json`, generated from the pydantic models.

starlette's SchemaGenerator reads docstrings and has no request bodies, so the document is
built here from the same `Endpoint` table the app routes with: each endpoint names its
request and response models, whose JSON Schemas (`model_json_schema` via
`models_json_schema`, draft 2020-12, which OpenAPI 3.1 uses) go under
`components/schemas`. The document is computed once per app.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response

from radixserve.server.protocol import ErrorResponse

_REF = "#/components/schemas/{model}"

_ERROR_TEXT = {
    400: "Invalid request (parameters, JSON, context length).",
    401: "Missing or wrong API key.",
    404: "Unknown model.",
    413: "Request body too large.",
    415: "Content-Type is not application/json.",
    500: "Internal error.",
    503: "Overloaded (see Retry-After) or the engine is down.",
}


@dataclass(frozen=True)
class Endpoint:
    """One route and its documentation. `stream_event` (the JSON in each SSE `data:`) adds
    `text/event-stream` to the 200 response; `public` endpoints need no API key;
    `media_type` is the 200 body's type when it is not JSON (then `response` is None)."""

    path: str
    method: str
    handler: Callable[[Request], Awaitable[Response]]
    summary: str
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    stream_event: type[BaseModel] | None = None
    public: bool = False
    media_type: str = "application/json"
    errors: tuple[int, ...] = (400, 401, 404, 413, 415, 500, 503)


def build_openapi(endpoints: Sequence[Endpoint], *, title: str, version: str, auth: bool) -> dict[str, Any]:
    inputs = [(ep.request, "validation") for ep in endpoints if ep.request is not None]
    outputs = [(ep.response, "serialization") for ep in endpoints if ep.response is not None]
    outputs += [(ep.stream_event, "serialization") for ep in endpoints if ep.stream_event is not None]
    outputs.append((ErrorResponse, "serialization"))
    keys, top = models_json_schema(inputs + outputs, ref_template=_REF)  # type: ignore[arg-type]
    paths: dict[str, dict[str, Any]] = {}
    error_ref = keys[(ErrorResponse, "serialization")]
    for ep in endpoints:
        op: dict[str, Any] = {"summary": ep.summary, "operationId": _operation_id(ep)}
        if ep.request is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": keys[(ep.request, "validation")]}}}
        ok: dict[str, Any] = {}
        if ep.response is not None:
            ok["application/json"] = {"schema": keys[(ep.response, "serialization")]}
        else:
            # No model: a JSON document (this one) is some object, anything else is text.
            kind = "object" if ep.media_type == "application/json" else "string"
            ok[ep.media_type] = {"schema": {"type": kind}}
        if ep.stream_event is not None:
            event_ref = keys[(ep.stream_event, "serialization")]
            ok["text/event-stream"] = {"schema": _sse_event_schema(event_ref, error_ref)}
        responses: dict[str, Any] = {"200": {"description": "Success.", "content": ok}}
        for status in ep.errors:
            if status == 401 and (ep.public or not auth):
                continue
            responses[str(status)] = {"description": _ERROR_TEXT[status], "content": {"application/json": {"schema": error_ref}}}
        op["responses"] = responses
        if auth and not ep.public:
            op["security"] = [{"bearerAuth": []}]
        paths.setdefault(ep.path, {})[ep.method.lower()] = op
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": top.get("$defs", {})},
    }
    if auth:
        doc["components"]["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    return doc


def _sse_event_schema(event_ref: dict[str, Any], error_ref: dict[str, Any]) -> dict[str, Any]:
    """One server-sent event (OpenAPI 3.1 reads a text/event-stream schema per event): its
    `data` is a JSON chunk or error, or the final `[DONE]`."""
    return {
        "type": "object",
        "description": "Each event's data is a JSON chunk (or an error object); the last event is `data: [DONE]`.",
        "required": ["data"],
        "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
        "anyOf": [
            {"properties": {"data": {"const": "[DONE]"}}},
            {"properties": {"data": {"contentMediaType": "application/json", "contentSchema": {"anyOf": [event_ref, error_ref]}}}},
        ],
    }


def _operation_id(ep: Endpoint) -> str:
    name = ep.path.strip("/").replace("/", "_").replace(".", "_") or "root"
    return f"{ep.method.lower()}_{name}"
