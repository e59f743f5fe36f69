"""Builders of random paged batches and independent float64 oracles for the kernel tests."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# GPU-size variants: marked `gpu` (deselect with -m "not gpu") and skipped without CUDA.
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e|| / ||e|| in float64 (0 when both are 0)."""
    a = actual.double()
    e = expected.double()
    denom = e.norm().item()
    num = (a - e).norm().item()
    return num if denom == 0 else num / denom


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


@dataclass
class PagedBatch:
    """A flattened extend batch over a randomly paged cache, plus the dense per-request K/V."""

    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    page_table: torch.Tensor  # [B, max_pages] int32
    seq_lens: torch.Tensor  # [B] int32
    extend_lens: torch.Tensor  # [B] int32
    cu_extend: torch.Tensor  # [B + 1] int32
    dense_k: list[torch.Tensor]  # per request [L, Hkv, D]
    dense_v: list[torch.Tensor]
    sm_scale: float

    @property
    def max_extend_len(self) -> int:
        return int(self.extend_lens.max()) if len(self.extend_lens) else 0

    @property
    def max_seq_len(self) -> int:
        return int(self.seq_lens.max()) if len(self.seq_lens) else 0


def make_paged_batch(seq_lens: list[int], extend_lens: list[int], page_size: int, num_kv_heads: int,
                     group: int, head_dim: int, dtype: torch.dtype = torch.float32, device: str = DEVICE,
                     seed: int = 0, spare_pages: int = 3, pad_pages: int = 2) -> PagedBatch:
    """Pages of each request are scattered at random over a pool with spare (garbage) pages;
    page_table rows are padded with `pad_pages` extra columns (zeros) like the runtime's."""
    gen = torch.Generator().manual_seed(seed)
    pages_per = [-(-length // page_size) for length in seq_lens]
    num_pages = sum(pages_per) + spare_pages
    perm = torch.randperm(num_pages, generator=gen)
    k_cache = torch.randn(num_pages, page_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_pages, page_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    max_pages = max(pages_per, default=0) + pad_pages
    page_table = torch.zeros(len(seq_lens), max_pages, dtype=torch.int32)
    dense_k, dense_v = [], []
    used = 0
    for i, length in enumerate(seq_lens):
        pages = perm[used : used + pages_per[i]]
        used += pages_per[i]
        page_table[i, : pages_per[i]] = pages.int()
        pos = torch.arange(length)
        page_of = pages[pos // page_size] if length else pages[:0]
        dense_k.append(k_cache[page_of, pos % page_size])
        dense_v.append(v_cache[page_of, pos % page_size])
    total = sum(extend_lens)
    q = torch.randn(total, num_kv_heads * group, head_dim, generator=gen).to(dtype)
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(extend_lens, dtype=torch.int64), 0).int()
    to = dict(device=device)
    return PagedBatch(
        q=q.to(**to), k_cache=k_cache.to(**to), v_cache=v_cache.to(**to), page_table=page_table.to(**to),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        extend_lens=torch.tensor(extend_lens, dtype=torch.int32, device=device), cu_extend=cu.to(**to),
        dense_k=dense_k, dense_v=dense_v, sm_scale=1.0 / math.sqrt(head_dim),
    )


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, sm_scale: float) -> torch.Tensor:
    """float64 dense causal attention of one request: q [E, Hq, D] at positions prefix.., k/v [L, Hkv, D]."""
    e, hq, _ = q.shape
    length, hkv, _ = k.shape
    g = hq // hkv
    qd = q.double().cpu()
    kd = k.double().cpu().repeat_interleave(g, dim=1)  # query head h uses KV head h // g
    vd = v.double().cpu().repeat_interleave(g, dim=1)
    scores = torch.einsum("ehd,lhd->hel", qd, kd) * sm_scale
    allowed = torch.arange(length)[None, :] <= (prefix + torch.arange(e))[:, None]
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hel,lhd->ehd", scores.softmax(-1), vd)


def naive_extend(batch: PagedBatch) -> torch.Tensor:
    outs = []
    seq = batch.seq_lens.tolist()
    ext = batch.extend_lens.tolist()
    cu = batch.cu_extend.tolist()
    for i in range(len(seq)):
        q = batch.q[cu[i] : cu[i + 1]]
        outs.append(naive_attention(q, batch.dense_k[i], batch.dense_v[i], seq[i] - ext[i], batch.sm_scale))
    return torch.cat(outs).to(batch.q.device) if outs else batch.q.double()[:0]
