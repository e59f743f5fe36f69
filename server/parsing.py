"""Reading a request body into a pydantic model, with OpenAI-format errors for every way a
body can be wrong: wrong content type (415), empty, not UTF-8 or not JSON (400), or
failing validation (400, naming the field paths)."""

from __future__ import annotations

from typing import TypeVar

import pydantic
from starlette.requests import Request

from radixserve.server.errors import APIError, bad_request, from_validation_error

M = TypeVar("M", bound=pydantic.BaseModel)


async def read_json(request: Request, model: type[M]) -> M:
    """The body validated as `model`. A missing Content-Type is accepted as JSON (curl
    without -H); any other non-JSON type is refused."""
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise APIError(415, f"Content-Type must be application/json, got '{media}'.", code="unsupported_media_type")
    body = await request.body()
    if not body.strip():
        raise bad_request("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        return model.model_validate_json(body)
    except pydantic.ValidationError as exc:
        raise from_validation_error(exc) from None
