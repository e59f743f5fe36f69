"""Submitting one HTTP request's prompts to the engine and reading their deltas back.

The engine thread calls `on_delta` for every delta; we hop each one onto the event loop with
`call_soon_threadsafe` into one queue per HTTP request, so a completions request with several
prompts (and n continuations each) is read as one interleaved stream of
`(prompt_index, StreamDelta)`. Nothing here blocks the event loop: `submit` only validates
and enqueues, except for constrained requests whose grammar compiles in the caller's thread,
which go through a worker thread.

`GenerationRun.close()` aborts whatever has not finished; handlers call it in `finally`, so a
client that disconnects (its handler task is cancelled) frees its engine requests and pages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from typing import Any

from radixserve.runtime.outputs import StreamDelta
from radixserve.runtime.sampling_params import SamplingParams
from radixserve.server.errors import from_engine_error
from radixserve.server.metrics import ServerMetrics, StreamTiming
from radixserve.server.sampling import compile_timeout

logger = logging.getLogger(__name__)


class GenerationRun:
    """The engine requests behind one HTTP request.

    Engine request ids are `request_id` for a single prompt and `f"{request_id}-{i}"` for
    prompt i of several. Iterate `events()` once; it ends when every continuation finished.
    """

    def __init__(self, engine: Any, metrics: ServerMetrics, arrival: float, *, compile_timeout_s: float | None = None) -> None:
        self._engine = engine
        self._compile_timeout_s = compile_timeout_s
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, StreamDelta]] = asyncio.Queue()
        self._timing = StreamTiming(metrics, arrival)
        self._unfinished: dict[str, int] = {}  # engine request id -> continuations left
        self._rids: list[str] = []

    @property
    def request_ids(self) -> list[str]:
        return list(self._rids)

    def _on_delta(self, prompt_index: int, delta: StreamDelta) -> None:
        # Engine thread: the only thing done here is handing the delta to the event loop.
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (prompt_index, delta))
        except RuntimeError:
            pass  # the event loop is closed: the server is gone, nobody is listening

    async def start(
        self,
        prompts: Sequence[list[int]],
        params: SamplingParams,
        *,
        request_id: str,
        cache_salt: str | None,
        prompt_param: str,
    ) -> None:
        """Submit every prompt; on any rejection abort those already submitted and raise the
        client's error (APIError)."""
        for i, ids in enumerate(prompts):
            rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            submit = partial(
                self._engine.submit,
                ids,
                params,
                on_delta=partial(self._on_delta, i),
                request_id=rid,
                cache_salt=cache_salt,
            )
            self._unfinished[rid] = params.n
            self._rids.append(rid)
            try:
                if params.constraint is not None:
                    await self._submit_in_thread(submit, rid)  # grammar compilation may take a while
                else:
                    submit()
            except asyncio.CancelledError:
                self.close()
                raise
            except asyncio.TimeoutError:
                self.close()
                assert self._compile_timeout_s is not None
                raise compile_timeout(params.constraint.kind if params.constraint else "constraint", self._compile_timeout_s) from None
            except Exception as exc:
                del self._unfinished[rid]
                self._rids.pop()
                self.close()
                raise from_engine_error(exc, prompt_param) from None

    async def _submit_in_thread(self, submit: Callable[[], str], rid: str) -> None:
        """`submit()` in a worker thread, waiting at most the compile timeout. A thread cannot
        be interrupted: when we stop waiting (timeout, or the client left) while it still
        compiles, the request it queues afterwards is aborted as soon as it is queued, so no
        generation runs for a client that is gone."""
        job = asyncio.ensure_future(asyncio.to_thread(submit))
        try:
            await asyncio.wait_for(asyncio.shield(job), self._compile_timeout_s)
        except BaseException:
            job.add_done_callback(partial(self._abort_late_submission, rid))
            raise

    def _abort_late_submission(self, rid: str, job: asyncio.Future) -> None:
        if job.cancelled() or job.exception() is not None:
            return  # nothing was queued (a rejection nobody waits for any more)
        try:
            self._engine.abort(rid)
        except Exception:  # noqa: BLE001 - a done callback must not raise
            logger.exception("engine.abort(%s) failed", rid)

    async def events(self) -> AsyncIterator[tuple[int, StreamDelta]]:
        """Every delta of every continuation, in arrival order, until all finished."""
        while any(self._unfinished.values()):
            prompt_index, delta = await self._queue.get()
            now = time.monotonic()
            self._timing.on_tokens((prompt_index, delta.index), len(delta.token_ids), now)
            if delta.finish_reason is not None:
                self._unfinished[delta.request_id] = self._unfinished.get(delta.request_id, 1) - 1
                self._timing.on_finish(delta.finish_reason)
                if not any(self._unfinished.values()):
                    self._timing.on_complete(now)
            yield prompt_index, delta

    def close(self) -> None:
        """Abort every engine request with unfinished continuations (idempotent)."""
        for rid, left in self._unfinished.items():
            if left > 0:
                try:
                    self._engine.abort(rid)
                except Exception:  # noqa: BLE001 - closing must not raise
                    logger.exception("engine.abort(%s) failed", rid)
                for _ in range(left):
                    self._timing.on_finish("abort")
                self._unfinished[rid] = 0
