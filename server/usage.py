"""Token usage accounting from a request's deltas, shared by every endpoint.

Prompt tokens are what the server tokenized (known before submission); completion tokens
are counted from the deltas' token ids; cached tokens are the largest `cached_tokens` any
delta reported (the engine reports the prompt's prefix-cache hit, once per prompt).
"""

from __future__ import annotations

import logging

from radixserve.runtime.outputs import StreamDelta
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


def generation_failed(delta: StreamDelta) -> APIError:
    """A continuation the engine failed: the engine's detail goes to the log, not the client."""
    logger.error("request %s (continuation %d) failed in the engine: %s", delta.request_id, delta.index, delta.error)
    return APIError(500, "The server had an error while generating the response.", code="generation_error")
