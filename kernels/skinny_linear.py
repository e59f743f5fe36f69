"""Skinny linear: y = x @ w.T for the few rows of a decode step, at the speed of reading w.

A decode step of a small model multiplies 1-64 rows by every weight matrix once, so its
projections are bound by reading the weights (2 bytes a weight, ~2 FLOPs): the time floor of
a [N, K] bf16 weight is 2NK bytes over the copy bandwidth. cuBLAS picks tiles for large
problems; on llama-1b's attention projections at 32 rows it reads qkv and o at 0.9-1.5 TB/s of
the H100's ~3 TB/s (benchmarks/profile_decode.py), the MLP's down projection needs a split-K
reduction kernel of its own.

Here every program owns BLOCK_N output columns for all rows and walks K in BLOCK_K steps:

    program j: acc[BLOCK_M, BLOCK_N] += x[:, k:k+BK] @ w[j*BN:(j+1)*BN, k:k+BK].T   (fp32)

One pass over w, no split-K and no second kernel: small BLOCK_N gives enough programs to
keep every SM streaming, and the x tile (at most 64 x BLOCK_K) comes from L2. The rows are
padded to BLOCK_M (16, 32 or 64) for the tensor cores.

    skinny_linear(x [M, K], w [N, K]) -> y [M, N] in x.dtype   (M <= 64; x, w fp16/bf16/fp32)
    skinny_linear_reference: the same in PyTorch (fp32 accumulation, one rounding)
"""

from __future__ import annotations

import torch

from ._common import (
    HAS_TRITON,
    check_float_dtype,
    check_last_dim_contiguous,
    check_launch_device,
    check_ndim,
    is_interpreted,
    next_power_of_2,
    require_triton,
    tl,
    triton,
)
from .decode_attention import dot_flags

__all__ = ["MAX_ROWS", "skinny_linear", "skinny_linear_reference"]

MAX_ROWS = 64


def _validate(x: torch.Tensor, w: torch.Tensor) -> None:
    check_ndim("skinny_linear", "x", x, 2, "[M, K]")
    check_ndim("skinny_linear", "w", w, 2, "[N, K]")
    check_float_dtype("skinny_linear", "x", x)
    check_float_dtype("skinny_linear", "w", w)
    if x.dtype != w.dtype:
        raise TypeError(f"skinny_linear: x is {x.dtype} but w is {w.dtype}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"skinny_linear: x has {x.shape[1]} features but w expects {w.shape[1]}")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"skinny_linear: at most {MAX_ROWS} rows, got {x.shape[0]} (use a GEMM)")


def skinny_linear_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """PyTorch path: x @ w.T accumulated in fp32, rounded once to x.dtype."""
    _validate(x, w)
    return (x.float() @ w.float().T).to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _skinny_linear_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mmask = offs_m < M
        nmask = offs_n < N
        x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            if EVEN_K:
                xt = tl.load(x_rows + k[None, :], mask=mmask[:, None], other=0.0)
                wt = tl.load(w_rows + k[None, :], mask=nmask[:, None], other=0.0)
            else:
                kmask = k < K
                xt = tl.load(x_rows + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
                wt = tl.load(w_rows + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
            if DOT_F32:
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
        y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def _config(m: int, n: int, k: int, interpreted: bool) -> dict:
    """Tiles: rows padded to 16/32/64; 16 columns a program (enough programs for N >= 2k on
    132 SMs), 256 of K a step with 4 loads in flight; tiny tiles under the interpreter."""
    block_m = max(16, next_power_of_2(m))
    if interpreted:
        return dict(BLOCK_M=block_m, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1)
    return dict(BLOCK_M=block_m, BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=4)


def skinny_linear(x: torch.Tensor, w: torch.Tensor, *, block_n: int | None = None, block_k: int | None = None,
                  num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """Triton path: x [M, K] @ w [N, K].T -> [M, N] (new contiguous tensor, x.dtype).
    The keyword overrides are for benchmarks sweeping tiles."""
    require_triton("skinny_linear")
    _validate(x, w)
    check_launch_device("skinny_linear", _skinny_linear_kernel, x=x, w=w)
    check_last_dim_contiguous("skinny_linear", "x", x)
    check_last_dim_contiguous("skinny_linear", "w", w)
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_()
    interpreted = is_interpreted(_skinny_linear_kernel)
    cfg = _config(m, n, k, interpreted)
    dot_f32, precision = dot_flags(x.dtype, interpreted)
    for key, value in (("BLOCK_N", block_n), ("BLOCK_K", block_k), ("num_warps", num_warps),
                       ("num_stages", num_stages)):
        if value is not None:
            cfg[key] = value
    _skinny_linear_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0), EVEN_K=k % cfg["BLOCK_K"] == 0,
        DOT_F32=dot_f32, PRECISION=precision, **cfg)
    return y
