"""Continuous batching over a radix-cached, paged KV pool.

`schedule()` picks this step's work under a token budget; the model runner runs it;
`postprocess()` folds the sampled tokens back in. Three rules shape the choices:

* Running requests come first, in admission order: each gets its decode token (plus any tokens
  a grammar forced) or the next chunk of its prefill. Then waiting requests are admitted,
  longest cached prefix first, each with a prefill chunk that fits the remaining budget.
* A waiting request whose prompt shares a not-yet-cached prefix with a request that is still
  prefilling waits: the prefix is computed once, inserted into the tree when the chunk ends,
  and the waiting request then hits it.
* Pages are allocated on demand. When the pool runs dry, unlocked tree leaves are evicted LRU;
  if that is not enough the most recently admitted running request is preempted: its computed
  pages go into the tree (so recomputing it is mostly a cache hit), its private pages are
  freed, and it returns to the front of the waiting queue. Nothing crashes, nothing leaks.

Decode bursts: when the caller allows it (`schedule(max_burst=k)`) and every running request is
decoding with nothing that needs the host between tokens (no grammar, penalties or
log-probabilities), nobody waits for admission, and none would pass the context limit, the
batch runs k decode steps in one launch (`ScheduledBatch.burst`): pages are reserved for k
tokens, each step's sampled token feeds the next on the device, and the host folds k tokens per
request at once. A request that ends inside the burst (stop token, EOS, stop string,
max_tokens) keeps the tokens up to its end; the KV computed past it is never cached.

The scheduler touches only token ids and page indices; it never sees a tensor.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Literal, NamedTuple

from radixserve.radix import PageAllocator, RadixCache
from radixserve.runtime.config import EngineConfig, default_batch_tokens
from radixserve.runtime.request import Request, RequestStatus

logger = logging.getLogger(__name__)

# What `Scheduler._admit` did with a waiting request.
Admission = Literal["admitted", "deferred", "no_pages"]
# Running requests still in prefill, by (cache salt, *first page of the prompt).
PrefillIndex = dict[tuple[Any, ...], list[Request]]


class ScheduledSeq(NamedTuple):
    """One request's share of a step: tokens all_ids[start : start + num_new] are computed.
    `sample` is True when they reach the end of the sequence (the last row's logits draw the
    next token). Logits are computed for new tokens `logits_from .. num_new - 1` (offsets
    within this chunk): the last one when sampling, none (`logits_from == num_new`) for a
    middle prefill chunk, more when prompt log-probabilities are wanted. A NamedTuple, not a
    frozen dataclass: one is built per running request per step, at a third of the cost."""

    request: Request
    start: int
    num_new: int
    sample: bool
    logits_from: int

    @property
    def end(self) -> int:
        return self.start + self.num_new


@dataclass(frozen=True)
class ScheduledBatch:
    """`burst` > 1: every seq is a decode row (one token, sampling) and the step runs `burst`
    decode steps back to back, each fed the token the one before sampled (module docstring)."""

    seqs: tuple[ScheduledSeq, ...]
    preempted: int = 0
    burst: int = 1

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.seqs)

    @cached_property
    def all_decode(self) -> bool:
        """Every seq computes one token (a decode step). Cached: the engine loop's timing reads
        it for every step, twice with overlap."""
        return all(s.num_new == 1 for s in self.seqs)

    def __len__(self) -> int:
        return len(self.seqs)


@dataclass
class SchedulerCounters:
    """Monotonic totals for metrics."""

    queried_tokens: int = 0  # prompt tokens looked up in the cache at first admission
    cached_tokens: int = 0  # of those, hits
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    finished: int = 0
    steps: int = 0


class Scheduler:
    """Owns the waiting and running queues, the page allocator and the radix tree.
    Single-threaded: only the engine thread calls it."""

    def __init__(self, config: EngineConfig, num_pages: int, max_model_len: int | None = None) -> None:
        """`max_model_len`: the engine's context limit (default: the config's), which decode
        bursts never cross."""
        self.config = config
        self.page_size = config.page_size
        # The Engine resolves a None budget by device; a scheduler on its own takes the CPU's.
        self.max_batch_tokens = config.max_batch_tokens or default_batch_tokens("cpu")
        self.max_model_len = max_model_len or config.max_model_len or num_pages * config.page_size
        self.allocator = PageAllocator(num_pages)
        self.tree: RadixCache | None = (
            RadixCache(self.allocator, page_size=config.page_size, eviction=config.eviction_policy)
            if config.enable_prefix_cache
            else None
        )
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.counters = SchedulerCounters()
        self._next_arrival = 0

    # ------------------------------------------------------------------ queue management
    def add(self, request: Request) -> None:
        request.arrival = self._next_arrival
        self._next_arrival += 1
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request) -> None:
        """Release a request that ended (stop, length, abort, error): its computed full pages go
        into the tree for later turns, the rest is freed. Idempotent."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
            self._release(request, cache=True)
        elif request.status is RequestStatus.WAITING:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        request.status = RequestStatus.FINISHED
        self.counters.finished += 1

    # ------------------------------------------------------------------ the step
    def schedule(self, max_burst: int = 1) -> ScheduledBatch:
        """This step's work. `max_burst` > 1 allows a decode burst of up to that many steps."""
        budget = self.max_batch_tokens
        seqs: list[ScheduledSeq] = []
        preempted_before = self.counters.preemptions
        burst = self._burst_len(max_burst) if max_burst > 1 else 1
        ahead = burst - 1  # tokens past this step's that the burst computes

        running = RequestStatus.RUNNING
        page_size = self.page_size
        for req in list(self.running):
            if budget <= 0:
                break
            if req.status is not running:  # preempted earlier in this loop
                continue
            # = min(req.num_uncomputed, budget), without two property calls per request
            num_new = min(len(req.prompt_ids) + len(req.output_ids) - req.num_computed, budget)
            if num_new <= 0:
                continue
            # Pages already hold the new tokens (most decode steps): nothing to reserve.
            fits = req.num_computed + num_new + ahead <= len(req.pages) * page_size
            if not fits and not self._reserve(req, num_new + ahead, seqs):
                self.preempt(req)  # nothing left to evict or preempt: wait for pages
                continue
            seqs.append(self._scheduled(req, num_new))
            budget -= num_new

        # A burst admits nobody: its rows must all be decode rows (a preemption above may have
        # made room, but the preempted request waits for the next step).
        if burst == 1 and self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            self._admit_waiting(budget, seqs)

        self.counters.steps += 1
        return ScheduledBatch(tuple(seqs), self.counters.preemptions - preempted_before, burst if seqs else 1)

    def _burst_len(self, max_burst: int) -> int:
        """How many decode steps the running requests can take in one launch (1: no burst):
        all decoding, none needing the host between tokens, none admissible waiting, and none
        running past the context limit. A request may reach max_tokens inside the burst: the
        fold drops its tokens past it (as it drops those past a stop token), and its rows'
        extra steps cost less than the one-step launches the rest of the batch would fall
        back to, each bound by the host at large batches."""
        if self.waiting and len(self.running) < self.config.max_running:
            return 1
        k = max_burst
        limit = self.max_model_len
        for req in self.running:
            p = req.params
            num_tokens = len(req.prompt_ids) + len(req.output_ids)
            if req.num_computed >= num_tokens:
                continue  # finishes with the step in flight (max_tokens): no row in this one
            if (req.num_computed != num_tokens - 1 or req.matcher is not None or req.logprobs is not None
                    or p.uses_penalties):
                return 1
            k = min(k, limit - num_tokens)
            if k < 2:
                return 1
        return k

    def _admit_waiting(self, budget: int, seqs: list[ScheduledSeq]) -> None:
        """Admit waiting requests (cache-aware order) while budget, slots and pages last."""
        prefilling = self._prefilling_by_first_page()
        for req in self._waiting_in_order():
            if budget <= 0 or len(self.running) >= self.config.max_running:
                break
            admission = self._admit(req, budget, seqs, prefilling)
            if admission == "no_pages":
                break  # the requests behind it would not find pages either: stop trying this step
            if admission == "deferred":
                continue
            num_new = min(req.num_uncomputed, budget)
            seqs.append(self._scheduled(req, num_new))
            budget -= num_new

    def _scheduled(self, req: Request, num_new: int) -> ScheduledSeq:
        start = req.num_computed
        end = start + num_new
        num_prompt = len(req.prompt_ids)
        sample = end == num_prompt + len(req.output_ids)
        if sample and num_new == 1 and start >= num_prompt:
            return ScheduledSeq(req, start, 1, True, 0)  # decode: the common case, nothing to check
        logits_from = end - 1 if sample else end  # a middle prefill chunk needs no logits
        p = req.params
        if p.prompt_logprobs is not None and start < num_prompt:
            # logits at position t score token t+1; prompt tokens from `prompt_logprobs_start`
            first_row = max(p.prompt_logprobs_start - 1, 0)
            logits_from = min(max(first_row, start), logits_from)
        return ScheduledSeq(req, start, num_new, sample, logits_from - start)

    def postprocess_computed(self, batch: ScheduledBatch) -> None:
        """Advance `num_computed` for every scheduled request and hand finished prefill chunks to
        the tree, so requests waiting on the same prefix hit it next step."""
        running = RequestStatus.RUNNING
        ahead = batch.burst - 1
        for seq in batch.seqs:
            req = seq.request
            if req.status is not running:
                continue
            was_prefill = req.num_computed < len(req.prompt_ids)  # = req.in_prefill, inlined (hot)
            req.num_computed = seq.start + seq.num_new + ahead
            if was_prefill:
                self._cache_computed(req)

    # ------------------------------------------------------------------ admission
    def _waiting_in_order(self) -> Iterable[Request]:
        if (
            self.tree is None
            or self.config.schedule_policy == "fcfs"
            or len(self.waiting) > self.config.lpm_max_waiting
            or len(self.waiting) == 1  # nothing to order: the admission's own match suffices
        ):
            return list(self.waiting)
        scored = []
        for req in self.waiting:
            match = self.tree.match_prefix(self._match_tokens(req), req.cache_salt, touch=False)
            scored.append((-match.num_tokens, req.arrival, req))
        scored.sort(key=lambda t: (t[0], t[1]))
        return [r for _, _, r in scored]

    def _match_tokens(self, req: Request) -> list[int]:
        """The tokens that may be served from the cache: all but the last (its logits are
        needed), and none from which prompt log-probabilities are wanted."""
        limit = req.num_tokens - 1
        if req.params.prompt_logprobs is not None:
            limit = min(limit, max(req.params.prompt_logprobs_start - 1, 0))
        return req.tokens(0, limit)

    def _admit(self, req: Request, budget: int, seqs: list[ScheduledSeq],
               prefilling: PrefillIndex) -> Admission:
        """Move `req` from waiting to running with pages for its first chunk: "admitted";
        "deferred" when it should wait for a running request to cache its prefix; "no_pages"
        when the pool cannot hold its first chunk even after eviction."""
        tokens = self._match_tokens(req)
        if self.tree is not None:
            match = self.tree.match_prefix(tokens, req.cache_salt)
            matched, pages, node = match.num_tokens, list(match.pages), match.node
            if self._should_wait_for_prefix(req, matched, prefilling):
                return "deferred"
            self.tree.lock(node)
        else:
            matched, pages, node = 0, [], None
        req.pages = pages
        req.num_tree_pages = len(pages)
        req.node = node
        req.num_computed = matched
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        num_new = min(req.num_uncomputed, budget)
        if not self._reserve(req, num_new, seqs):
            # Could not get pages even after eviction and preemption: back to waiting.
            self.running.remove(req)
            self._release(req, cache=False)
            req.status = RequestStatus.WAITING
            return "no_pages"
        self.waiting.remove(req)
        prefilling.setdefault(self._first_page_key(req), []).append(req)
        if req.cached_tokens is None:  # first admission (not a re-admission after preemption)
            req.cached_tokens = matched
            self.counters.queried_tokens += len(req.prompt_ids)
            self.counters.cached_tokens += matched
            self.counters.prompt_tokens += len(req.prompt_ids)
        return "admitted"

    def _first_page_key(self, req: Request) -> tuple[Any, ...]:
        return (req.cache_salt, *req.prompt_ids[: self.page_size])

    def _prefilling_by_first_page(self) -> PrefillIndex:
        """Running requests still in prefill, by cache salt and first page of the prompt: the
        only ones a waiting request can share a whole page with (built once per step)."""
        index: PrefillIndex = {}
        if self.tree is None:
            return index
        for other in self.running:
            if other.num_computed < len(other.prompt_ids):  # = other.in_prefill, inlined (hot)
                index.setdefault(self._first_page_key(other), []).append(other)
        return index

    def _should_wait_for_prefix(self, req: Request, matched: int,
                                prefilling: PrefillIndex) -> bool:
        """True when a request that is still prefilling will cache at least one more whole page
        of this request's prompt: waiting a step costs less than computing it twice. The other
        request is running, so it gets budget first and the wait always ends."""
        # One whole page past what the cache gave it: the first `need` tokens, all in common.
        # (One slice comparison; a longest-common-prefix search cost ~0.2 ms per call, for
        # every waiting request of a group on every step, on gsp's 2k-token prompts.)
        need = (matched // self.page_size + 1) * self.page_size
        if need > req.num_tokens - 1:  # the last token is always computed
            return False
        ids: list[int] | None = None
        for other in prefilling.get(self._first_page_key(req), ()):
            if other.status is not RequestStatus.RUNNING or not other.in_prefill:
                continue  # preempted or done prefilling since the index was built
            if len(other.prompt_ids) < need:
                continue
            if ids is None:
                ids = req.tokens(0, need)
            if other.prompt_ids[:need] == ids:
                return True
        return False

    # ------------------------------------------------------------------ pages
    def _reserve(self, req: Request, num_new: int, seqs: list[ScheduledSeq]) -> bool:
        """Make sure `req` has pages for `num_computed + num_new` tokens. May evict tree leaves
        and preempt running requests that are not already in this step's batch. Returns False
        (and preempts `req` itself if it was running) when impossible."""
        need = -(-(req.num_computed + num_new) // self.page_size) - len(req.pages)
        if need <= 0:
            return True
        if self.allocator.num_free < need and self.tree is not None:
            self.tree.evict(need - self.allocator.num_free)
        protected: set[int] | None = None  # built only when someone must be preempted
        while self.allocator.num_free < need:
            if protected is None:
                protected = {id(s.request) for s in seqs} | {id(req)}
            victim = self._pick_victim(protected)
            if victim is None:
                return False
            self.preempt(victim)
            if self.tree is not None and self.allocator.num_free < need:
                self.tree.evict(need - self.allocator.num_free)
        req.pages.extend(self.allocator.alloc(need))
        return True

    def _pick_victim(self, protected: set[int]) -> Request | None:
        candidates = [r for r in self.running if id(r) not in protected]
        return max(candidates, key=lambda r: r.arrival) if candidates else None

    def preempt(self, req: Request) -> None:
        """Return a running request to the front of the waiting queue, keeping its output so
        far; its computed pages stay in the tree, so recomputing is mostly a cache hit."""
        self.running.remove(req)
        self._release(req, cache=True)
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.counters.preemptions += 1
        logger.debug("preempted %s at %d tokens", req.request_id, req.num_tokens)

    def _release(self, req: Request, cache: bool) -> None:
        # Only KV of known tokens counts: a burst computes past a request that ended inside it,
        # and a request preempted while a burst is in flight has placeholders for its tokens.
        req.num_computed = min(req.num_computed, req.num_tokens - req.placeholders)
        if cache and self.tree is not None and req.num_computed > 0:
            self._cache_computed(req)
        if self.tree is not None and req.node is not None:
            self.tree.unlock(req.node)
        private = req.pages[req.num_tree_pages :]
        if private:
            self.allocator.free(private)
        req.pages = []
        req.num_tree_pages = 0
        req.node = None
        req.num_computed = 0

    def _cache_computed(self, req: Request) -> None:
        """Insert the request's computed whole pages into the tree and lock them through it.

            pages:  | tree-owned | private, computed     | private tail |
                    0        num_tree_pages         full_pages
            insert() reports how much was already cached (maybe by a concurrent request that
            computed the same tokens): our private pages for that range are duplicates and
            are freed; the request switches to the tree's pages.
        """
        if self.tree is None:
            return
        full_pages = min(req.num_computed // self.page_size, len(req.pages))
        if full_pages <= req.num_tree_pages:
            return
        tokens = req.tokens(0, full_pages * self.page_size)
        already = self.tree.insert(tokens, req.pages[:full_pages], req.cache_salt) // self.page_size
        match = self.tree.match_prefix(tokens, req.cache_salt)
        duplicates = req.pages[req.num_tree_pages : max(already, req.num_tree_pages)]
        if duplicates:
            self.allocator.free(duplicates)
        req.pages[:full_pages] = match.pages
        self.tree.lock(match.node)
        if req.node is not None:
            self.tree.unlock(req.node)
        req.node = match.node
        req.num_tree_pages = full_pages

    # ------------------------------------------------------------------ accounting
    def private_pages(self) -> int:
        return sum(len(r.pages) - r.num_tree_pages for r in self.running)

    def check_integrity(self) -> None:
        """Every page is exactly one of: free, cached (evictable or locked), private to a
        running request. Raises on the first violation."""
        private = self.private_pages()
        if self.tree is not None:
            self.tree.check_integrity(private_pages=private)
        elif self.allocator.num_free + private != self.allocator.num_pages:
            raise RuntimeError(
                f"page leak: free {self.allocator.num_free} + private {private} != "
                f"{self.allocator.num_pages}"
            )
        for req in self.waiting:
            if req.pages or req.node is not None:
                raise RuntimeError(f"waiting request {req.request_id} holds pages")
        for req in self.running:
            if len(req.pages) * self.page_size < req.num_computed:
                raise RuntimeError(f"request {req.request_id} computed past its pages")
