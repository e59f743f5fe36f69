"""Token usage accounting from a request's deltas, shared by every endpoint.

Prompt tokens are what the server tokenized (known before submission); completion tokens
are counted from the deltas' token ids; cached tokens are the largest `cached_tokens` any
delta reported (the engine reports the prompt's prefix-cache hit, once per prompt).
"""

from __future__ import annotations

import logging

from radixserve.runtime.outputs import CONSTRAINT_FAILURE_PREFIX, StreamDelta
from radixserve.server.errors import APIError
from radixserve.server.protocol import NativeUsage, PromptTokensDetails, Usage

logger = logging.getLogger(__name__)


class UsageCounter:
    """Usage of one HTTP request, possibly over several prompts (completions with a list).
    `prompt_tokens` counts each prompt once, however many continuations (n) it has."""

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self._cached: dict[str, int] = {}

    def add(self, delta: StreamDelta) -> None:
        self.completion_tokens += len(delta.token_ids)
        if delta.cached_tokens > self._cached.get(delta.request_id, 0):
            self._cached[delta.request_id] = delta.cached_tokens

    @property
    def cached_tokens(self) -> int:
        return sum(self._cached.values())

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens),
        )

    def native(self) -> NativeUsage:
        return NativeUsage(
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens, cached_tokens=self.cached_tokens
        )


def generation_failed(delta: StreamDelta, constraint_param: str | None = None) -> APIError:
    """A continuation that ended in error. When the request's own constraint could not be
    followed (`StreamDelta.constraint_failed`), it is a 400 on `constraint_param` saying why;
    any other failure is the engine's, and its detail goes to the log, not the client."""
    if delta.constraint_failed:
        detail = (delta.error or "")[len(CONSTRAINT_FAILURE_PREFIX) :]
        logger.warning("request %s (continuation %d): constraint failed while decoding: %s", delta.request_id, delta.index, detail)
        return APIError(
            400,
            f"The output constraint could not be followed while generating: {detail}",
            param=constraint_param,
            code="constraint_error",
        )
    logger.error("request %s (continuation %d) failed in the engine: %s", delta.request_id, delta.index, delta.error)
    return APIError(500, "The server had an error while generating the response.", code="generation_error")
