"""What the engine hands back: finished results and streamed deltas.

These are the only engine types the server and the DSL read. They are plain values (no
tensors, no references into engine state), safe to pass between the engine thread and the
event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one token, with the top alternatives at that position
    (`top` is empty unless top logprobs were asked for; sorted best first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class CompletionOutput:
    """One of the `n` continuations of a prompt. `text` excludes a matched stop string unless
    `include_stop_str_in_output`; `stop_reason` is the stop string or stop token id that ended
    it (None on EOS, length or abort)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None


@dataclass
class GenerateResult:
    """The finished result of one prompt. `cached_tokens` counts prompt tokens served from the
    radix cache (summed over the n continuations' first computation, i.e. of the prompt once)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.outputs[0].finish_reason

    @property
    def completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


# The start of every `error` that a request's constraint caused (see output_processor).
CONSTRAINT_FAILURE_PREFIX = "constraint: "


@dataclass
class StreamDelta:
    """New output of one continuation since the last delta. The last delta of a continuation
    has `finish_reason` set. `text` never ends in half a UTF-8 character and never contains
    any part of a stop string that is being matched."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    prompt_logprobs: list[TokenLogprob] | None = None
    prompt_token_ids: list[int] | None = None  # set on the last delta of a continuation
    error: str | None = None

    @property
    def constraint_failed(self) -> bool:
        """The continuation ended in error because its output constraint could not be
        followed (a parser resource limit reached while decoding, or text no token sequence of
        this vocabulary can spell): a property of the request, not an engine fault."""
        return self.finish_reason == "error" and (self.error or "").startswith(CONSTRAINT_FAILURE_PREFIX)
