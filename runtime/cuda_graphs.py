"""CUDA graphs for decode steps: captured once at start-up, replayed at every decode step.

A decode step of a small model is a few hundred short kernels; launching them one by one from
Python costs more than running them. Every decode batch (each request adds exactly one token
and needs that token's logits) therefore replays a graph captured at start-up for the smallest
captured batch size (a "bucket") that holds it:

    capture sizes: 1 2 4 8 16 24 32 48 64 80 96 112 128 160 192 ... 512 576 640 ... (<= max_bs, and max_bs)
    a decode batch of 37 requests replays the graph of 48: rows 37..47 are padding

One set of static input buffers serves every graph; the graph of bucket b reads their first b
rows. Shared-prefix (cascade) decode batches have graphs of their own that read the cascade
buffers as well:

    i64 [4 + max_steps, max_bs]:  input_ids | positions | out_slots | carry dst | carry src
                                  | out_slots of burst steps 1 .. max_steps - 1
    i32 [4 * max_bs + 1]:  seq_lens | prefix_lens | suffix_lens | cu_groups (max_bs + 1)
    page_table [max_bs, max_pages]      (plain graphs)
    prefix_page_table [max_bs, max_pages], suffix_page_table [max_bs, max_pages]  (cascade graphs)
    max_pages = ceil(max_model_len / page_size)

Invariants (what makes one capture valid for every later step):

* Padding rows (real batch size .. bucket) have token 0, position 0, seq_len 0 (suffix_len 0
  and no group in cascade graphs) and write their K/V to the reserved dummy slot: the first
  slot of a page that the page allocator never hands out (the engine makes the KV pool one
  page larger than the allocator's). They read no KV, cost almost nothing, and never touch a
  real request's KV. Their logits are ignored.
* Page-table columns past a row's ceil(seq_len / page_size) pages are stale (left from earlier
  steps) and never read: the kernels stop at seq_len.
* Kernel grids are fixed at capture. Split-KV counts come from the bucket and `max_model_len`
  (the bound of every seq_len), never from this step's lengths; each program derives its own
  split from the device-side length, so a replay is valid for any lengths <= max_model_len.
* Cascade graphs have `bucket` group slots of at most `group_cap` requests each (the requests
  of one prefix tile, see kernels/shared_prefix_attention.py): a plan's larger groups are cut
  into chunks of `group_cap`, and each chunk reads its prefix once, as the kernel's row blocks
  would anyway. Each padding row is a group of its own with no prefix (so every row of the
  bucket is in a group, as the kernel's contract asks, and its scratch needs no clearing);
  the remaining slots are empty (cu_groups[g] == cu_groups[g + 1]).
* A graph's output (logits [bucket, vocab] fp32) is the first rows of one buffer that every
  graph writes (the largest graph's output, in the graphs' shared memory pool), so it is
  overwritten by the next replay of any graph. Sampling reads it right after the replay in
  stream order, so it is consumed before any later replay runs.
* Inputs reach the static buffers by non-blocking copies from pinned host memory, whose blocks
  the caching host allocator does not reuse before those copies ran: building and replaying a
  step never makes the host wait for the device.
* "Carried" tokens: in the overlapped engine loop a decode row's input token may be the one
  sampled by the previous step, still on the device; `carry` names those rows and the
  previous step's token rows, and the replay gathers them on the device before running.
* Decode bursts (`run(..., steps=k)` then `next_step` k - 1 times) replay the same graph k
  times. The host uploads once: page tables covering all k new tokens and the write slot of
  every step. Between replays the device advances the real rows' inputs (token = the one just
  sampled, position + 1, seq_len + 1, suffix_len + 1, the next step's slot); padding rows stay
  padding. A cascade plan holds for the whole burst: prefixes do not move as sequences grow.

Without CUDA (or with `use_graphs=False`) `DecodeGraphs.run` runs the model eagerly on the same
padded static buffers: the CPU tests check the padding rules that way.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from radixserve.runtime.cascade import CascadeInfo
from radixserve.runtime.forward_batch import ForwardBatch, fill_rows
from radixserve.runtime.kv_cache import KVCache

logger = logging.getLogger(__name__)

__all__ = [
    "DecodeGraphs",
    "DecodeRows",
    "HostDecodeInputs",
    "build_host_inputs",
    "bucket_for",
    "capture_batch_sizes",
    "capture_graph",
    "copier",
    "group_cap",
    "split_groups",
]

# Rows of the i64 static buffer; burst step k >= 1 writes to the slots in row _NEXT_SLOTS + k - 1.
_IDS, _POS, _SLOTS, _CARRY_DST, _CARRY_SRC, _NEXT_SLOTS = range(6)


def capture_batch_sizes(max_bs: int) -> tuple[int, ...]:
    """The batch sizes graphs are captured for: 1, 2, 4, 8, then steps of 8 to 32, of 16 to 128,
    of 32 to 512, of 64 beyond, capped at `max_bs`, which is always included. Padding wastes at
    most ~1/5 of a step's rows above 32."""
    if max_bs < 1:
        raise ValueError(f"max_bs must be positive, got {max_bs}")
    sizes = [1, 2, 4, 8, *range(16, 33, 8), *range(48, 129, 16), *range(160, 513, 32), *range(576, max_bs + 1, 64)]
    return tuple(sorted({s for s in sizes if s <= max_bs} | {max_bs}))


def bucket_for(batch_size: int, sizes: Sequence[int]) -> int | None:
    """The smallest captured size >= batch_size (None when the batch is larger than all).
    `sizes` must be sorted ascending."""
    if batch_size < 1:
        return None
    i = bisect.bisect_left(sizes, batch_size)
    return sizes[i] if i < len(sizes) else None


def group_cap(num_heads: int, num_kv_heads: int) -> int:
    """Requests per cascade group in graphs: as many as one 64-row prefix tile holds (each
    request brings num_heads / num_kv_heads query rows per KV head)."""
    return max(1, 64 // max(1, num_heads // num_kv_heads))


def split_groups(groups: Sequence[tuple[int, int, int]], cap: int) -> list[tuple[int, int, int]]:
    """Cut (start, end, prefix_pages) groups into chunks of at most `cap` rows, in order.
    Groups without a prefix become one chunk per row (each row is then its own group)."""
    out: list[tuple[int, int, int]] = []
    for start, end, pages in groups:
        step = cap if pages > 0 else 1
        for s in range(start, end, step):
            out.append((s, min(s + step, end), pages))
    return out


@dataclass(frozen=True)
class DecodeRows:
    """A decode batch on the host, in the order its rows run.

    Row i adds token `token_ids[i]` at position `seq_lens[i] - 1`; `pages[i]` lists the pool
    pages of the whole sequence (at least ceil(seq_lens[i] / page_size); extra ones ignored).
    """

    token_ids: Sequence[int]
    seq_lens: Sequence[int]
    pages: Sequence[Sequence[int]]

    def __len__(self) -> int:
        return len(self.seq_lens)


@dataclass(frozen=True)
class HostDecodeInputs:
    """The host side of one replay (or burst of `steps` replays): what is copied into the
    static buffers.

    `i64` [4 + steps, max_bs] (the first rows of the static buffer) and `i32` [4 * max_bs + 1]
    are whole rows (columns past the bucket are zero and unread); the page tables cover only
    the rows and columns in use:
    `page_table` [bs, w] (plain) or `prefix_table` [groups, wp] and `suffix_table` [bs, ws]
    (cascade). `num_carry` rows of carry dst/src are valid.
    """

    bucket: int
    batch_size: int
    i64: np.ndarray
    i32: np.ndarray
    page_table: np.ndarray | None
    prefix_table: np.ndarray | None
    suffix_table: np.ndarray | None
    num_carry: int
    steps: int = 1

    @property
    def cascade(self) -> bool:
        return self.prefix_table is not None


def build_host_inputs(
    rows: DecodeRows,
    groups: Sequence[tuple[int, int, int]] | None,
    bucket: int,
    max_bs: int,
    page_size: int,
    dummy_slot: int,
    carry: Sequence[tuple[int, int]] = (),
    steps: int = 1,
) -> HostDecodeInputs:
    """Pad one decode batch to `bucket` rows (see the module docstring for the padding rules).

    `groups` (cascade graphs only) are (start, end, prefix_pages) over rows, contiguous,
    covering every row, already cut to the graph's group cap (`split_groups`). `carry` lists
    (row, source token row of the previous step). `steps` > 1: a burst; each row's `pages`
    must then hold its next `steps - 1` tokens too. Pure: reads only its arguments.
    """
    bs = len(rows)
    if not 1 <= bs <= bucket <= max_bs:
        raise ValueError(f"build_host_inputs: need 1 <= batch {bs} <= bucket {bucket} <= max_bs {max_bs}")
    if steps < 1:
        raise ValueError(f"build_host_inputs: steps must be positive, got {steps}")
    seq_lens = np.fromiter(rows.seq_lens, dtype=np.int64, count=bs)
    if (seq_lens < 1).any():
        raise ValueError("build_host_inputs: every decode row needs seq_len >= 1")
    need = -(-(seq_lens + steps - 1) // page_size)  # pages up to the burst's last token
    positions = seq_lens - 1

    i64 = np.zeros((4 + steps, max_bs), dtype=np.int64)
    i64[_IDS, :bs] = rows.token_ids
    i64[_POS, :bs] = positions
    for k, (dst, src) in enumerate(carry):
        i64[_CARRY_DST, k] = dst
        i64[_CARRY_SRC, k] = src

    i32 = np.zeros(4 * max_bs + 1, dtype=np.int32)
    seq_view, prefix_view, suffix_view = (i32[j * max_bs : (j + 1) * max_bs] for j in range(3))
    cu_view = i32[3 * max_bs :]
    seq_view[:bs] = seq_lens
    page_table = prefix_table = suffix_table = None
    if groups is None:
        page_table = fill_rows(rows.pages, need, int(need.max()))
        shared = np.zeros(bs, dtype=np.int64)
    else:
        if len(groups) > bucket:
            raise ValueError(f"build_host_inputs: {len(groups)} groups do not fit {bucket} group slots")
        shared = np.zeros(bs, dtype=np.int64)
        heads: list[Sequence[int]] = []
        prefix_pages = np.zeros(len(groups), dtype=np.int64)
        expected_start = 0
        for g, (start, end, pages) in enumerate(groups):
            if start != expected_start or end <= start:
                raise ValueError(f"build_host_inputs: groups must cover the rows in order, got {list(groups)}")
            expected_start = end
            shared[start:end] = pages
            prefix_pages[g] = pages
            heads.append(rows.pages[start])
            cu_view[g] = start
            prefix_view[g] = pages * page_size
        if expected_start != bs:
            raise ValueError(f"build_host_inputs: groups cover {expected_start} of {bs} rows")
        # Padding rows: groups of one without a prefix (there are enough slots: at most bs
        # groups hold the real rows); the slots after them are empty.
        n = len(groups)
        cu_view[n : n + bucket - bs] = np.arange(bs, bucket)
        cu_view[n + bucket - bs :] = bucket
        suffix_view[:bs] = seq_lens - shared * page_size
        if (suffix_view[:bs] < 1).any():
            raise ValueError("build_host_inputs: every row keeps at least its new token in its suffix")
        prefix_table = fill_rows(heads, prefix_pages, int(prefix_pages.max()))
        suffix_table = fill_rows([p[s:] for p, s in zip(rows.pages, shared.tolist())], need - shared,
                                 int((need - shared).max()))
    # Where each step writes its token's K/V: slot = page * P + offset, the page read from the
    # row's own table (its suffix table past the shared pages in cascade batches).
    own_table = page_table if groups is None else suffix_table
    row_idx = np.arange(bs)
    for k in range(steps):
        pos = positions + k
        row = _SLOTS if k == 0 else _NEXT_SLOTS + k - 1
        pages = own_table[row_idx, pos // page_size - shared].astype(np.int64)
        i64[row, :bs] = pages * page_size + pos % page_size
        i64[row, bs:bucket] = dummy_slot
    return HostDecodeInputs(bucket, bs, i64, i32, page_table, prefix_table, suffix_table, len(carry), steps)


@dataclass
class _Burst:
    """The burst the last `run` started: its graph, real rows, and steps run after the first."""

    bucket: int
    batch_size: int
    cascade: bool
    steps: int
    done: int = 0


class DecodeGraphs:
    """Static buffers and one captured graph per (bucket, cascade) for decode batches.

    Not thread-safe: only the engine thread replays. `run` returns the logits rows of the real
    batch, a view valid until the next `run` (see the module docstring). `model` is called as
    `model(batch, kv_cache, logits_out=None)`: captures after the first pass `logits_out`, rows
    of the shared buffer its logits must be written into (and returned).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        *,
        max_bs: int,
        max_model_len: int,
        dummy_page: int,
        num_heads: int,
        num_kv_heads: int,
        cascade: bool = True,
        use_graphs: bool | None = None,
        sizes: Sequence[int] | None = None,
        max_steps: int = 1,
    ) -> None:
        """`max_steps`: the longest decode burst `run` will be asked for."""
        if max_steps < 1:
            raise ValueError(f"max_steps must be positive, got {max_steps}")
        if not 0 <= dummy_page < kv_cache.num_pages:
            raise ValueError(f"dummy_page {dummy_page} is not a page of the pool ({kv_cache.num_pages} pages)")
        self.model = model
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        self.page_size = kv_cache.page_size
        self.max_model_len = max_model_len
        self.sizes = tuple(sorted(sizes)) if sizes is not None else capture_batch_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        self.dummy_slot = dummy_page * self.page_size
        self.group_cap = group_cap(num_heads, num_kv_heads)
        self.cascade = cascade
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.max_pages = -(-max_model_len // self.page_size)
        self.max_steps = max_steps
        dev, m = self.device, self.max_bs
        self.i64 = torch.zeros(4 + max_steps, m, dtype=torch.int64, device=dev)
        self.i64[_SLOTS].fill_(self.dummy_slot)
        self.i32 = torch.zeros(4 * m + 1, dtype=torch.int32, device=dev)
        self.page_table = torch.zeros(m, self.max_pages, dtype=torch.int32, device=dev)
        self.prefix_table = torch.zeros(m, self.max_pages, dtype=torch.int32, device=dev) if cascade else None
        self.suffix_table = torch.zeros(m, self.max_pages, dtype=torch.int32, device=dev) if cascade else None
        self._ones = torch.ones(m, dtype=torch.int32, device=dev)
        self._cu_extend = torch.arange(m + 1, dtype=torch.int32, device=dev)
        self._rows = torch.arange(m, dtype=torch.int64, device=dev)
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        # Every graph writes its logits into the first `bucket` rows of one buffer (the largest
        # graph's output): one [max_bs, vocab] fp32 for all captures instead of one each (~10.6
        # GB for the 66 graphs of llama-1b at max_bs 1024). Replays consume them in stream order.
        self._logits: torch.Tensor | None = None
        self._pool = None
        self.replays = 0
        self.capture_s = 0.0  # how long `capture` took (compiles included)
        self._burst: _Burst | None = None  # the burst `next_step` continues

    # ------------------------------------------------------------------ static batches
    def forward_batch(self, bucket: int, cascade: bool) -> ForwardBatch:
        """The ForwardBatch of views into the static buffers that graph (bucket, cascade) runs."""
        m, b = self.max_bs, bucket
        info = None
        if cascade:
            info = CascadeInfo(
                prefix_page_table=self.prefix_table[:b],
                prefix_lens=self.i32[m : m + b],
                cu_groups=self.i32[3 * m : 3 * m + b + 1],
                suffix_page_table=self.suffix_table[:b],
                suffix_lens=self.i32[2 * m : 2 * m + b],
                max_prefix_len=self.max_model_len,
                max_suffix_len=self.max_model_len,
                max_group_size=min(self.group_cap, b),
            )
        return ForwardBatch(
            input_ids=self.i64[_IDS, :b],
            positions=self.i64[_POS, :b],
            out_slots=self.i64[_SLOTS, :b],
            page_table=self.page_table[:b],
            seq_lens=self.i32[:b],
            extend_lens=self._ones[:b],
            cu_extend=self._cu_extend[: b + 1],
            logits_indices=self._rows[:b],
            seq_lens_cpu=(0,) * b,
            extend_lens_cpu=(1,) * b,
            page_size=self.page_size,
            cascade=info,
            seq_len_bound=self.max_model_len,
        )

    # ------------------------------------------------------------------ capture
    def capture(self) -> None:
        """Capture every (bucket, cascade) graph, largest first so the smaller ones reuse the
        pool's memory. A no-op without CUDA graphs. The static buffers hold padding (seq_len 0,
        dummy slot, empty groups) while capturing, so the warm-up runs touch only the dummy page."""
        if not self.use_graphs:
            return
        t0 = time.perf_counter()
        self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        kinds = (False, True) if self.cascade else (False,)
        with torch.inference_mode():
            for bucket in reversed(self.sizes):
                for cascade in kinds:
                    batch = self.forward_batch(bucket, cascade)
                    shared = None if self._logits is None else self._logits[:bucket]
                    graph, out = capture_graph(lambda: self.model(batch, self.kv_cache, logits_out=shared),
                                               self._pool, stream)
                    if self._logits is None:
                        self._logits = out
                    self._graphs[(bucket, cascade)] = graph
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - t0
        logger.info("captured %d decode CUDA graphs (batch sizes %s) in %.1f s", len(self._graphs),
                    ",".join(map(str, self.sizes)), self.capture_s)

    # ------------------------------------------------------------------ replay
    def bucket(self, batch_size: int) -> int | None:
        return bucket_for(batch_size, self.sizes)

    def run(
        self,
        rows: DecodeRows,
        groups: Sequence[tuple[int, int, int]] | None,
        carry: Sequence[tuple[int, int]] = (),
        carry_tokens: torch.Tensor | None = None,
        steps: int = 1,
    ) -> torch.Tensor:
        """Logits [len(rows), vocab] fp32 of one decode batch (rows in run order).

        `groups` is the cascade plan's groups over the rows (None: plain decode); `carry` lists
        (row, index into `carry_tokens`) for rows whose input token is still on the device.
        `steps` > 1 starts a burst: `next_step` then runs its steps 2 .. `steps`.
        """
        bucket = self.bucket(len(rows))
        if bucket is None:
            raise ValueError(f"decode batch of {len(rows)} exceeds the largest graph ({self.max_bs})")
        if not 1 <= steps <= self.max_steps:
            raise ValueError(f"a burst of {steps} steps exceeds max_steps {self.max_steps}")
        cascade = groups is not None
        if cascade and not self.cascade:
            raise ValueError("cascade graphs were not captured")
        if cascade:
            groups = split_groups(groups, self.group_cap)
        host = build_host_inputs(rows, groups, bucket, self.max_bs, self.page_size, self.dummy_slot, carry, steps)
        self._upload(host)
        if host.num_carry:
            if carry_tokens is None:
                raise ValueError("carry rows given without carry_tokens")
            n = host.num_carry
            ids = self.i64[_IDS]
            ids.index_copy_(0, self.i64[_CARRY_DST, :n], carry_tokens.index_select(0, self.i64[_CARRY_SRC, :n]))
        self._burst = _Burst(bucket, len(rows), cascade, steps)
        return self._replay(bucket, cascade)[: len(rows)]

    def next_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """The next step of the burst `run` started: every real row adds `tokens[row]` (the
        token the step before sampled for it, on the device). Logits as `run` returns them."""
        burst = self._burst
        if burst is None or burst.done + 1 > burst.steps - 1:
            raise RuntimeError("next_step: no burst step left (run(..., steps=k) starts one)")
        burst.done += 1
        m, b, bs = self.max_bs, burst.bucket, burst.batch_size
        if tokens.shape != (bs,):
            raise ValueError(f"next_step: expected {bs} tokens, got shape {tuple(tokens.shape)}")
        self.i64[_IDS, :bs].copy_(tokens)
        self.i64[_POS, :bs] += 1
        self.i64[_SLOTS, :b].copy_(self.i64[_NEXT_SLOTS + burst.done - 1, :b])
        self.i32[:bs] += 1  # seq_lens
        if burst.cascade:
            self.i32[2 * m : 2 * m + bs] += 1  # suffix_lens
        return self._replay(b, burst.cascade)[:bs]

    def _replay(self, bucket: int, cascade: bool) -> torch.Tensor:
        key = (bucket, cascade)
        self.replays += 1
        if self.use_graphs:
            if key not in self._graphs:
                raise RuntimeError(f"no graph captured for batch size {bucket} (cascade={cascade})")
            self._graphs[key].replay()
            assert self._logits is not None  # set by the first capture
            return self._logits[:bucket]
        return self.model(self.forward_batch(bucket, cascade), self.kv_cache)

    def _upload(self, host: HostDecodeInputs) -> None:
        copy = copier(self.device)
        copy(self.i64[: host.i64.shape[0]], host.i64)
        copy(self.i32, host.i32)
        if host.page_table is not None:
            pairs = [(self.page_table, host.page_table)]
        else:
            pairs = [(self.prefix_table, host.prefix_table), (self.suffix_table, host.suffix_table)]
        for dst, src in pairs:
            if src.shape[1] > self.max_pages:
                raise ValueError(f"a page table row of {src.shape[1]} pages exceeds max_model_len "
                                 f"({self.max_pages} pages)")
            copy(dst[: src.shape[0], : src.shape[1]], src)


def capture_graph(fn: Callable[[], torch.Tensor], pool: object,
                  stream: torch.cuda.Stream) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """(graph, output) of `fn` captured on `stream` into memory `pool`, after one run of `fn`
    on that stream outside the capture: Triton compiles each kernel specialization on its first
    call, which a capture must not contain."""
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        fn()
    current.wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        out = fn()
    return graph, out


def copier(device: torch.device):  # noqa: ANN202 - a small closure
    """copy(dst_view, numpy array): pinned non-blocking on CUDA, a plain copy on the CPU."""
    if device.type == "cuda":

        def copy(dst: torch.Tensor, src: np.ndarray) -> None:
            dst.copy_(torch.from_numpy(src).pin_memory(), non_blocking=True)

    else:

        def copy(dst: torch.Tensor, src: np.ndarray) -> None:
            dst.copy_(torch.from_numpy(src))

    return copy
