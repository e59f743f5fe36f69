"""Errors in OpenAI's format, and the mapping of every failure we know of onto them.

Every error body is `{"error": {"message", "type", "param", "code"}}`. Handlers raise
`APIError`; engine rejections, pydantic validation errors and starlette's own HTTP errors are
translated here, in one place, so the status codes stay consistent across endpoints. Nothing
here ever puts a traceback or an exception's repr into a response: unexpected exceptions are
turned into a generic 500 by the error-guard middleware, which logs them.
"""

from __future__ import annotations

import math
from typing import Any

import pydantic
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from radixserve.runtime.constraints.errors import ConstraintError
from radixserve.runtime.errors import PromptTooLong, QueueFull, RequestRejected
from radixserve.runtime.sampling_params import InvalidParams

# OpenAI's `type` values by status code (the SDK maps the status, clients read `type`).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}

# How many validation problems one error message lists before "and N more".
_MAX_LISTED_ERRORS = 3


class APIError(Exception):
    """An error the client should see, with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def internal_error() -> APIError:
    """The only message a client sees for a failure we did not foresee (details go to the log)."""
    return APIError(500, "The server had an error while processing your request.", code="internal_error")


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist.",
        param="model",
        code="model_not_found",
        type="invalid_request_error",
    )


def context_length_error(prompt_tokens: int, max_tokens: int, limit: int, param: str) -> APIError:
    """The engine's PromptTooLong wording (it gives the numbers), with the right `param`."""
    message = str(PromptTooLong(prompt_tokens, max_tokens, limit))
    return APIError(400, message, param=param, code="context_length_exceeded")


def from_engine_error(exc: Exception, prompt_param: str = "messages") -> APIError:
    """Translate an exception raised by the engine at submission into the client's error."""
    if isinstance(exc, PromptTooLong):
        return context_length_error(exc.prompt_tokens, exc.max_tokens, exc.limit, prompt_param)
    if isinstance(exc, QueueFull):
        retry = max(1, math.ceil(exc.retry_after_s))
        return APIError(
            exc.status_code,
            str(exc),
            code="server_overloaded",
            headers={"Retry-After": str(retry)},
        )
    if isinstance(exc, RequestRejected):
        status = exc.status_code
        headers = {"Retry-After": "5"} if status == 503 else None
        return APIError(status, str(exc), param=exc.param, headers=headers)
    if isinstance(exc, InvalidParams):
        return bad_request(str(exc), param=exc.param)
    if isinstance(exc, ConstraintError):
        return bad_request(exc.message, param=exc.param, code="invalid_constraint")
    raise exc


# pydantic names the branch of a union an error came from ("str", "constrained-str",
# "list[int]", "function-after[...]"); in a field path they are noise.
_BRANCH_TAGS = frozenset({"str", "int", "float", "bool", "bytes", "dict", "list", "none", "any"})
_BRANCH_PREFIXES = ("function-", "json-or-python", "constrained-", "lax-or-strict", "nullable", "tagged-union")


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    """("messages", 0, "content") -> "messages[0].content"; union-branch tags are dropped."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and (part in _BRANCH_TAGS or part.startswith(_BRANCH_PREFIXES) or "[" in part):
            continue
        else:
            path += f".{part}" if path else str(part)
    return path


def from_validation_error(exc: pydantic.ValidationError) -> APIError:
    """Summarize a pydantic validation error: field paths and messages, first few only."""
    errors = exc.errors(include_url=False, include_input=False)
    if any(err["type"] in ("json_invalid", "json_type") for err in errors):
        detail = next(err["msg"] for err in errors if err["type"] in ("json_invalid", "json_type"))
        return bad_request(f"The request body is not valid JSON: {detail}", code="invalid_json")
    parts = []
    for err in errors[:_MAX_LISTED_ERRORS]:
        path = _loc_to_path(tuple(err["loc"]))
        parts.append(f"{path}: {err['msg']}" if path else err["msg"])
    if len(errors) > _MAX_LISTED_ERRORS:
        parts.append(f"and {len(errors) - _MAX_LISTED_ERRORS} more")
    first_path = _loc_to_path(tuple(errors[0]["loc"])) if errors else ""
    return bad_request("Invalid request: " + "; ".join(parts), param=first_path or None, code="invalid_value")


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    """starlette's own errors (unknown path, wrong method) in OpenAI's format."""
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers) if exc.headers else None
    return APIError(exc.status_code, str(exc.detail), headers=headers).response()
