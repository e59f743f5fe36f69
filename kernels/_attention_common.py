"""Helpers shared by the paged attention modules: validation and the PyTorch gather of pages.

Paged KV layout (one layer), and how a token of a request is found:

    k_cache: [num_pages, P, Hkv, D]
    page_table[i] = [p0, p1, p2, ...]             token t of request i lives at
                     |   |                        k_cache[page_table[i][t // P], t % P]
      tokens 0..P-1 -+   +- tokens P..2P-1        (slot page * P + offset in the flat view)

Query head h reads KV head h // (Hq // Hkv) (grouped-query attention).
"""

from __future__ import annotations

import torch

from ._common import check_float_dtype, check_index_dtype, check_ndim, check_paged_cache

__all__ = ["check_attention_inputs", "gather_pages", "merge_states"]


def check_attention_inputs(op: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           q_layout: str) -> tuple[int, int, int, int, int]:
    """Validate q [N, Hq, D] against the cache; returns (P, Hq, Hkv, D, group size Hq // Hkv)."""
    _, page_size, hkv, d = check_paged_cache(op, k_cache, v_cache)
    check_ndim(op, "q", q, 3, q_layout)
    check_float_dtype(op, "q", q, k_cache.dtype)
    hq = q.shape[1]
    if q.shape[2] != d:
        raise ValueError(f"{op}: q head_dim {q.shape[2]} != cache head_dim {d}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{op}: num_q_heads {hq} must be a multiple of num_kv_heads {hkv}")
    return page_size, hq, hkv, d, hq // hkv


def check_int_vector(op: str, name: str, t: torch.Tensor, n: int | None) -> None:
    check_ndim(op, name, t, 1, f"[{n if n is not None else 'N'}]")
    check_index_dtype(op, name, t, (torch.int32,))
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{op}: {name} has {t.shape[0]} entries, expected {n}")


def check_page_table(op: str, name: str, page_table: torch.Tensor, rows: int) -> None:
    check_ndim(op, name, page_table, 2, "[rows, max_pages]")
    check_index_dtype(op, name, page_table, (torch.int32,))
    if page_table.shape[0] != rows:
        raise ValueError(f"{op}: {name} has {page_table.shape[0]} rows, expected {rows}")
    if page_table.shape[1] > 0 and page_table.stride(1) != 1:
        raise ValueError(f"{op}: {name} rows must be contiguous, got strides {page_table.stride()}")


def gather_pages(cache: torch.Tensor, page_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[R, max_pages] page table -> [R, n_pages * P, Hkv, D] fp32 copy of the first pages.

    Gathering whole pages (P * Hkv * D contiguous values each) is much faster on CPU than a
    gather per token; tokens past a row's length are garbage and must be masked by the caller.
    """
    _, page_size, hkv, d = cache.shape
    n_pages = min(-(-num_tokens // page_size), page_table.shape[1])
    rows = page_table.shape[0]
    pages = cache.index_select(0, page_table[:, :n_pages].reshape(-1).long())
    return pages.view(rows, n_pages * page_size, hkv, d).float()


def merge_states(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor,
                                     lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial softmax attentions over disjoint key sets (see shared_prefix_attention)."""
    lse = torch.logaddexp(lse1, lse2)
    # Where both parts are empty (lse = -inf) the weights would be nan; make them 0.
    safe = torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)
    w1 = torch.exp(lse1 - safe)[..., None]
    w2 = torch.exp(lse2 - safe)[..., None]
    o = o1.float() * w1 + o2.float() * w2
    return o.to(o1.dtype), lse
