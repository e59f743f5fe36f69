"""Write the new tokens' K and V into the paged KV cache of one layer.

The cache of a layer is `[num_pages, page_size, num_kv_heads, head_dim]`, i.e. a flat array
of `num_pages * page_size` slots of `[num_kv_heads, head_dim]` each. The scheduler has already
turned each new token's position into a slot (`out_slots[t] = page * page_size + offset`),
so the store is a scatter of T rows:

    k [T, Hkv, D]          k_cache viewed as [num_pages * page_size, Hkv, D]
    row t  ------------->  row out_slots[t]

It runs before attention in every layer, so attention reads all KV (prefix and new tokens)
from the cache. `k` and `v` may be strided views (e.g. slices of a fused QKV projection) as
long as their last dimension is contiguous. Slots must be distinct and in range (the scheduler
guarantees both; they are not checked because that would read device memory).
"""

from __future__ import annotations

import torch

from ._common import (
    HAS_TRITON,
    check_float_dtype,
    check_index_dtype,
    check_last_dim_contiguous,
    check_launch_device,
    check_ndim,
    check_paged_cache,
    next_power_of_2,
    require_triton,
    tl,
    triton,
)

__all__ = ["store_kv", "store_kv_reference"]


def _validate(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              out_slots: torch.Tensor) -> None:
    op = "store_kv"
    _, _, hkv, d = check_paged_cache(op, k_cache, v_cache)
    check_ndim(op, "k", k, 3, "[T, num_kv_heads, head_dim]")
    check_ndim(op, "v", v, 3, "[T, num_kv_heads, head_dim]")
    check_ndim(op, "out_slots", out_slots, 1, "[T]")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    if tuple(k.shape[1:]) != (hkv, d):
        raise ValueError(f"{op}: k is {tuple(k.shape)} but the cache holds [.., {hkv}, {d}] per slot")
    if out_slots.shape[0] != k.shape[0]:
        raise ValueError(f"{op}: out_slots has {out_slots.shape[0]} entries for {k.shape[0]} tokens")
    check_float_dtype(op, "k", k, k_cache.dtype)
    check_float_dtype(op, "v", v, k_cache.dtype)
    check_index_dtype(op, "out_slots", out_slots, (torch.int64, torch.int32))


def store_kv_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       out_slots: torch.Tensor) -> None:
    """PyTorch path: `k_cache.view(-1, Hkv, D)[out_slots] = k` (and likewise for v), in place."""
    _validate(k, v, k_cache, v_cache, out_slots)
    _, _, hkv, d = k_cache.shape
    slots = out_slots.long()
    k_cache.view(-1, hkv, d).index_copy_(0, slots, k)
    v_cache.view(-1, hkv, d).index_copy_(0, slots, v)


if HAS_TRITON:

    @triton.jit
    def _store_kv_kernel(
        k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
        stride_kt, stride_kh, stride_vt, stride_vh,
        HKV: tl.constexpr, D: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program per token (axis 0) and block of heads (axis 1); each copies a
        # [BLOCK_H, D] tile of k and of v into the token's slot.
        t = tl.program_id(0)
        hb = tl.program_id(1)
        slot = tl.load(slots_ptr + t).to(tl.int64)
        offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < HKV) & (offs_d[None, :] < D)
        src_k = k_ptr + t.to(tl.int64) * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
        src_v = v_ptr + t.to(tl.int64) * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
        dst = slot * (HKV * D) + offs_h[:, None] * D + offs_d[None, :]
        tl.store(k_cache_ptr + dst, tl.load(src_k, mask=mask), mask=mask)
        tl.store(v_cache_ptr + dst, tl.load(src_v, mask=mask), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             out_slots: torch.Tensor) -> None:
    """Triton path: scatter k, v [T, Hkv, D] into slots `out_slots` [T] of the caches, in place."""
    require_triton("store_kv")
    _validate(k, v, k_cache, v_cache, out_slots)
    check_launch_device("store_kv", _store_kv_kernel, k=k, v=v, k_cache=k_cache, v_cache=v_cache,
                        out_slots=out_slots)
    check_last_dim_contiguous("store_kv", "k", k)
    check_last_dim_contiguous("store_kv", "v", v)
    t, hkv, d = k.shape
    if t == 0:
        return
    block_d = next_power_of_2(d)
    # Keep a tile at <= 4096 elements so large head counts split over axis 1.
    block_h = max(1, min(next_power_of_2(hkv), 4096 // block_d))
    grid = (t, triton.cdiv(hkv, block_h))
    _store_kv_kernel[grid](
        k, v, k_cache, v_cache, out_slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        HKV=hkv, D=d, BLOCK_H=block_h, BLOCK_D=block_d,
    )
