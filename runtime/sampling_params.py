"""Per-request sampling parameters: one frozen, validated value shared by every layer.

The server maps OpenAI fields onto this, the DSL maps `gen(...)` arguments onto it, and the
sampler reads it. Validation happens here, once, with exceptions that name the field, so
nothing unvalidated reaches the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from radixserve.runtime.constraints.spec import ConstraintSpec


class InvalidParams(ValueError):
    """A sampling parameter is out of range. `param` names the offending field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's continuation.

    temperature == 0 means greedy. top_k <= 0 and top_p == 1 and min_p == 0 disable those
    filters. `logprobs` is the number of top alternatives to return per generated token
    (0 returns only the chosen token's log-probability, None returns nothing).
    `prompt_logprobs` likewise for prompt tokens from `prompt_logprobs_start` on: the engine
    then recomputes those positions even if they are cached. `max_tokens == 0` is allowed
    (score a prompt without generating).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    prompt_logprobs_start: int = 0
    constraint: ConstraintSpec | None = None

    MAX_TOP_LOGPROBS = 20
    MIN_TEMPERATURE = 1e-5

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise InvalidParams("max_tokens", f"must be a non-negative integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidParams("temperature", f"must be in [0, 100], got {self.temperature}")
        if self.temperature < self.MIN_TEMPERATURE:
            # Dividing logits by, say, 1e-50 overflows to inf and the softmax to NaN: sample
            # such near-zero temperatures greedily, which is what they mean.
            object.__setattr__(self, "temperature", 0.0)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidParams("top_p", f"must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or not -(2**31) < self.top_k < 2**31:
            raise InvalidParams("top_k", f"must be a 32-bit integer (<= 0: off), got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidParams("min_p", f"must be in [0, 1], got {self.min_p}")
        if not 0.01 <= self.repetition_penalty <= 10.0:
            raise InvalidParams("repetition_penalty", f"must be in [0.01, 10], got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise InvalidParams(name, f"must be in [-2, 2], got {value}")
        if not isinstance(self.n, int) or self.n < 1:
            raise InvalidParams("n", f"must be a positive integer, got {self.n!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidParams("stop", "stop strings must be non-empty strings")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= self.MAX_TOP_LOGPROBS:
                raise InvalidParams(name, f"must be in [0, {self.MAX_TOP_LOGPROBS}], got {value}")
        if self.prompt_logprobs_start < 0:
            raise InvalidParams("prompt_logprobs_start", "must be non-negative")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )
