"""Server-sent events, and noticing a client that went away.

`EventStreamResponse` sends the chunks of an async iterator while it listens for the client's
disconnect; a disconnect cancels the iterator at once (even while it waits for the engine's
next token, or for a queued request to start), and its `on_close` callback aborts the engine
request (an async generator that never started would not run its own `finally`).
starlette's StreamingResponse notices a disconnect only when its next write fails, i.e.
after the next token, which may be seconds away for a queued request.

`cancel_on_disconnect` does the same for a non-streaming handler's awaited work.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from radixserve.server.errors import APIError, internal_error

logger = logging.getLogger(__name__)

T = TypeVar("T")

SSE_DONE = b"data: [DONE]\n\n"


def sse_data(payload: BaseModel | Mapping[str, Any]) -> bytes:
    """One `data:` event. JSON never contains a raw newline, so one line suffices."""
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json()
    else:
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + text.encode("utf-8") + b"\n\n"


async def sse_stream(events: AsyncIterator[bytes], what: str, close: Callable[[], None]) -> AsyncIterator[bytes]:
    """The body of every streamed response: the events, then `data: [DONE]`, then `close()`.

    Once the headers are out, an error can only travel inside the stream: it becomes one
    OpenAI-format error event (a generic message for anything unexpected, which is logged with
    `what`), still followed by [DONE], so clients never see a torn stream or a traceback.
    """
    try:
        async for event in events:
            yield event
        yield SSE_DONE
    except APIError as exc:
        yield sse_data(exc.body())
        yield SSE_DONE
    except Exception:  # noqa: BLE001 - reported to the client as a generic error event
        logger.exception("%s failed", what)
        yield sse_data(internal_error().body())
        yield SSE_DONE
    finally:
        close()


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class EventStreamResponse:
    """A `text/event-stream` response over `chunks`; cancels and closes `chunks` if the
    client disconnects first."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        headers: Mapping[str, str] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._chunks = chunks
        self._on_close = on_close
        self._headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),  # tell nginx-style proxies not to buffer
        ]
        for key, value in (headers or {}).items():
            self._headers.append((key.lower().encode("latin-1"), value.encode("latin-1")))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        failure: list[Exception] = []
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self._headers})
            async with anyio.create_task_group() as group:

                async def pump() -> None:
                    try:
                        async for chunk in self._chunks:
                            await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                    except Exception as exc:  # noqa: BLE001 - re-raised below, unwrapped
                        failure.append(exc)
                    finally:
                        group.cancel_scope.cancel()

                group.start_soon(pump)
                await _wait_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            aclose = getattr(self._chunks, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
            if self._on_close is not None:
                self._on_close()
        if failure:
            raise failure[0]


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Await `work` unless the client disconnects first. Returns (completed, result); when
    the client left, `work` was cancelled (its `finally` blocks ran) and result is None.
    Call only after the request body has been read."""
    result: list[T] = []
    failure: list[Exception] = []
    async with anyio.create_task_group() as group:

        async def run() -> None:
            try:
                result.append(await work)
            except Exception as exc:  # noqa: BLE001 - re-raised below, unwrapped
                failure.append(exc)
            finally:
                group.cancel_scope.cancel()

        group.start_soon(run)
        await _wait_for_disconnect(request.receive)
        group.cancel_scope.cancel()
    if failure:
        raise failure[0]
    return (True, result[0]) if result else (False, None)
