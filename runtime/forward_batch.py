"""The typed boundary between the scheduler's batch and the model's forward pass.

A step's batch is flattened along the token axis: request i contributes `extend_lens[i]` new
tokens (its queries) and attends to all `seq_lens[i]` tokens of its sequence, of which
`seq_lens[i] - extend_lens[i]` were already in the KV pool before this step. Chunked prefill,
a prefill over a cached prefix, decode and fast-forwarded grammar tokens are the same thing
with different counts:

    token axis:  | r0: e0 new tokens | r1: e1 new tokens | r2: 1 (decode) |
    cu_extend:   0                   e0                  e0+e1             e0+e1+1

    request i, sequence of seq_lens[i] tokens, stored in pages of `page_size` slots:
        page_table[i] = [p0, p1, p2, ...]      slot of token t = page_table[i][t // P] * P + t % P
        |<--- prefix (already cached) --->|<-- extend (written this step) -->|

The KV of the new tokens is written to `out_slots` before attention reads the cache, so
attention reads everything (prefix and new tokens) from the pool.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from radixserve.runtime.cascade import CascadeInfo


@dataclass(frozen=True)
class ForwardBatch:
    """Device tensors and host copies for one forward step.

    Invariants: `len(input_ids) == len(positions) == len(out_slots) == cu_extend[-1]`;
    `1 <= extend_lens[i] <= seq_lens[i]`; `page_table[i, :ceil(seq_lens[i] / page_size)]` are
    valid page indices (the rest is padding and never read); `logits_indices` indexes the token
    axis and selects the rows whose logits are computed (the last token of each request that
    samples this step, or every prompt position whose log-probability was asked for).
    The tensors are valid only for this step: the scheduler may reuse their memory.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64: position of each token within its sequence
    out_slots: torch.Tensor  # [T] int64: KV slot (page * page_size + offset) of each new token
    page_table: torch.Tensor  # [B, max_pages] int32, padded with 0
    seq_lens: torch.Tensor  # [B] int32: tokens in the sequence after this step
    extend_lens: torch.Tensor  # [B] int32: new tokens of each request this step
    cu_extend: torch.Tensor  # [B + 1] int32: prefix sums of extend_lens
    logits_indices: torch.Tensor  # [S] int64: token rows whose logits are needed
    seq_lens_cpu: tuple[int, ...]  # host copy of seq_lens (no device sync to read it)
    extend_lens_cpu: tuple[int, ...]  # host copy of extend_lens
    page_size: int
    # Set for decode batches whose requests share prefixes (see runtime/cascade.py): attention
    # then reads each shared prefix once per group.
    cascade: "CascadeInfo | None" = None
    # CUDA-graph batches: an upper bound of every seq_len that the captured graph must serve
    # (the context limit). The decode kernels size their split-KV grids from `max_seq_len`
    # and derive each request's split from its own device-side length, so a bound is valid
    # for any lengths up to it; `seq_lens_cpu` then describes the captured (padded) rows only.
    seq_len_bound: int | None = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.extend_lens_cpu))

    @property
    def is_decode(self) -> bool:
        """Every request adds exactly one token: the decode kernel and CUDA graphs apply."""
        return all(e == 1 for e in self.extend_lens_cpu)

    @property
    def max_seq_len(self) -> int:
        if self.seq_len_bound is not None:
            return self.seq_len_bound
        return max(self.seq_lens_cpu, default=0)

    @property
    def max_extend_len(self) -> int:
        return max(self.extend_lens_cpu, default=0)


# ---------------------------------------------------------------------------------- builder


@dataclass(frozen=True)
class SeqStep:
    """One request's part of a step, as the scheduler sees it.

    `token_ids` are the tokens computed this step (at least one); `start` is how many tokens of
    the sequence are already in the KV pool (so the new tokens sit at positions
    `start .. start + len(token_ids) - 1`); `pages` lists the pool pages of the whole sequence
    in order (at least `ceil((start + len(token_ids)) / page_size)` of them; extra pages, e.g.
    reserved for later decode steps, are allowed and ignored).

    `logits_from` says which new tokens need logits, as an offset into `token_ids`: -1 (the
    default) is the last one only, the token to sample from; 0 is all of them (prompt
    log-probabilities); a negative k the last -k; None none (a chunk of a prefill that is not
    the last chunk).
    """

    token_ids: Sequence[int]
    start: int
    pages: Sequence[int]
    logits_from: int | None = -1

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if n < 1:
            raise ValueError("SeqStep: token_ids must hold at least one token")
        if self.start < 0:
            raise ValueError(f"SeqStep: start must be >= 0, got {self.start}")
        if self.logits_from is not None and not -n <= self.logits_from < n:
            raise ValueError(f"SeqStep: logits_from {self.logits_from} out of range for {n} new tokens")

    @property
    def seq_len(self) -> int:
        return self.start + len(self.token_ids)

    @property
    def num_logits(self) -> int:
        if self.logits_from is None:
            return 0
        return len(self.token_ids) - self.logits_from if self.logits_from >= 0 else -self.logits_from


@dataclass(frozen=True)
class HostBatch:
    """The index arithmetic of a step on the host (numpy), before it crosses to a device:
    what `build_forward_batch` uploads, and what prefill graphs pad into their static buffers."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    out_slots: np.ndarray  # [T] int64
    page_table: np.ndarray  # [B, max_pages] int32, padded with 0
    seq_lens: np.ndarray  # [B] int64
    extend_lens: np.ndarray  # [B] int64
    cu_extend: np.ndarray  # [B + 1] int64
    logits_indices: np.ndarray  # [S] int64


def host_batch(seqs: Sequence[SeqStep], page_size: int) -> HostBatch:
    """Flatten the steps of `seqs` (in order) on the host. Pure: reads only its arguments.

        seq i: new tokens at positions start_i .. seq_len_i - 1
        out_slots[t] = pages_i[pos // page_size] * page_size + pos % page_size
        logits rows  = cu_extend[i] + logits_from_i .. cu_extend[i+1] - 1, in request order
    """
    if not seqs:
        raise ValueError("host_batch: no sequences")
    if not 1 <= page_size <= 64:
        raise ValueError(f"host_batch: page_size must be in 1..64, got {page_size}")
    b = len(seqs)
    extend_lens = np.fromiter((len(s.token_ids) for s in seqs), dtype=np.int64, count=b)
    seq_lens = np.fromiter((s.seq_len for s in seqs), dtype=np.int64, count=b)
    cu_extend = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(extend_lens, out=cu_extend[1:])
    pages_needed = -(-seq_lens // page_size)
    max_pages = int(pages_needed.max())

    total = int(cu_extend[-1])
    input_ids = np.empty(total, dtype=np.int64)
    positions = np.empty(total, dtype=np.int64)
    out_slots = np.empty(total, dtype=np.int64)
    page_table = np.zeros((b, max_pages), dtype=np.int32)
    logits_rows: list[np.ndarray] = []
    for i, s in enumerate(seqs):
        lo, hi, need = int(cu_extend[i]), int(cu_extend[i + 1]), int(pages_needed[i])
        if len(s.pages) < need:
            raise ValueError(
                f"host_batch: request {i} has {s.seq_len} tokens, needing {need} pages "
                f"of {page_size}, but only {len(s.pages)} pages were given"
            )
        pages = np.asarray(s.pages[:need], dtype=np.int64)
        page_table[i, :need] = pages
        pos = np.arange(s.start, s.seq_len, dtype=np.int64)
        input_ids[lo:hi] = s.token_ids
        positions[lo:hi] = pos
        out_slots[lo:hi] = pages[pos // page_size] * page_size + pos % page_size
        if s.logits_from is not None:
            first = lo + (s.logits_from if s.logits_from >= 0 else hi - lo + s.logits_from)
            logits_rows.append(np.arange(first, hi, dtype=np.int64))
    logits_indices = np.concatenate(logits_rows) if logits_rows else np.empty(0, dtype=np.int64)
    return HostBatch(input_ids, positions, out_slots, page_table, seq_lens, extend_lens, cu_extend, logits_indices)


def build_forward_batch(seqs: Sequence[SeqStep], page_size: int, device: torch.device | str) -> ForwardBatch:
    """Flatten the steps of `seqs` (in order) into a ForwardBatch on `device` (`host_batch`).

    Pure: reads only its arguments. All index arithmetic runs on the host (numpy); each tensor
    then crosses to the device in one non-blocking copy (from pinned memory on CUDA), so
    building a batch never synchronizes the device.
    """
    h = host_batch(seqs, page_size)
    device = torch.device(device)

    def to_device(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
        if device.type == "cpu":
            return t
        if device.type == "cuda":
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    return ForwardBatch(
        input_ids=to_device(h.input_ids, torch.int64),
        positions=to_device(h.positions, torch.int64),
        out_slots=to_device(h.out_slots, torch.int64),
        page_table=to_device(h.page_table, torch.int32),
        seq_lens=to_device(h.seq_lens, torch.int32),
        extend_lens=to_device(h.extend_lens, torch.int32),
        cu_extend=to_device(h.cu_extend, torch.int32),
        logits_indices=to_device(h.logits_indices, torch.int64),
        seq_lens_cpu=tuple(int(x) for x in h.seq_lens),
        extend_lens_cpu=tuple(int(x) for x in h.extend_lens),
        page_size=page_size,
    )


def fill_rows(rows: Sequence[Sequence[int]], lengths: np.ndarray, width: int) -> np.ndarray:
    """int32 [len(rows), width]: row r holds rows[r][:lengths[r]], zeros after. One C-level
    pass over all ids (np.fromiter over a chained iterator) instead of one conversion per row."""
    n = len(rows)
    out = np.zeros((n, max(width, 1)), dtype=np.int32)
    total = int(lengths.sum())
    if total:
        flat = np.fromiter(
            itertools.chain.from_iterable(r[:k] for r, k in zip(rows, lengths.tolist())), dtype=np.int32, count=total
        )
        out[np.arange(out.shape[1])[None, :] < lengths[:, None]] = flat
    return out
