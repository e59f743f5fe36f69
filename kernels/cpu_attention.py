"""Paged attention on the CPU (the "cpu" ops backend): decode, shared-prefix decode, extend.

Same contracts as the references in decode_attention.py, shared_prefix_attention.py and
extend_attention.py, same results up to fp32 rounding. At serving sizes the cost of attention
on a CPU is not its arithmetic but its number of ops: every op pays Python dispatch and a
thread barrier, tens of microseconds on two shared cores, and a step runs each op once per
layer. So the op count per layer here is small and does not grow with the batch:

1. One plan per step. Every layer of a step passes the same page tables. What follows from
   them alone (which key runs are contiguous pages, gather indices, masks) is a plan built at
   the first layer and reused by the others (`_PlanMemo`, keyed by the index tensors'
   contents, so a reused plan is never stale).
2. Keys split into a shared run and own runs:

       request i:  [ shared run: S tokens | own run: seq_i - S tokens ]   (new tokens: its last e_i)

   Requests whose page tables start with the same cached pages (a system prompt, a document,
   a conversation's history) read that run once, together: one flash call whose rows are all
   their new tokens, over the pages read in place. Each own run is short (a question, the
   tokens generated so far) and gathered; requests with the same number of new tokens go in
   one padded call. The two partial softmaxes are merged by their logsumexp.
3. One fused kernel per part: PyTorch's CPU flash attention, which also returns the
   logsumexp the merge needs.

Measured on the 2-core CI machine, one layer of gsp-cpu with SmolLM2-135M (the same inputs
captured from an engine run, min of 9-30, against the per-request version this replaced):

    batch-32 cascade decode (4 groups of 8, 512-token prefixes)      1.8-2.8 -> 0.9-1.5 ms
    prefill of 21 questions over cached prefixes + 4 other rows     18-23 -> 13-14 ms
    mixed step: 25 decode rows + 7 questions, no cascade plan       14-17 -> 4-5 ms
    4 fresh 416-544-token prompts                                   unchanged, 23 ms

These functions read the (small) index tensors on the host, which is free on the CPU and is
why they are CPU-only: CUDA uses the Triton kernels.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .decode_attention import _validate as _validate_decode
from .extend_attention import _REFERENCE_Q_CHUNK
from .extend_attention import _validate as _validate_extend
from .shared_prefix_attention import _validate as _validate_shared

__all__ = [
    "HAS_CPU_FLASH",
    "paged_tokens",
    "decode_attention_cpu",
    "shared_prefix_decode_attention_cpu",
    "extend_attention_cpu",
]

# The fused kernel is a private aten op (present since torch 2.3, used by SDPA on the CPU).
HAS_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")

_NEG_INF = float("-inf")
# Requests padded into one call hold n * e * L mask values; past this many, a request goes
# alone (its rows in chunks), so a long prompt never builds a quadratic mask.
_MAX_MASK_ELEMENTS = 1 << 22
# Requests with more new tokens than this go alone even when they could be padded together: a
# call's fixed cost is small next to their work, and alone their keys are read in place
# (measured: 3 x 544-token prompts 23-24 ms per layer padded, 20-21 ms alone).
_MAX_BUCKET_NEW_TOKENS = 256
# Shared runs are gathered into one block only up to this many keys in all (a copy per layer).
_MAX_STACKED_KEYS = 1 << 14


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, *, causal: bool = False,
           mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [N, Hq, M, D], lse [N, Hq, M] natural log) of q [N, Hq, M, D] over k, v [N, Hkv, L, D].

    PyTorch's fused CPU flash attention: GQA (query head h reads KV head h // (Hq // Hkv)),
    strided inputs, `causal` aligned top-left, an additive fp32 `mask` broadcast to
    [N, Hq, M, L]. A row that sees no key gets o = 0 and lse = 0 (not -inf): the plans below
    never produce such rows except for empty sequences, which they fix afterwards.
    """
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=mask, scale=float(sm_scale))


def _host_ints(t: torch.Tensor) -> np.ndarray:
    """A CPU index tensor as a numpy array without a copy (the ops are CPU-only)."""
    if t.device.type != "cpu":
        raise ValueError(f"the cpu ops backend needs CPU tensors, got a tensor on {t.device}")
    return t.numpy()


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """[L, H, D] -> [1, H, L, D] fp32 view (a copy only for other dtypes), the layout `_flash` takes."""
    return t.float().transpose(0, 1).unsqueeze(0)


def _index(values: np.ndarray | list[int]) -> torch.Tensor:
    return torch.from_numpy(np.asarray(values, dtype=np.int64))


def _additive_mask(hidden: np.ndarray) -> torch.Tensor:
    """fp32 mask for `_flash`: -inf where `hidden`, 0 elsewhere."""
    return torch.from_numpy(np.where(hidden, np.float32(_NEG_INF), np.float32(0.0)))


def _gathered_heads_first(cache: torch.Tensor, pages: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """[n, Hkv, length, D] fp32: n blocks of equally many whole pages (`pages` row-major), each
    cut to `length` keys; one gather for all blocks."""
    _, _, hkv, d = cache.shape
    return cache.index_select(0, pages).view(n, -1, hkv, d)[:, :length].transpose(1, 2).float()


@dataclass(frozen=True)
class _Run:
    """Tokens [0, length) of a paged sequence: a view of the cache when its pages are one
    ascending run (how the allocator hands out a prompt's pages), else a gather of whole pages.

        pages [7, 8, 9] -> cache[7:10].view(3 * P, Hkv, D)[:length]       (view)
        pages [7, 2, 9] -> cache[[7, 2, 9]].view(3 * P, Hkv, D)[:length]  (copy)
    """

    length: int
    first_page: int
    pages: torch.Tensor | None  # int64 page ids to gather; None for the view

    @staticmethod
    def of(pages: np.ndarray, length: int, page_size: int) -> "_Run":
        n = -(-length // page_size)
        row = pages[:n]
        if n == 0:
            return _Run(0, 0, None)
        if int(row[-1]) - int(row[0]) == n - 1 and (n == 1 or bool((np.diff(row) == 1).all())):
            return _Run(length, int(row[0]), None)
        return _Run(length, -1, _index(row))

    def page_ids(self, page_size: int) -> np.ndarray:
        """The pages holding the run, in order."""
        if self.pages is not None:
            return self.pages.numpy()
        return np.arange(self.first_page, self.first_page + -(-self.length // page_size))

    def heads_first(self, cache: torch.Tensor) -> torch.Tensor:
        """`read` as [1, Hkv, length, D] fp32, the layout `_flash` takes (one call for a view:
        these reads run for every group of every layer, and each Python-level op costs)."""
        if self.pages is not None or cache.dtype != torch.float32 or not cache.is_contiguous():
            return _heads_first(self.read(cache))
        _, page_size, hkv, d = cache.shape
        return cache.as_strided((1, hkv, self.length, d), (self.length * hkv * d, d, hkv * d, 1),
                                cache.storage_offset() + self.first_page * page_size * hkv * d)

    def read(self, cache: torch.Tensor) -> torch.Tensor:
        """[length, Hkv, D] of `cache` [num_pages, P, Hkv, D]."""
        _, page_size, hkv, d = cache.shape
        n = -(-self.length // page_size)
        if self.pages is None:
            block = cache[self.first_page : self.first_page + n]
        else:
            block = cache.index_select(0, self.pages)
        return block.view(n * page_size, hkv, d)[: self.length]


def paged_tokens(cache: torch.Tensor, pages: np.ndarray, num_tokens: int) -> torch.Tensor:
    """[num_tokens, Hkv, D]: the first tokens of a paged sequence whose page row is `pages`
    (a view of `cache` when those pages are one ascending run, else a copy; see `_Run`)."""
    return _Run.of(pages, num_tokens, cache.shape[1]).read(cache)


Rows = slice | torch.Tensor  # rows of q: a contiguous range, or int64 indices


def _rows(ids: np.ndarray, num_rows: int) -> Rows:
    """Row ids as `Rows`: slice(None) for every row in order, a slice for a contiguous
    ascending run, else an index tensor."""
    if len(ids) and ids[-1] - ids[0] == len(ids) - 1 and (len(ids) == 1 or bool((np.diff(ids) == 1).all())):
        return slice(None) if len(ids) == num_rows else slice(int(ids[0]), int(ids[-1]) + 1)
    return _index(ids)


def _range_ids(ranges: list[tuple[int, int]]) -> np.ndarray:
    return np.concatenate([np.arange(s, e) for s, e in ranges])


def _all_rows(rows: Rows) -> bool:
    return isinstance(rows, slice) and rows == slice(None)


def _rows_heads_first(q: torch.Tensor, rows: Rows) -> torch.Tensor:
    """q's rows as [1, Hq, R, D] fp32: one strided view for a slice of fp32 rows (this runs for
    every group of every layer, and each Python-level op costs), else a copy."""
    if not isinstance(rows, slice) or q.dtype != torch.float32:
        return _heads_first(_take(q, rows))
    start, stop, _ = rows.indices(q.shape[0])
    _, hq, d = q.shape
    return q.as_strided((1, hq, stop - start, d), ((stop - start) * q.stride(0), q.stride(1), q.stride(0), q.stride(2)),
                        q.storage_offset() + start * q.stride(0))


def _take(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _put(dst: torch.Tensor, rows: Rows, src: torch.Tensor) -> None:
    if isinstance(rows, slice):
        dst[rows] = src
    else:
        dst.index_copy_(0, rows, src)


@dataclass(frozen=True)
class _Shared:
    """The new-token rows of a group of requests and the key run all of them see whole."""

    rows: Rows
    keys: _Run


@dataclass(frozen=True)
class _Bucket:
    """The own runs of n requests with e new tokens each, as one padded call.

    Query rows `rows` (request j's new token t at j * e + t); keys gathered from `pages`
    (n_pages per request, padded) up to `length`; `mask` [n, 1, e, length] additive lets
    token t of request j see its own keys 0 .. past_j + t (bottom-right causal), or is None
    when every request's own run is exactly its new tokens (plain causal). `empty` marks
    requests with no key at all (decode rows of an empty sequence): o = 0, lse = -inf.
    """

    rows: Rows
    e: int
    pages: torch.Tensor
    length: int
    mask: torch.Tensor | None
    empty: torch.Tensor | None


@dataclass(frozen=True)
class _Single:
    """A request that goes alone (no other with its number of new tokens, many new tokens, or
    too large a padded mask): rows start .. start + e over its own run, read in place where
    its pages allow, the first `past` keys of which precede its first new token; row chunks
    bound the mask."""

    start: int
    e: int
    keys: _Run
    past: int


@dataclass(frozen=True)
class _Stacked:
    """Every shared part as one padded call: group g's rows padded to `rows_per` query slots,
    its run gathered into block g of `length` keys. Measured on a batch-32 gsp decode step:
    one gather + one call beats four in-place calls (8-15 ms of ~165 per step), because the
    gathered block is read from cache while a view of pages last touched a step ago is not.

        q_rows [G * rows_per]  row of q in each slot (padding repeats a real row)
        pages  [G * n_pages]   each group's run, padded with its first page
        mask   [G, 1, 1, length] or None: hides keys past group g's run
        slots  [R]             the slot of each real row, in `dest` order
    """

    groups: int
    q_rows: torch.Tensor
    pages: torch.Tensor
    length: int
    mask: torch.Tensor | None
    slots: torch.Tensor
    dest: Rows


def _row_ids(rows: Rows, num_rows: int) -> np.ndarray:
    if isinstance(rows, slice):
        return np.arange(*rows.indices(num_rows))
    return rows.numpy()


def _stack(shared: tuple[_Shared, ...], num_rows: int, page_size: int) -> _Stacked | None:
    """`shared` as one `_Stacked` call, or None where padding would cost more than it saves
    (one group, very unequal groups, or more gathered keys than `_MAX_STACKED_KEYS`)."""
    if len(shared) < 2:
        return None
    rows = [_row_ids(p.rows, num_rows) for p in shared]
    rows_per = max(len(r) for r in rows)
    length = max(p.keys.length for p in shared)
    useful = sum(len(r) * p.keys.length for r, p in zip(rows, shared))
    if len(shared) * length > _MAX_STACKED_KEYS or 2 * useful < len(shared) * rows_per * length:
        return None
    n_pages = -(-length // page_size)
    q_rows = np.empty((len(shared), rows_per), dtype=np.int64)
    pages = np.empty((len(shared), n_pages), dtype=np.int64)
    for g, (r, part) in enumerate(zip(rows, shared)):
        q_rows[g, : len(r)] = r
        q_rows[g, len(r):] = r[0]
        own = part.keys.page_ids(page_size)
        pages[g, : len(own)] = own
        pages[g, len(own):] = own[0]
    lens = np.array([p.keys.length for p in shared])
    mask = None
    if (lens != length).any():
        hidden = np.arange(length)[None, :] >= lens[:, None]
        mask = _additive_mask(hidden)[:, None, None, :]
    slots = np.concatenate([g * rows_per + np.arange(len(r)) for g, r in enumerate(rows)])
    dest_ids = np.concatenate(rows)
    order = np.argsort(dest_ids, kind="stable")
    return _Stacked(len(shared), _index(q_rows.reshape(-1)), _index(pages.reshape(-1)), length, mask,
                    _index(slots[order]), _rows(dest_ids[order], num_rows))


@dataclass(frozen=True)
class _Plan:
    """How one step's attention is computed, for every layer of the step."""

    num_rows: int
    shared: tuple[_Shared, ...]
    buckets: tuple[_Bucket, ...]
    singles: tuple[_Single, ...]
    no_keys: torch.Tensor | None  # rows that see no key at all: output 0
    stacked: _Stacked | None = None  # the shared parts as one call, when that pays


@dataclass(frozen=True)
class _Own:
    """One request's own part: rows start .. start + e over `length` keys from `pages`."""

    start: int
    e: int
    pages: np.ndarray
    length: int


def _plan_own(owns: list[_Own], page_size: int, num_rows: int) -> tuple[tuple[_Bucket, ...], tuple[_Single, ...]]:
    """Group own parts by their number of new tokens into padded buckets (or singles)."""
    by_e: dict[int, list[_Own]] = defaultdict(list)
    for own in owns:
        by_e[own.e].append(own)
    buckets, singles = [], []
    for e, group in by_e.items():
        length = max(o.length for o in group)
        if e > 1 and (len(group) == 1 or e > _MAX_BUCKET_NEW_TOKENS
                      or len(group) * e * length > _MAX_MASK_ELEMENTS):
            singles += [_Single(o.start, o.e, _Run.of(o.pages, o.length, page_size), o.length - o.e)
                        for o in group]
            continue
        buckets.append(_bucket(group, e, length, page_size, num_rows))
    return tuple(buckets), tuple(singles)


def _bucket(group: list[_Own], e: int, length: int, page_size: int, num_rows: int) -> _Bucket:
    length = max(length, 1)  # all sequences empty: each still sees (masked-in) key 0
    n_pages = -(-length // page_size)
    pages = np.zeros((len(group), n_pages), dtype=np.int64)
    for j, own in enumerate(group):
        row = own.pages[:n_pages]
        pages[j, : len(row)] = row
    lens = np.array([o.length for o in group], dtype=np.int64)
    empty = lens == 0
    rows = _rows(_range_ids([(o.start, o.start + e) for o in group]), num_rows)
    plain_causal = e > 1 and bool((lens == e).all())
    mask = None
    if not plain_causal:
        # Token t of request j sees keys k <= past_j + t; an empty sequence sees key 0 (so the
        # kernel is well defined) and is zeroed afterwards.
        last = np.maximum(lens - e, 0)[:, None] + np.arange(e)[None, :]  # [n, e]
        hidden = np.arange(length)[None, None, :] > last[:, :, None]
        mask = _additive_mask(hidden)[:, None]
    return _Bucket(rows, e, _index(pages.reshape(-1)), length, mask,
                   torch.from_numpy(empty) if empty.any() else None)


def _decode_plan(page_table: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int, page_size: int) -> _Plan:
    """Every row one query over its first seq_lens keys (capped at max_seq_len): one bucket."""
    table = _host_ints(page_table)
    b = table.shape[0]
    lens = np.minimum(_host_ints(seq_lens).astype(np.int64), min(max_seq_len, table.shape[1] * page_size))
    owns = [_Own(i, 1, table[i], int(lens[i])) for i in range(b)]
    buckets, _ = _plan_own(owns, page_size, b)
    no_keys = _index(np.flatnonzero(lens == 0)) if (lens == 0).any() else None
    return _Plan(b, (), buckets, (), no_keys)


def _shared_prefix_plan(prefix_page_table: torch.Tensor, prefix_lens: torch.Tensor, cu_groups: torch.Tensor,
                        suffix_page_table: torch.Tensor, suffix_lens: torch.Tensor, max_suffix_len: int,
                        page_size: int) -> _Plan:
    """The groups' prefixes as shared runs (rows cu_groups[g] .. cu_groups[g+1]), the suffixes
    as one bucket of single queries."""
    own = _decode_plan(suffix_page_table, suffix_lens, max_suffix_len, page_size)
    cu = _host_ints(cu_groups).tolist()
    prefix_pt = _host_ints(prefix_page_table)
    plens = _host_ints(prefix_lens).tolist()
    shared = tuple(_Shared(slice(cu[g], cu[g + 1]), _Run.of(prefix_pt[g], length, page_size))
                   for g, length in enumerate(plens) if length > 0 and cu[g + 1] > cu[g])
    no_keys = own.no_keys
    if no_keys is not None and shared:
        has_prefix = np.zeros(own.num_rows, dtype=bool)
        for g, length in enumerate(plens):
            has_prefix[cu[g] : cu[g + 1]] = length > 0
        left = [int(r) for r in no_keys.tolist() if not has_prefix[r]]
        no_keys = _index(left) if left else None
    return _Plan(own.num_rows, shared, own.buckets, (), no_keys, _stack(shared, own.num_rows, page_size))


def _extend_plan(page_table: torch.Tensor, seq_lens: torch.Tensor, extend_lens: torch.Tensor,
                 cu_extend: torch.Tensor, num_rows: int, page_size: int) -> _Plan:
    """Shared runs: requests whose whole cached pages start alike, grouped by first page, share
    the longest run of pages common to all of them (a group of one reads its own cached
    pages in place). Own runs: the rest, bucketed by number of new tokens."""
    table = _host_ints(page_table)
    seq, ext, starts = (_host_ints(t).tolist() for t in (seq_lens, extend_lens, cu_extend))
    by_first: dict[int, list[int]] = defaultdict(list)
    for i, (length, e) in enumerate(zip(seq, ext)):
        if e == 0:
            continue
        if not 0 < e <= length:
            raise ValueError(f"extend_attention: request {i} has extend_len {e} and seq_len {length}")
        if (length - e) >= page_size:
            by_first[int(table[i, 0])].append(i)
    shared_len = [0] * len(seq)
    shared: list[_Shared] = []
    for members in by_first.values():
        max_pages = min((seq[i] - ext[i]) // page_size for i in members)
        block = table[members, :max_pages]
        same = (block == block[0]).all(axis=0)
        k = max_pages if same.all() else int(np.argmin(same))
        for i in members:
            shared_len[i] = k * page_size
        shared.append(_Shared(_rows(_range_ids([(starts[i], starts[i] + ext[i]) for i in members]), num_rows),
                              _Run.of(table[members[0]], k * page_size, page_size)))
    owns = [_Own(starts[i], ext[i], table[i, shared_len[i] // page_size :], seq[i] - shared_len[i])
            for i in range(len(seq)) if ext[i] > 0]
    buckets, singles = _plan_own(owns, page_size, num_rows)
    return _Plan(num_rows, tuple(shared), buckets, singles, None, _stack(tuple(shared), num_rows, page_size))


class _PlanMemo:
    """The last plan a builder made and the inputs it came from: the layers after a step's first
    get it back without rebuilding. Inputs are compared by content, never by identity."""

    def __init__(self, build: Callable[..., _Plan]) -> None:
        self._build = build
        self._last: tuple[tuple[torch.Tensor, ...], tuple[int, ...], _Plan] | None = None
        self._lock = threading.Lock()

    def get(self, tensors: tuple[torch.Tensor, ...], ints: tuple[int, ...]) -> _Plan:
        last = self._last  # one read: another engine thread may replace it meanwhile
        if last is not None and last[1] == ints and all(
                a.shape == b.shape and torch.equal(a, b) for a, b in zip(last[0], tensors)):
            return last[2]
        plan = self._build(*tensors, *ints)
        with self._lock:
            self._last = (tuple(t.clone() for t in tensors), ints, plan)
        return plan


_decode_plans = _PlanMemo(_decode_plan)
_shared_prefix_plans = _PlanMemo(_shared_prefix_plan)
_extend_plans = _PlanMemo(_extend_plan)


def _bucket_part(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, b: _Bucket,
                 sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (o [n * e, Hq, D], lse [n * e, Hq]) of a bucket's rows over their own runs."""
    _, _, hkv, d = k_cache.shape
    hq = q.shape[1]
    qb = _take(q, b.rows).float()
    n = qb.shape[0] // b.e
    k = _gathered_heads_first(k_cache, b.pages, n, b.length)
    v = _gathered_heads_first(v_cache, b.pages, n, b.length)
    if b.e == 1:
        # A KV head's Hq / Hkv query heads as the rows of one tile: a view, and faster.
        o, lse = _flash(qb.view(n, hkv, hq // hkv, d), k, v, sm_scale, mask=b.mask)
        o, lse = o.reshape(n, hq, d), lse.reshape(n, hq)
    else:
        qh = qb.view(n, b.e, hq, d).transpose(1, 2)
        o, lse = _flash(qh, k, v, sm_scale, causal=b.mask is None, mask=b.mask)
        o, lse = o.transpose(1, 2).reshape(n * b.e, hq, d), lse.transpose(1, 2).reshape(n * b.e, hq)
    if b.empty is not None:
        rows = b.empty.repeat_interleave(b.e)
        o = o.masked_fill(rows[:, None, None], 0.0)
        lse = lse.masked_fill(rows[:, None], _NEG_INF)
    return o, lse


def _single_part(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, s: _Single,
                 sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (o [e, Hq, D], lse [e, Hq]) of one request's rows over its own run."""
    qh = _heads_first(q[s.start : s.start + s.e])
    kh, vh = s.keys.heads_first(k_cache), s.keys.heads_first(v_cache)
    if s.past == 0:
        o, lse = _flash(qh, kh, vh, sm_scale, causal=True)
        return o[0].transpose(0, 1), lse[0].transpose(0, 1)
    outs, lses = [], []
    for lo in range(0, s.e, _REFERENCE_Q_CHUNK):
        hi = min(s.e, lo + _REFERENCE_Q_CHUNK)
        keys = s.past + hi  # no row of this chunk sees past its last position
        mask = _additive_mask(np.arange(keys)[None, :] > (s.past + lo + np.arange(hi - lo))[:, None])
        o, lse = _flash(qh[:, :, lo:hi], kh[:, :, :keys], vh[:, :, :keys], sm_scale, mask=mask)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0].transpose(0, 1))
    return torch.cat(outs), torch.cat(lses)


def _own_parts(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: _Plan,
               sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if len(plan.buckets) == 1 and not plan.singles and _all_rows(plan.buckets[0].rows):
        return _bucket_part(q, k_cache, v_cache, plan.buckets[0], sm_scale)
    t, hq, d = q.shape
    o = torch.empty(t, hq, d)
    lse = torch.empty(t, hq)
    for b in plan.buckets:
        ob, lb = _bucket_part(q, k_cache, v_cache, b, sm_scale)
        _put(o, b.rows, ob)
        _put(lse, b.rows, lb)
    for s in plan.singles:
        o[s.start : s.start + s.e], lse[s.start : s.start + s.e] = _single_part(q, k_cache, v_cache, s, sm_scale)
    return o, lse


def _shared_part(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, part: _Shared,
                 sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (o [R, Hq, D], lse [R, Hq]) of a group's rows over its shared run, read in place."""
    qh = _rows_heads_first(q, part.rows)
    o, lse = _flash(qh, part.keys.heads_first(k_cache), part.keys.heads_first(v_cache), sm_scale)
    return o[0].transpose(0, 1), lse[0].transpose(0, 1)


def _stacked_part(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, st: _Stacked,
                  sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (o [R, Hq, D], lse [R, Hq]) of the stacked shared parts, rows in `st.dest` order."""
    _, hq, d = q.shape
    g = st.groups
    qs = q.index_select(0, st.q_rows).float()
    rows_per = qs.shape[0] // g
    k = _gathered_heads_first(k_cache, st.pages, g, st.length)
    v = _gathered_heads_first(v_cache, st.pages, g, st.length)
    o, lse = _flash(qs.view(g, rows_per, hq, d).transpose(1, 2), k, v, sm_scale, mask=st.mask)
    o = o.transpose(1, 2).reshape(g * rows_per, hq, d).index_select(0, st.slots)
    lse = lse.transpose(1, 2).reshape(g * rows_per, hq).index_select(0, st.slots)
    return o, lse


def _shared_parts(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: _Plan,
                  sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (o, lse) of every row's shared part; rows without one get o = 0, lse = -inf."""
    if plan.stacked is not None:
        results = [(plan.stacked.dest, *_stacked_part(q, k_cache, v_cache, plan.stacked, sm_scale))]
    else:
        results = [(part.rows, *_shared_part(q, k_cache, v_cache, part, sm_scale)) for part in plan.shared]
    if len(results) == 1 and _all_rows(results[0][0]):
        return results[0][1], results[0][2]
    t, hq, d = q.shape
    o = torch.zeros(t, hq, d)
    lse = torch.full((t, hq), _NEG_INF)
    for rows, og, lg in results:
        _put(o, rows, og)
        _put(lse, rows, lg)
    return o, lse


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: _Plan,
            sm_scale: float) -> torch.Tensor:
    """o [T, Hq, D] in q's dtype: each row's own part merged with its shared part, if any."""
    if plan.num_rows == 0:
        return torch.empty_like(q)
    o, lse = _own_parts(q, k_cache, v_cache, plan, sm_scale)
    if plan.shared:
        o_sh, lse_sh = _shared_parts(q, k_cache, v_cache, plan, sm_scale)
        # o = o_sh w + o (1 - w), w = e^lse_sh / (e^lse_sh + e^lse): a part that is empty
        # (lse = -inf) gets weight 0.
        o = torch.lerp(o, o_sh, torch.sigmoid(lse_sh - lse).unsqueeze(-1))
    if plan.no_keys is not None:
        o = o.index_fill(0, plan.no_keys, 0.0)
    return o.to(q.dtype)


def decode_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                         seq_lens: torch.Tensor, sm_scale: float, max_seq_len: int) -> torch.Tensor:
    """CPU path of `decode_attention` (contract: `decode_attention_reference`)."""
    _validate_decode(q, k_cache, v_cache, page_table, seq_lens, sm_scale, max_seq_len)
    plan = _decode_plans.get((page_table, seq_lens), (max_seq_len, k_cache.shape[1]))
    return _attend(q, k_cache, v_cache, plan, sm_scale)


def shared_prefix_decode_attention_cpu(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_page_table: torch.Tensor,
    prefix_lens: torch.Tensor, cu_groups: torch.Tensor, suffix_page_table: torch.Tensor, suffix_lens: torch.Tensor,
    sm_scale: float, max_prefix_len: int, max_suffix_len: int, max_group_size: int,
) -> torch.Tensor:
    """CPU path of `shared_prefix_decode_attention` (contract: its reference): the groups'
    prefixes in one call over one gathered block (or one call per group, read in place, where
    padding would cost more), one call for all suffixes, merged."""
    _validate_shared(q, k_cache, v_cache, prefix_page_table, prefix_lens, cu_groups, suffix_page_table,
                     suffix_lens, sm_scale, max_prefix_len, max_suffix_len, max_group_size)
    plan = _shared_prefix_plans.get(
        (prefix_page_table, prefix_lens, cu_groups, suffix_page_table, suffix_lens),
        (max_suffix_len, k_cache.shape[1]))
    return _attend(q, k_cache, v_cache, plan, sm_scale)


def extend_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                         seq_lens: torch.Tensor, extend_lens: torch.Tensor, cu_extend: torch.Tensor,
                         max_extend_len: int, sm_scale: float, *, k_new: torch.Tensor | None = None,
                         v_new: torch.Tensor | None = None) -> torch.Tensor:
    """CPU path of `extend_attention` (contract: `extend_attention_reference`). `k_new` and
    `v_new` are accepted and not read: the plan views every key in place in the pages already."""
    _validate_extend(q, k_cache, v_cache, page_table, seq_lens, extend_lens, cu_extend, max_extend_len, sm_scale,
                     k_new, v_new)
    plan = _extend_plans.get((page_table, seq_lens, extend_lens, cu_extend), (q.shape[0], k_cache.shape[1]))
    return _attend(q, k_cache, v_cache, plan, sm_scale)
