"""One sequence's state inside the engine, owned by the engine thread.

A request is a prompt plus the tokens generated so far. Its KV lives in pages:

    all_ids:  | prompt ................................ | output ....... |
    pages:    | tree-owned (locked via `node`) | private to this request |
              |<- num_tree_pages * P tokens -->|
    num_computed: tokens whose KV is in the pages. The next step computes
                  all_ids[num_computed : num_computed + k]; when that reaches the end of
                  all_ids the step's logits sample the next token.

Prefill, a prefill over a cached prefix, recompute after preemption and decode are all the same
state machine with different counts. A request with `n > 1` becomes n sibling requests that
share the prompt through the radix cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable

from radixserve.runtime.outputs import FinishReason, StreamDelta, TokenLogprob
from radixserve.runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from radixserve.radix import TreeNode


class RequestStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """Mutable per-sequence state. Invariants (checked by `Scheduler.check_integrity`):
    `num_tree_pages <= len(pages)`; `len(pages) * page_size >= num_computed`; a RUNNING
    request's first `num_tree_pages` pages are locked in the tree through `node`; a WAITING or
    FINISHED request holds no pages and no lock."""

    request_id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    on_delta: Callable[[StreamDelta], None]
    cache_salt: str | None = None
    arrival: int = 0  # admission priority: lower arrives first, preempted last
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING

    # KV state
    pages: list[int] = field(default_factory=list)
    num_tree_pages: int = 0
    node: "TreeNode | None" = None
    num_computed: int = 0
    cached_tokens: int | None = None  # prompt tokens hit in the cache at first admission
    # Trailing output tokens that stand in for tokens still on the device while the overlapped
    # engine loop schedules the next step (runtime/engine_loop.py); 0 otherwise.
    placeholders: int = 0

    # output state (per-request helpers built by the engine)
    detokenizer: Any = None
    stop_checker: Any = None
    matcher: Any = None
    generator: Any = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    num_sent_tokens: int = 0
    created_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_at(self, position: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[position] if position < n else self.output_ids[position - n]

    def tokens(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]
