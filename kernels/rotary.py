"""Rotary position embedding (RoPE), NeoX / HF "rotate_half" convention.

`rope_cos_sin_cache` precomputes, for every position p < max_position, the row

    [cos(p * f_0) .. cos(p * f_{D/2-1}) | sin(p * f_0) .. sin(p * f_{D/2-1})]     (width D)

where f = inv_freq is computed exactly as transformers does for the default, "linear" and
"llama3" rope types (fp32 arithmetic, `positions.float() * inv_freq`), so the cache rows equal
HF's cos/sin (HF repeats each half twice: emb = cat(freqs, freqs)).

`apply_rotary` rotates each head of q and k by its token's position (rotary_dim == head_dim):

    x = [x1 | x2]  (halves of D)       out = [x1*cos - x2*sin | x2*cos + x1*sin]

which is HF's `q * cos + rotate_half(q) * sin`. Arithmetic is fp32, outputs have the input
dtype. The op is OUT-OF-PLACE: q and k are not modified; new contiguous tensors are returned.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._common import (
    HAS_TRITON,
    check_float_dtype,
    check_index_dtype,
    check_last_dim_contiguous,
    check_launch_device,
    check_ndim,
    next_power_of_2,
    require_triton,
    tl,
    triton,
)

__all__ = ["rope_cos_sin_cache", "apply_rotary", "apply_rotary_reference", "rope_inv_freq"]


def rope_inv_freq(head_dim: int, base: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """inv_freq [head_dim/2] fp32, as transformers' ROPE_INIT_FUNCTIONS compute it."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope: head_dim must be a positive even number, got {head_dim}")
    if base <= 0:
        raise ValueError(f"rope: base must be positive, got {base}")
    # transformers: 1 / base ** (arange(0, dim, 2, int64).float() / dim), all fp32.
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (base ** exponent)
    rope_type = None if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return inv_freq
    if rope_type == "linear":
        factor = float(_required(scaling, "factor"))
        if factor <= 0:
            raise ValueError(f"rope: linear scaling factor must be positive, got {factor}")
        return inv_freq / factor
    if rope_type == "llama3":
        factor = float(_required(scaling, "factor"))
        low_freq_factor = float(_required(scaling, "low_freq_factor"))
        high_freq_factor = float(_required(scaling, "high_freq_factor"))
        old_context_len = float(_required(scaling, "original_max_position_embeddings"))
        if high_freq_factor == low_freq_factor:
            raise ValueError("rope: llama3 scaling needs high_freq_factor != low_freq_factor")
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and the
        # band in between interpolated smoothly; the same steps as transformers' llama3 init.
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, inv_freq_llama)
    raise ValueError(f"rope: unsupported rope_type {rope_type!r} (supported: default, linear, llama3)")


def _required(scaling: dict[str, Any], key: str) -> Any:
    if key not in scaling:
        raise ValueError(f"rope: scaling {scaling!r} lacks {key!r}")
    return scaling[key]


def rope_cos_sin_cache(head_dim: int, max_position: int, base: float, scaling: dict[str, Any] | None = None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[max_position, head_dim]: first half cos, second half sin (see the module docstring)."""
    if max_position <= 0:
        raise ValueError(f"rope: max_position must be positive, got {max_position}")
    inv_freq = rope_inv_freq(head_dim, base, scaling)
    freqs = torch.arange(max_position, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)


def _validate(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    op = "apply_rotary"
    check_ndim(op, "positions", positions, 1, "[T]")
    check_ndim(op, "q", q, 3, "[T, num_q_heads, head_dim]")
    check_ndim(op, "k", k, 3, "[T, num_kv_heads, head_dim]")
    check_ndim(op, "cos_sin_cache", cos_sin_cache, 2, "[max_position, head_dim]")
    t = positions.shape[0]
    if q.shape[0] != t or k.shape[0] != t:
        raise ValueError(f"{op}: q has {q.shape[0]} and k {k.shape[0]} tokens for {t} positions")
    d = q.shape[2]
    if k.shape[2] != d or cos_sin_cache.shape[1] != d:
        raise ValueError(f"{op}: head_dim differs: q {d}, k {k.shape[2]}, cos_sin_cache {cos_sin_cache.shape[1]}")
    if d % 2:
        raise ValueError(f"{op}: head_dim must be even, got {d}")
    check_index_dtype(op, "positions", positions, (torch.int64, torch.int32))
    check_float_dtype(op, "q", q)
    check_float_dtype(op, "k", k, q.dtype)
    check_float_dtype(op, "cos_sin_cache", cos_sin_cache)


def apply_rotary_reference(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch path; returns new (q_out, k_out)."""
    _validate(positions, q, k, cos_sin_cache)
    half = q.shape[2] // 2
    cs = cos_sin_cache.index_select(0, positions.long()).float()
    cos = cs[:, None, :half]
    sin = cs[:, None, half:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


if HAS_TRITON:

    @triton.jit
    def _rotate_heads(src_ptr, dst_ptr, stride_t, stride_h, t, cos, sin, offs_h, offs_d,
                      NH: tl.constexpr, HALF: tl.constexpr):
        mask = (offs_h[:, None] < NH) & (offs_d[None, :] < HALF)
        base = src_ptr + t * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
        x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
        out = dst_ptr + t * (NH * 2 * HALF) + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
        tl.store(out, (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=mask)
        tl.store(out + HALF, (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(
        pos_ptr, q_ptr, k_ptr, cache_ptr, qo_ptr, ko_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_ct,
        HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
        BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program per token: the cos/sin row is loaded once and applied to all its heads.
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HALF
        cos = tl.load(cache_ptr + pos * stride_ct + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        sin = tl.load(cache_ptr + pos * stride_ct + HALF + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        _rotate_heads(q_ptr, qo_ptr, stride_qt, stride_qh, t, cos, sin, tl.arange(0, BLOCK_HQ), offs_d, HQ, HALF)
        _rotate_heads(k_ptr, ko_ptr, stride_kt, stride_kh, t, cos, sin, tl.arange(0, BLOCK_HKV), offs_d, HKV, HALF)


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path, same contract as `apply_rotary_reference` (out-of-place).

    Positions must be < cos_sin_cache.shape[0] (not checked: that would read device memory).
    """
    require_triton("apply_rotary")
    _validate(positions, q, k, cos_sin_cache)
    check_launch_device("apply_rotary", _rotary_kernel, positions=positions, q=q, k=k, cos_sin_cache=cos_sin_cache)
    for name, t in (("q", q), ("k", k), ("cos_sin_cache", cos_sin_cache)):
        check_last_dim_contiguous("apply_rotary", name, t)
    t, hq, d = q.shape
    hkv = k.shape[1]
    q_out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, hkv, d), dtype=k.dtype, device=k.device)
    if t > 0:
        half = d // 2
        _rotary_kernel[(t,)](
            positions, q, k, cos_sin_cache, q_out, k_out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
            HQ=hq, HKV=hkv, HALF=half,
            BLOCK_HQ=next_power_of_2(hq), BLOCK_HKV=next_power_of_2(hkv), BLOCK_D=next_power_of_2(half),
        )
    return q_out, k_out
