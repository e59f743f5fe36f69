"""Pure ASGI middleware, outermost first: request id, error guard, API key, body size.

Pure ASGI (not BaseHTTPMiddleware) so streaming responses pass through untouched and a
client's disconnect reaches the handler.

- `RequestContextMiddleware` echoes `X-Request-Id` (generating one when absent or unusable),
  stores it in the scope for handlers, and counts responses by route and status.
- `ErrorGuardMiddleware` turns any exception that escaped a handler into a generic 500 in
  OpenAI's format and logs it with the request id: no traceback reaches a client. A client
  that disconnects while its body is read is not an error: nothing is sent.
- `AuthMiddleware` checks `Authorization: Bearer <key>` (or `x-api-key`) in constant time.
- `BodyLimitMiddleware` rejects a body over the limit with 413, from `Content-Length` before
  reading anything, and by counting while reading when the length is not declared.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
from collections.abc import Callable, Collection

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from radixserve.server.errors import APIError, bad_request, internal_error

logger = logging.getLogger(__name__)

REQUEST_ID_SCOPE_KEY = "radixserve.request_id"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, on_response: Callable[[str, int], None] | None = None, known_paths: Collection[str] = ()) -> None:
        self.app = app
        self.on_response = on_response
        self.known_paths = frozenset(known_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id")
        request_id = given if given is not None and _REQUEST_ID_RE.match(given) else secrets.token_hex(16)
        scope[REQUEST_ID_SCOPE_KEY] = request_id
        route = scope["path"] if scope["path"] in self.known_paths else "unmatched"

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("x-request-id", request_id)
                if self.on_response is not None:
                    self.on_response(route, message["status"])
            await send(message)

        await self.app(scope, receive, send_with_id)


class ErrorGuardMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = {"started": False, "finished": False}

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["finished"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            # The client left while its body was being read: nobody to answer, nothing failed
            # (not a 500, neither in the log nor in the response-status metrics).
            logger.info("client disconnected before its request was read (%s %s)", scope.get("method"), scope.get("path"))
        except Exception:
            logger.exception(
                "unhandled error in %s %s (request %s)", scope.get("method"), scope.get("path"), scope.get(REQUEST_ID_SCOPE_KEY)
            )
            if not state["started"]:
                await internal_error().response()(scope, receive, send)
            elif not state["finished"]:
                # Headers are out (a stream): end the body so the client is not left hanging.
                await send({"type": "http.response.body", "body": b"", "more_body": False})


class AuthMiddleware:
    def __init__(self, app: ASGIApp, api_key: str, public_paths: Collection[str]) -> None:
        self.app = app
        self.key = api_key.encode("utf-8")
        self.public_paths = frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public_paths:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = None
        authorization = headers.get("authorization")
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() == "bearer":
                given = token.strip()
        if given is None:
            given = headers.get("x-api-key")
        if given is None or not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.key):
            message = "Missing API key: send it as 'Authorization: Bearer <key>'." if given is None else "Incorrect API key provided."
            error = APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyTooLarge(Exception):
    """Raised from `receive` when the body grows past the limit (caught by the middleware)."""


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than the limit of {self.limit} bytes.", code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await bad_request("Invalid Content-Length header.").response()(scope, receive, send)
                return
            if int(declared) > self.limit:
                # Answer without reading the body; the server closes the connection after it.
                await self._too_large().response()(scope, receive, send)
                return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await self._too_large().response()(scope, receive, send)
