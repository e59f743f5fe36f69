"""`POST /v1/completions`: the legacy text-completion API.

A prompt may be a string, a list of strings, a list of token ids or a list of such lists;
each prompt becomes one engine request with `n` continuations, and choice
`prompt_index * n + continuation` of the response. `echo` prepends the prompt (with its
logprobs when `logprobs` is set: the first prompt token has none). `suffix` is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from radixserve.runtime.outputs import TokenLogprob
from radixserve.server.engine_client import GenerationRun
from radixserve.server.errors import APIError
from radixserve.server.parsing import read_json
from radixserve.server.protocol import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from radixserve.server.sampling import (
    check_max_tokens,
    check_n,
    check_prompt_tokens,
    check_token_ids,
    completion_sampling_params,
    constraint_field,
    resolve_constraint,
    resolve_max_tokens,
)
from radixserve.server.sse import EventStreamResponse, cancel_on_disconnect, sse_data, sse_stream
from radixserve.server.state import ServerState, new_request_id, server_state
from radixserve.server.usage import UsageCounter, generation_failed

logger = logging.getLogger(__name__)


async def completions(request: Request) -> Response:
    arrival = time.monotonic()
    state = server_state(request)
    req = await read_json(request, CompletionRequest)
    state.check_model(req.model)
    settings = state.settings
    check_n(req.n, settings)
    if "max_tokens" in req.model_fields_set:
        check_max_tokens(req.max_tokens, settings, "max_tokens")
    elif settings.max_tokens_limit is not None and req.max_tokens > settings.max_tokens_limit:
        # The schema's default (16), not the client's choice: fit it under the limit.
        req = req.model_copy(update={"max_tokens": settings.max_tokens_limit})
    params = completion_sampling_params(req, await resolve_constraint(req, settings))
    if req.echo and params.prompt_logprobs is not None:
        # Position 0 has no logprob (nothing precedes it); the engine scores from 1 on.
        params = dataclasses.replace(params, prompt_logprobs_start=1)
    prompts = await prompt_token_ids(state, req.prompt)
    texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt) if isinstance(req.prompt[0], str) else None
    for ids in prompts:
        check_prompt_tokens(len(ids), settings, "prompt")
        resolve_max_tokens(req.max_tokens, len(ids), state.engine.max_model_len, None, "prompt")
    request_id = new_request_id(request)
    writer = CompletionWriter(state, req, f"cmpl-{request_id}", prompts, texts)
    run = GenerationRun(state.engine, state.metrics, arrival, compile_timeout_s=settings.constraint_timeout_s)
    await run.start(prompts, params, request_id=request_id, cache_salt=req.cache_salt, prompt_param="prompt")
    if req.stream:
        return EventStreamResponse(writer.stream(run), on_close=run.close)
    try:
        completed, body = await cancel_on_disconnect(request, writer.collect(run))
    finally:
        run.close()
    return JSONResponse(body) if completed else Response(status_code=499)


async def prompt_token_ids(state: ServerState, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    """Every accepted prompt form as a list of token-id lists."""
    if isinstance(prompt, str):
        prompts = [await state.tokenize(prompt)]
    elif isinstance(prompt[0], str):
        prompts = [await state.tokenize(text) for text in prompt]  # type: ignore[arg-type]
    elif isinstance(prompt[0], int):
        prompts = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = [list(ids) for ids in prompt]  # type: ignore[union-attr]
    vocab = state.vocab_size()
    for ids in prompts:
        if not ids:
            raise APIError(400, "The prompt is empty after tokenization.", param="prompt")
        check_token_ids(ids, vocab, "prompt")
    return prompts


@dataclass
class _Choice:
    """One choice being assembled: its text so far and its legacy-format logprobs."""

    text: list[str] = field(default_factory=list)
    length: int = 0  # characters of text so far (for text_offset)
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class CompletionWriter:
    def __init__(
        self, state: ServerState, req: CompletionRequest, response_id: str, prompts: list[list[int]], texts: list[str] | None
    ) -> None:
        self.state = state
        self.req = req
        self.id = response_id
        self.created = int(time.time())
        self.prompts = prompts
        self.prompt_texts = texts  # the prompts as sent, when sent as text (echoed verbatim)
        self.usage = UsageCounter(sum(len(ids) for ids in prompts))
        self.choices = [_Choice() for _ in range(len(prompts) * req.n)]

    def _add_logprobs(self, choice: _Choice, logprobs: list[TokenLogprob | None], token_ids: list[int]) -> CompletionLogprobs:
        """Append one span of tokens (with logprob None where there is none) to `choice`,
        returning that span alone in the legacy format (what a stream chunk carries)."""
        text = self.state.token_text
        span = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for token_id, lp in zip(token_ids, logprobs):
            token = text(token_id)
            span.tokens.append(token)
            span.token_logprobs.append(lp.logprob if lp is not None else None)
            span.top_logprobs.append({text(t): v for t, v in lp.top} if lp is not None else None)
            span.text_offset.append(choice.length)
            choice.length += len(token)
        choice.tokens += span.tokens
        choice.token_logprobs += span.token_logprobs
        choice.top_logprobs += span.top_logprobs
        choice.text_offset += span.text_offset
        return span

    def _echo(
        self, choice: _Choice, prompt_index: int, prompt_logprobs: list[TokenLogprob] | None
    ) -> tuple[str, CompletionLogprobs | None]:
        ids = self.prompts[prompt_index]
        text = self.prompt_texts[prompt_index] if self.prompt_texts is not None else self.state.engine.detokenize(ids)
        span = None
        if self.req.logprobs is not None:
            scored: list[TokenLogprob | None] = [None, *(prompt_logprobs or [])]
            scored += [None] * (len(ids) - len(scored))
            span = self._add_logprobs(choice, scored, ids)
        choice.text.append(text)
        return text, span

    def _generated(
        self, choice: _Choice, text: str, token_ids: list[int], logprobs: list[TokenLogprob] | None
    ) -> CompletionLogprobs | None:
        choice.text.append(text)
        if self.req.logprobs is None:
            choice.length += len(text)
            return None
        return self._add_logprobs(choice, list(logprobs or [None] * len(token_ids)), token_ids)

    def _legacy(self, choice: _Choice) -> CompletionLogprobs | None:
        if self.req.logprobs is None:
            return None
        return CompletionLogprobs(
            tokens=choice.tokens,
            token_logprobs=choice.token_logprobs,
            top_logprobs=choice.top_logprobs,
            text_offset=choice.text_offset,
        )

    # ------------------------------------------------------------------ whole response
    async def collect(self, run: GenerationRun) -> dict[str, Any]:
        n = self.req.n
        pending: dict[int, list[tuple[str, list[int], list[TokenLogprob] | None]]] = {i: [] for i in range(len(self.choices))}
        prompt_logprobs: dict[int, list[TokenLogprob] | None] = {}
        try:
            async for prompt_index, delta in run.events():
                self.usage.add(delta)
                if delta.finish_reason == "error":
                    raise generation_failed(delta, constraint_field(self.req) or "response_format")
                index = prompt_index * n + delta.index
                pending[index].append((delta.text, delta.token_ids, delta.logprobs))
                if delta.prompt_logprobs is not None:
                    prompt_logprobs[prompt_index] = delta.prompt_logprobs
                if delta.finish_reason is not None:
                    self.choices[index].finish_reason = delta.finish_reason
        finally:
            run.close()
        # Echoed prompts come first, but prompt logprobs arrive with the last delta: assemble now.
        for index, choice in enumerate(self.choices):
            if self.req.echo:
                self._echo(choice, index // n, prompt_logprobs.get(index // n))
            for text, token_ids, logprobs in pending[index]:
                self._generated(choice, text, token_ids, logprobs)
        body = Completion(
            id=self.id,
            created=self.created,
            model=self.state.served_name,
            choices=[
                CompletionChoice(index=i, text="".join(c.text), logprobs=self._legacy(c), finish_reason=c.finish_reason)
                for i, c in enumerate(self.choices)
            ],
            usage=self.usage.usage(),
        )
        return body.model_dump(mode="json")

    # ------------------------------------------------------------------ streamed response
    def _chunk(self, choices: list[CompletionChoice], usage: Any = None) -> bytes:
        return sse_data(Completion(id=self.id, created=self.created, model=self.state.served_name, choices=choices, usage=usage))

    def stream(self, run: GenerationRun) -> AsyncIterator[bytes]:
        return sse_stream(self._events(run), f"completion stream {self.id}", run.close)

    async def _events(self, run: GenerationRun) -> AsyncIterator[bytes]:
        n = self.req.n
        echoed: set[int] = set()
        # echo + logprobs: the prompt's logprobs come with the last delta, and the prompt must
        # go out first, so such a choice is held back and sent whole when it finishes.
        hold = self.req.echo and self.req.logprobs is not None
        held: dict[int, list[tuple[str, list[int], list[TokenLogprob] | None]]] = {}
        async for prompt_index, delta in run.events():
            self.usage.add(delta)
            if delta.finish_reason == "error":
                raise generation_failed(delta, constraint_field(self.req) or "response_format")
            index = prompt_index * n + delta.index
            choice = self.choices[index]
            if hold:
                held.setdefault(index, []).append((delta.text, delta.token_ids, delta.logprobs))
                if delta.finish_reason is None:
                    continue
                text, span = self._echo(choice, prompt_index, delta.prompt_logprobs)
                yield self._chunk([CompletionChoice(index=index, text=text, logprobs=span, finish_reason=None)])
                parts = held.pop(index)
                text = "".join(part[0] for part in parts)
                ids = [t for part in parts for t in part[1]]
                logprobs = [lp for part in parts for lp in (part[2] or [])] or None
                span = self._generated(choice, text, ids, logprobs)
                yield self._chunk([CompletionChoice(index=index, text=text, logprobs=span, finish_reason=delta.finish_reason)])
                continue
            if self.req.echo and index not in echoed:
                echoed.add(index)
                text, _ = self._echo(choice, prompt_index, None)
                yield self._chunk([CompletionChoice(index=index, text=text, finish_reason=None)])
            span = self._generated(choice, delta.text, delta.token_ids, delta.logprobs)
            if delta.text or delta.finish_reason is not None or span is not None:
                choice_chunk = CompletionChoice(index=index, text=delta.text, logprobs=span, finish_reason=delta.finish_reason)
                yield self._chunk([choice_chunk])
        options = self.req.stream_options
        if options is not None and options.include_usage:
            yield self._chunk([], usage=self.usage.usage())
