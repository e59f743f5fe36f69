"""`POST /generate`: the native endpoint (the DSL's HTTP backend uses it).

It exposes `SamplingParams` as is, token ids in and out, logprobs by token id, and prompt
logprobs, so a client can score given text: send prompt + candidate with `max_tokens=0`,
`prompt_logprobs=0`, `prompt_logprobs_start=len(prefix)`, and sum the candidate's logprobs.
Streaming sends one JSON event per delta, the last of each continuation with usage.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from radixserve.runtime.outputs import StreamDelta, TokenLogprob
from radixserve.server.engine_client import GenerationRun
from radixserve.server.errors import APIError, bad_request
from radixserve.server.parsing import read_json
from radixserve.server.protocol import (
    GenerateRequest,
    GenerateResponse,
    GenerateStreamEvent,
    NativeLogprob,
    NativeOutput,
)
from radixserve.server.sampling import (
    check_max_tokens,
    check_n,
    check_prompt_tokens,
    check_token_ids,
    native_sampling_params,
    constraint_field,
    resolve_constraint,
    resolve_max_tokens,
)
from radixserve.server.sse import EventStreamResponse, cancel_on_disconnect, sse_data, sse_stream
from radixserve.server.state import new_request_id, server_state
from radixserve.server.usage import UsageCounter, generation_failed

logger = logging.getLogger(__name__)


async def generate(request: Request) -> Response:
    arrival = time.monotonic()
    state = server_state(request)
    req = await read_json(request, GenerateRequest)
    if (req.text is None) == (req.input_ids is None):
        raise bad_request("Send exactly one of text and input_ids.", param="text")
    sp = req.sampling_params
    settings = state.settings
    check_n(sp.n, settings, "sampling_params.n")
    if "max_tokens" in sp.model_fields_set:
        check_max_tokens(sp.max_tokens, settings, "sampling_params.max_tokens")
    elif settings.max_tokens_limit is not None and sp.max_tokens > settings.max_tokens_limit:
        sp = sp.model_copy(update={"max_tokens": settings.max_tokens_limit})  # the default, fitted
    params = native_sampling_params(sp, await resolve_constraint(sp, settings, json_object=sp.json_object))
    if req.input_ids is not None:
        ids = list(req.input_ids)
        check_token_ids(ids, state.vocab_size(), "input_ids")
        prompt_param = "input_ids"
    else:
        ids = await state.tokenize(req.text or "")
        prompt_param = "text"
    if not ids:
        raise APIError(400, "The prompt is empty after tokenization.", param=prompt_param)
    check_prompt_tokens(len(ids), settings, prompt_param)
    if params.prompt_logprobs is not None and params.prompt_logprobs_start >= len(ids):
        raise bad_request(
            f"prompt_logprobs_start ({params.prompt_logprobs_start}) must be less than the prompt length ({len(ids)}).",
            param="sampling_params.prompt_logprobs_start",
        )
    resolve_max_tokens(params.max_tokens, len(ids), state.engine.max_model_len, None, prompt_param)
    requested_start = params.prompt_logprobs_start
    if params.prompt_logprobs is not None and requested_start == 0:
        # The first prompt token has no logprob (nothing precedes it): score from 1, and
        # answer with None in its place so prompt_logprobs[i] stays token start + i.
        params = dataclasses.replace(params, prompt_logprobs_start=1)
    request_id = new_request_id(request)
    field = constraint_field(sp, json_object=sp.json_object)
    writer = NativeWriter(request_id, ids, params.n, requested_start, field and f"sampling_params.{field}")
    run = GenerationRun(state.engine, state.metrics, arrival, compile_timeout_s=settings.constraint_timeout_s)
    await run.start([ids], params, request_id=request_id, cache_salt=req.cache_salt, prompt_param=prompt_param)
    if req.stream:
        return EventStreamResponse(writer.stream(run), on_close=run.close)
    try:
        completed, body = await cancel_on_disconnect(request, writer.collect(run))
    finally:
        run.close()
    return JSONResponse(body) if completed else Response(status_code=499)


def native_logprobs(logprobs: list[TokenLogprob | None] | None) -> list[NativeLogprob | None] | None:
    if logprobs is None:
        return None
    return [None if lp is None else NativeLogprob(token_id=lp.token_id, logprob=lp.logprob, top=list(lp.top)) for lp in logprobs]


class NativeWriter:
    def __init__(
        self, request_id: str, prompt_ids: list[int], n: int, prompt_logprobs_start: int, constraint_param: str | None = None
    ) -> None:
        self.id = request_id
        self.constraint_param = constraint_param  # the field a constraint failure is reported on
        self.prompt_ids = prompt_ids
        self.n = n
        self.prompt_logprobs_start = prompt_logprobs_start
        self.usage = UsageCounter(len(prompt_ids))

    async def collect(self, run: GenerationRun) -> dict[str, Any]:
        texts: list[list[str]] = [[] for _ in range(self.n)]
        outputs = [NativeOutput(index=i, text="", token_ids=[], finish_reason=None) for i in range(self.n)]
        prompt_logprobs: list[TokenLogprob] | None = None
        try:
            async for _, delta in run.events():
                self.usage.add(delta)
                if delta.finish_reason == "error":
                    raise generation_failed(delta, self.constraint_param)
                out = outputs[delta.index]
                texts[delta.index].append(delta.text)
                out.token_ids.extend(delta.token_ids)
                if delta.logprobs is not None:
                    out.logprobs = (out.logprobs or []) + (native_logprobs(delta.logprobs) or [])  # type: ignore[operator]
                if delta.prompt_logprobs is not None:
                    prompt_logprobs = delta.prompt_logprobs
                if delta.finish_reason is not None:
                    out.finish_reason = delta.finish_reason
                    out.stop_reason = delta.stop_reason
        finally:
            run.close()
        for out, parts in zip(outputs, texts):
            out.text = "".join(parts)
        first = outputs[0]
        body = GenerateResponse(
            id=self.id,
            text=first.text,
            token_ids=first.token_ids,
            finish_reason=first.finish_reason,
            stop_reason=first.stop_reason,
            logprobs=first.logprobs,
            prompt_token_ids=self.prompt_ids,
            prompt_logprobs=self._prompt_logprobs(prompt_logprobs),
            prompt_logprobs_start=self.prompt_logprobs_start,
            outputs=outputs,
            usage=self.usage.native(),
        )
        return body.model_dump(mode="json")

    def _prompt_logprobs(self, logprobs: list[TokenLogprob] | None) -> list[NativeLogprob | None] | None:
        if logprobs is None:
            return None
        lead: list[TokenLogprob | None] = [None] if self.prompt_logprobs_start == 0 else []
        return native_logprobs(lead + list(logprobs))

    def _event(self, delta: StreamDelta) -> GenerateStreamEvent:
        return GenerateStreamEvent(
            id=self.id,
            index=delta.index,
            text=delta.text,
            token_ids=list(delta.token_ids),
            finish_reason=delta.finish_reason,
            stop_reason=delta.stop_reason,
            logprobs=native_logprobs(delta.logprobs),  # type: ignore[arg-type]
            prompt_logprobs=self._prompt_logprobs(delta.prompt_logprobs),
            usage=self.usage.native() if delta.finish_reason is not None else None,
        )

    def stream(self, run: GenerationRun) -> AsyncIterator[bytes]:
        return sse_stream(self._events(run), f"generate stream {self.id}", run.close)

    async def _events(self, run: GenerationRun) -> AsyncIterator[bytes]:
        async for _, delta in run.events():
            self.usage.add(delta)
            if delta.finish_reason == "error":
                raise generation_failed(delta, self.constraint_param)
            yield sse_data(self._event(delta))
