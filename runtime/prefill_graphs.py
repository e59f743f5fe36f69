"""CUDA graphs for small prefill steps: a short new turn over any cached history, replayed.

An agent's next turn (a tool result, a user message) is a few hundred new tokens over a long
cached conversation; a chat request's prompt is often no longer. Such a step is ~3 ms of
kernels on an H100 for llama-1b, but launching its ~180 kernels one by one from Python takes
the host 10-18 ms, and the device waits for each launch (benchmarks/RESULTS.md, cached-prefix
TTFT). So steps of at most MAX_PREFILL_REQUESTS requests and MAX_PREFILL_TOKENS new tokens, none
asking for prompt log-probabilities, replay a graph captured at start-up for the smallest
(token bucket, request bucket) that holds them:

    token buckets   64 128 256 512        request buckets   1 2 4
    a step of 2 requests with 90 + 7 new tokens replays the graph of (128, 2)

Static buffers, shared by every graph (graph (T, R) reads the first T tokens and R requests):

    i64 [3, max_tokens]:   input_ids | positions | out_slots
    i32 [3 * max_requests + 1]:   seq_lens | extend_lens | cu_extend
    logits_rows i64 [max_requests],   page_table i32 [max_requests, max_pages]

Invariants (what makes one capture valid for every later step):

* Real requests fill the front: request i owns tokens cu_extend[i] .. cu_extend[i+1] - 1, as in
  an eager batch. Padding tokens (the real total .. T) have token 0, position 0 and write their
  K/V to the dummy slot (a page the allocator never hands out); no request owns them, so no
  attention reads them, and their rows of every activation are ignored. Padding requests
  (real count .. R) have extend_len 0 and seq_len 0: their attention programs exit at once.
* Kernel grids are fixed at capture from the bucket and `max_model_len` (the bound of every
  seq_len): the extend kernel's grid covers T queries for each of R requests, and its prefix
  split count is chosen for a `max_model_len` history; each program derives its share of a
  request's prefix from the device-side lengths, so a replay is valid for any prefix.
* Logits: one row per request, its last new token (`logits_rows`), in the graph's own output
  buffer [R, vocab] fp32, overwritten by its next replay; sampling reads it right after the
  replay in stream order. A request that does not sample (a middle prefill chunk) has a row
  all the same, which the runner ignores.
* Inputs reach the static buffers by non-blocking copies from pinned host memory (see
  cuda_graphs.py): building and replaying a step never makes the host wait for the device.
  Carried tokens (the overlapped loop's placeholders) are gathered on the device after the
  upload, as for decode graphs.

Without CUDA (`use_graphs=False`) `PrefillGraphs.run` runs the model eagerly on the same padded
static buffers: the CPU tests check the padding rules that way.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
import torch

from radixserve.runtime.cuda_graphs import bucket_for, capture_graph, copier
from radixserve.runtime.forward_batch import ForwardBatch, SeqStep, host_batch
from radixserve.runtime.kv_cache import KVCache

logger = logging.getLogger(__name__)

__all__ = ["PREFILL_REQUEST_BUCKETS", "PREFILL_TOKEN_BUCKETS", "PrefillGraphs"]

PREFILL_TOKEN_BUCKETS = (64, 128, 256, 512)
PREFILL_REQUEST_BUCKETS = (1, 2, 4)
_IDS, _POS, _SLOTS = range(3)


class PrefillGraphs:
    """Static buffers and one captured graph per (token bucket, request bucket).

    Not thread-safe: only the engine thread replays. `run` returns one logits row per step, a
    view valid until the next replay of the same graph. `model` is called as
    `model(batch, kv_cache)` and returns logits [len(batch.logits_indices), vocab] fp32.
    """

    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, *, max_model_len: int, dummy_page: int,
                 token_buckets: Sequence[int] = PREFILL_TOKEN_BUCKETS,
                 request_buckets: Sequence[int] = PREFILL_REQUEST_BUCKETS, use_graphs: bool | None = None) -> None:
        if not 0 <= dummy_page < kv_cache.num_pages:
            raise ValueError(f"dummy_page {dummy_page} is not a page of the pool ({kv_cache.num_pages} pages)")
        if not token_buckets or not request_buckets or min(*token_buckets, *request_buckets) < 1:
            raise ValueError("prefill graphs need positive token and request buckets")
        self.model = model
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        self.page_size = kv_cache.page_size
        self.max_model_len = max_model_len
        self.token_buckets = tuple(sorted(token_buckets))
        self.request_buckets = tuple(sorted(request_buckets))
        self.max_tokens, self.max_requests = self.token_buckets[-1], self.request_buckets[-1]
        self.max_pages = -(-max_model_len // self.page_size)
        self.dummy_slot = dummy_page * self.page_size
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        dev, r = self.device, self.max_requests
        self.i64 = torch.zeros(3, self.max_tokens, dtype=torch.int64, device=dev)
        self.i64[_SLOTS].fill_(self.dummy_slot)
        self.i32 = torch.zeros(3 * r + 1, dtype=torch.int32, device=dev)
        self.logits_rows = torch.zeros(r, dtype=torch.int64, device=dev)
        self.page_table = torch.zeros(r, self.max_pages, dtype=torch.int32, device=dev)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0
        self.capture_s = 0.0  # how long `capture` took (compiles included)

    # ------------------------------------------------------------------ buckets and buffers
    def bucket(self, steps: Sequence[SeqStep]) -> tuple[int, int] | None:
        """The (tokens, requests) graph that runs `steps`, or None when none can: too many
        tokens or requests, a longer sequence than `max_model_len`, or logits wanted for more
        than a request's last new token."""
        r = bucket_for(len(steps), self.request_buckets)
        t = bucket_for(sum(len(s.token_ids) for s in steps), self.token_buckets)
        if r is None or t is None:
            return None
        for s in steps:
            if s.seq_len > self.max_model_len or s.logits_from not in (None, -1, len(s.token_ids) - 1):
                return None
        return t, r

    def forward_batch(self, tokens: int, requests: int) -> ForwardBatch:
        """The ForwardBatch of views into the static buffers that graph (tokens, requests) runs."""
        r, m = requests, self.max_requests
        return ForwardBatch(
            input_ids=self.i64[_IDS, :tokens],
            positions=self.i64[_POS, :tokens],
            out_slots=self.i64[_SLOTS, :tokens],
            page_table=self.page_table[:r],
            seq_lens=self.i32[:r],
            extend_lens=self.i32[m : m + r],
            cu_extend=self.i32[2 * m : 2 * m + r + 1],
            logits_indices=self.logits_rows[:r],
            seq_lens_cpu=(0,) * r,
            extend_lens_cpu=(tokens,) + (0,) * (r - 1),  # max_extend_len: the grid covers T queries
            page_size=self.page_size,
            seq_len_bound=self.max_model_len,
        )

    def host_inputs(self, steps: Sequence[SeqStep],
                    tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(i64 [3, max_tokens], i32 [3 * max_requests + 1], logits_rows [max_requests], page
        table [len(steps), pages in use]) of `steps` padded to `tokens` (module docstring)."""
        h = host_batch(steps, self.page_size)
        n, b, m = len(h.input_ids), len(steps), self.max_requests
        if n > tokens or tokens > self.max_tokens or b > m:
            raise ValueError(f"prefill graph: {b} requests, {n} tokens do not fit the bucket of {tokens} tokens")
        i64 = np.zeros((3, self.max_tokens), dtype=np.int64)
        i64[_IDS, :n] = h.input_ids
        i64[_POS, :n] = h.positions
        i64[_SLOTS, :n] = h.out_slots
        i64[_SLOTS, n:] = self.dummy_slot
        i32 = np.zeros(3 * m + 1, dtype=np.int32)
        i32[:b] = h.seq_lens
        i32[m : m + b] = h.extend_lens
        i32[2 * m : 2 * m + b + 1] = h.cu_extend
        i32[2 * m + b + 1 :] = n  # padding requests start and end after the real tokens
        rows = np.zeros(m, dtype=np.int64)
        rows[:b] = h.cu_extend[1:] - 1
        return i64, i32, rows, h.page_table

    # ------------------------------------------------------------------ capture
    def capture(self) -> None:
        """Capture every (tokens, requests) graph, largest first, in one memory pool. A no-op
        without CUDA graphs. The static buffers hold padding while capturing (no request, every
        token writing the dummy slot), so the warm-up runs touch only the dummy page."""
        if not self.use_graphs:
            return
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        with torch.inference_mode():
            for tokens in reversed(self.token_buckets):
                for requests in reversed(self.request_buckets):
                    batch = self.forward_batch(tokens, requests)
                    self._graphs[(tokens, requests)] = capture_graph(lambda: self.model(batch, self.kv_cache),
                                                                     pool, stream)
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - t0
        logger.info("captured %d prefill CUDA graphs (tokens %s x requests %s) in %.1f s", len(self._graphs),
                    ",".join(map(str, self.token_buckets)), ",".join(map(str, self.request_buckets)), self.capture_s)

    # ------------------------------------------------------------------ replay
    def run(self, steps: Sequence[SeqStep], carry: tuple[torch.Tensor, torch.Tensor] | None = None,
            key: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits [len(steps), vocab] fp32: row i from the last new token of steps[i].

        `carry` = (token indices in the steps' flat token order, their token ids), both on the
        device: input tokens the previous step sampled, written over the uploaded ones. `key`:
        `bucket(steps)` where the caller has it already."""
        key = key or self.bucket(steps)
        if key is None:
            raise ValueError(f"a prefill step of {len(steps)} requests and "
                             f"{sum(len(s.token_ids) for s in steps)} tokens fits no prefill graph")
        tokens, requests = key
        i64, i32, rows, table = self.host_inputs(steps, tokens)
        copy = copier(self.device)
        copy(self.i64, i64)
        copy(self.i32, i32)
        copy(self.logits_rows, rows)
        copy(self.page_table[: table.shape[0], : table.shape[1]], table)
        if carry is not None:
            self.i64[_IDS].index_copy_(0, *carry)
        self.replays += 1
        if not self.use_graphs:
            return self.model(self.forward_batch(tokens, requests), self.kv_cache)[: len(steps)]
        graph, out = self._graphs[key]
        graph.replay()
        return out[: len(steps)]
