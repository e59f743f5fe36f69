"""Paged extend (prefill) attention: new tokens of each request attend causally to their whole
sequence, prefix (cached before this step) and the new tokens themselves, all read from the cache.

    request i:  prefix_i = seq_lens[i] - extend_lens[i]
    positions:  0 .................. prefix_i-1 | prefix_i ......... seq_lens[i]-1
                cached before this step         | new this step (queries cu_extend[i] + j)
    query j of request i sits at position prefix_i + j and sees key positions 0 .. prefix_i + j

Queries of all B requests are flattened on one token axis (see runtime/forward_batch.py);
chunked prefill, prefill over a cached prefix, and mixed batches with decode rows (extend
length 1) are the same call.

Triton version, grid (query blocks, Hq, B): a program takes BLOCK_M queries of one head of one
request and walks the request's keys in BLOCK_N blocks, gathering each key's slot through the
page table. Key blocks wholly before the first query of the tile need no mask (phase A); only
the blocks that touch the diagonal are masked (phase B):

    key positions:  0 ........................ lo ......... hi      lo = prefix + m * BLOCK_M
                    |-- phase A: no mask ------|-- phase B --|      hi = prefix + min((m+1)BLOCK_M, E)

The PyTorch reference loops over requests: gather the request's pages, one SDPA call (fp32)
with a bottom-right causal mask (or `is_causal` when there is no prefix).
"""

from __future__ import annotations

import math

import torch

from ._attention_common import check_attention_inputs, check_int_vector, check_page_table, gather_pages
from ._common import (
    HAS_TRITON,
    check_launch_device,
    check_last_dim_contiguous,
    is_interpreted,
    next_power_of_2,
    require_triton,
    tl,
    triton,
)
from .decode_attention import dot_flags

__all__ = ["extend_attention", "extend_attention_reference"]

_LOG2E = 1.4426950408889634


def _validate(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
              seq_lens: torch.Tensor, extend_lens: torch.Tensor, cu_extend: torch.Tensor, max_extend_len: int,
              sm_scale: float) -> None:
    op = "extend_attention"
    check_attention_inputs(op, q, k_cache, v_cache, "[T, num_q_heads, head_dim]")
    b = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    check_int_vector(op, "seq_lens", seq_lens, None)
    check_int_vector(op, "extend_lens", extend_lens, b)
    check_int_vector(op, "cu_extend", cu_extend, b + 1)
    check_page_table(op, "page_table", page_table, b)
    if not isinstance(max_extend_len, int) or max_extend_len < 0:
        raise ValueError(f"{op}: max_extend_len must be a non-negative int, got {max_extend_len!r}")
    if not isinstance(sm_scale, (float, int)) or not math.isfinite(sm_scale):
        raise ValueError(f"{op}: sm_scale must be a finite float, got {sm_scale!r}")


def extend_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               page_table: torch.Tensor, seq_lens: torch.Tensor, extend_lens: torch.Tensor,
                               cu_extend: torch.Tensor, max_extend_len: int, sm_scale: float) -> torch.Tensor:
    """PyTorch path (fp32 inside, output [T, Hq, D] in q.dtype). Reads the lengths on the host."""
    _validate(q, k_cache, v_cache, page_table, seq_lens, extend_lens, cu_extend, max_extend_len, sm_scale)
    o = torch.empty_like(q)
    seq = seq_lens.tolist()
    ext = extend_lens.tolist()
    starts = cu_extend.tolist()
    for i in range(len(seq)):
        length, e, s = seq[i], ext[i], starts[i]
        if e == 0:
            continue
        if not 0 < e <= length:
            raise ValueError(f"extend_attention: request {i} has extend_len {e} and seq_len {length}")
        prefix = length - e
        k = gather_pages(k_cache, page_table[i : i + 1], length)[0, :length].transpose(0, 1)  # [Hkv, L, D]
        v = gather_pages(v_cache, page_table[i : i + 1], length)[0, :length].transpose(0, 1)
        qi = q[s : s + e].float().transpose(0, 1)  # [Hq, E, D]
        out = _causal_attention_fp32(qi, k, v, prefix, sm_scale)
        o[s : s + e] = out.transpose(0, 1).to(q.dtype)
    return o


# Query rows per chunk of the CPU path: bounds the [Hkv, group * rows, L] score tensor.
_REFERENCE_Q_CHUNK = 512


def _causal_attention_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int,
                           sm_scale: float) -> torch.Tensor:
    """q [Hq, E, D] at positions prefix..prefix+E-1 over k, v [Hkv, prefix+E, D] -> [Hq, E, D].

    Two batched matmuls with the query heads of each KV head stacked as rows: on the CPU this
    is about twice as fast as SDPA with an explicit mask (measured, 1 and 2 threads), and the
    GQA heads share their K/V without copies. Query rows are processed in chunks:

        scores[h, (g, i), j] = q[h*G+g, i] . k[h, j]     masked where j > prefix + i
    """
    hq, e, d = q.shape
    hkv, length, _ = k.shape
    group = hq // hkv
    out = torch.empty(hq, e, d, dtype=torch.float32, device=q.device)
    key_pos = torch.arange(length, device=q.device)
    for lo in range(0, e, _REFERENCE_Q_CHUNK):
        hi = min(e, lo + _REFERENCE_Q_CHUNK)
        rows = hi - lo
        qc = q[:, lo:hi].reshape(hkv, group * rows, d)
        scores = torch.matmul(qc, k.transpose(1, 2)).mul_(sm_scale).view(hkv, group, rows, length)
        if prefix + lo < length - 1:  # some key is in the future of some query of this chunk
            future = key_pos[None, :] > (prefix + lo + torch.arange(rows, device=q.device))[:, None]
            scores.masked_fill_(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(hkv, group * rows, length)
        out[:, lo:hi] = torch.matmul(probs, v).view(hq, rows, d)
    return out


if HAS_TRITON:

    @triton.jit
    def _extend_block(
        q, k_cache_ptr, v_cache_ptr, page_row_ptr, kvh, n_start, n_end, q_pos, qk_scale,
        m_i, l_i, acc,
        HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        PAGE_SIZE: tl.constexpr, MASKED: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """Online softmax over key positions [n_start, n_end); MASKED applies key_pos <= q_pos."""
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        for n in range(n_start, n_end, BLOCK_N):
            pos = n + tl.arange(0, BLOCK_N)
            if MASKED:
                nmask = pos < n_end
                page = tl.load(page_row_ptr + pos // PAGE_SIZE, mask=nmask, other=0).to(tl.int64)
            else:
                nmask = pos >= 0
                page = tl.load(page_row_ptr + pos // PAGE_SIZE).to(tl.int64)
            kv_off = (page * PAGE_SIZE + pos % PAGE_SIZE) * (HKV * D) + kvh * D
            # K rows are contiguous along D: load [BLOCK_N, BLOCK_D] and transpose in registers.
            k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :],
                        mask=nmask[:, None] & dmask[None, :], other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            if MASKED:
                qk = tl.where((pos[None, :] <= q_pos[:, None]) & nmask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :],
                        mask=nmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
            acc = acc * alpha[:, None]
            if DOT_F32:
                acc = tl.dot(p, v.to(tl.float32), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _extend_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, o_ptr, page_table_ptr, seq_lens_ptr, extend_lens_ptr, cu_extend_ptr,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_pt, qk_scale, num_m_blocks,
        HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
        DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # Largest m first: under the causal mask later query blocks carry more keys, so starting
        # them first shortens the tail of the grid.
        m = num_m_blocks - 1 - tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        e = tl.load(extend_lens_ptr + b)
        if m * BLOCK_M >= e:
            return
        seq_len = tl.load(seq_lens_ptr + b)
        prefix = seq_len - e
        q_start = tl.load(cu_extend_ptr + b).to(tl.int64)
        kvh = h // G

        offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mmask = offs_m < e
        dmask = offs_d < D
        q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=mmask[:, None] & dmask[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        q_pos = prefix + offs_m
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        page_row = page_table_ptr + b.to(tl.int64) * stride_pt

        lo = prefix + m * BLOCK_M           # first query position of this tile
        hi = prefix + tl.minimum((m + 1) * BLOCK_M, e)  # one past the last key any row may see
        lo_aligned = (lo // BLOCK_N) * BLOCK_N
        m_i, l_i, acc = _extend_block(q, k_cache_ptr, v_cache_ptr, page_row, kvh, 0, lo_aligned, q_pos, qk_scale,
                                      m_i, l_i, acc, HKV, D, BLOCK_D, BLOCK_N, PAGE_SIZE, False, DOT_F32, PRECISION)
        m_i, l_i, acc = _extend_block(q, k_cache_ptr, v_cache_ptr, page_row, kvh, lo_aligned, hi, q_pos, qk_scale,
                                      m_i, l_i, acc, HKV, D, BLOCK_D, BLOCK_N, PAGE_SIZE, True, DOT_F32, PRECISION)
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(o_ptr + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


def _default_config(head_dim: int, dtype: torch.dtype, interpreted: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    # Measured on an H100 (benchmarks/kernels/bench_kernels.py, causal 4k tokens, 32 heads, bf16):
    # d64 best at (128, 64, 8 warps, 4 stages), d128 at (128, 128, 8 warps, 3 stages).
    if interpreted:
        return 32, 16, 4, 1
    if dtype == torch.float32:
        return 64, 32, 4, 2
    if head_dim <= 64:
        return 128, 64, 8, 4
    return 128, 128, 8, 3


def extend_attention_impl(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                          seq_lens: torch.Tensor, extend_lens: torch.Tensor, cu_extend: torch.Tensor,
                          max_extend_len: int, sm_scale: float, *, block_m: int | None = None,
                          block_n: int | None = None, num_warps: int | None = None,
                          num_stages: int | None = None) -> torch.Tensor:
    """Launch with optional tuning overrides (tests, benchmarks); inputs already validated."""
    t, hq, d = q.shape
    _, page_size, hkv, _ = k_cache.shape
    o = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    b = seq_lens.shape[0]
    if t == 0 or b == 0 or max_extend_len == 0:
        return o
    interpreted = is_interpreted(_extend_kernel)
    bm, bn, nw, ns = _default_config(d, q.dtype, interpreted)
    bm, bn = block_m or bm, block_n or bn
    if bm % bn or bn < 16:
        # tl.dot needs every dimension >= 16 on the GPU; phase B assumes BLOCK_N divides BLOCK_M.
        raise ValueError(f"extend_attention: need BLOCK_N >= 16 dividing BLOCK_M, got {bm}, {bn}")
    nw, ns = num_warps or nw, num_stages or ns
    dot_f32, precision = dot_flags(q.dtype, interpreted)
    num_m_blocks = triton.cdiv(max_extend_len, bm)
    _extend_kernel[(num_m_blocks, hq, b)](
        q, k_cache, v_cache, o, page_table, seq_lens, extend_lens, cu_extend,
        q.stride(0), q.stride(1), o.stride(0), o.stride(1), page_table.stride(0),
        float(sm_scale) * _LOG2E, num_m_blocks,
        HKV=hkv, G=hq // hkv, D=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, next_power_of_2(d)), PAGE_SIZE=page_size,
        DOT_F32=dot_f32, PRECISION=precision, num_warps=nw, num_stages=ns,
    )
    return o


def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                     seq_lens: torch.Tensor, extend_lens: torch.Tensor, cu_extend: torch.Tensor,
                     max_extend_len: int, sm_scale: float) -> torch.Tensor:
    """Triton path, same contract as `extend_attention_reference`.

    `max_extend_len` must be >= max(extend_lens) (it sizes the grid; longer requests would be
    cut off). It is not checked against the device tensor: that would synchronize.
    """
    require_triton("extend_attention")
    _validate(q, k_cache, v_cache, page_table, seq_lens, extend_lens, cu_extend, max_extend_len, sm_scale)
    check_launch_device("extend_attention", _extend_kernel, q=q, k_cache=k_cache, v_cache=v_cache,
                        page_table=page_table, seq_lens=seq_lens, extend_lens=extend_lens, cu_extend=cu_extend)
    check_last_dim_contiguous("extend_attention", "q", q)
    return extend_attention_impl(q, k_cache, v_cache, page_table, seq_lens, extend_lens, cu_extend,
                                 max_extend_len, sm_scale)
