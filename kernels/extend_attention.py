"""Paged extend (prefill) attention: new tokens of each request attend causally to their whole
sequence, the prefix (cached before this step) and the new tokens themselves.

    request i:  prefix_i = seq_lens[i] - extend_lens[i]
    positions:  0 .................. prefix_i-1 | prefix_i ......... seq_lens[i]-1
                cached before this step         | new this step (queries cu_extend[i] + j)
    query j of request i sits at position prefix_i + j and sees key positions 0 .. prefix_i + j

Queries of all B requests are flattened on one token axis (see runtime/forward_batch.py);
chunked prefill, prefill over a cached prefix, and mixed batches with decode rows (extend
length 1) are the same call. The keys/values of the new tokens are in the cache too, but the
caller may also pass them contiguously (`k_new`, `v_new` [T, Hkv, D], rows in q's order): the
model has just computed them, and reading them as dense rows beats a gather through the page table.

Triton version, grid (query blocks, Hq, B): a program takes the BLOCK_M queries m*BLOCK_M ..
(m+1)*BLOCK_M-1 of one head of one request (e new tokens) and walks its keys in three loops of
BLOCK_N blocks (BLOCK_N divides BLOCK_M, so loops 2 and 3 start on block boundaries):

    keys:  0 .... prefix-1 | new j = 0 .. m*BLOCK_M-1 | m*BLOCK_M .. min((m+1)*BLOCK_M, e)-1
    loop:  1. prefix       | 2. before the tile       | 3. diagonal (the tile's own keys)
    mask:  tail block only | none                     | j <= query index, j < e
           (pos < prefix)  |                          |
    from:  the pages       | k_new/v_new rows cu_extend[b] + j: TMA descriptors on sm90+, else
                           | pointer loads; without k_new/v_new, the pages at position prefix + j

A short new turn over a long cached history (an agent's tool result after 8k tokens of
conversation) makes a grid too small for the GPU: 128 queries x 32 heads are 64 programs, each
walking all 8k prefix keys alone. Such launches split loop 1 over S programs per tile (grid
(query blocks x S, Hq, B); S from `choose_extend_splits`: as many as one wave of resident
programs holds), the last of which also walks loops 2 and 3; each writes its partial output and
log-sum-exp, and decode_attention's stage 2 merges them (one more launch: measured on an H100,
128 new tokens over 8k cached take 52 us instead of 153 at d64, 83 instead of 188 at d128).

The PyTorch reference loops over requests: gather the request's pages (its prefix only when
k_new/v_new are given), fp32 matmuls with a bottom-right causal mask.
"""

from __future__ import annotations

import functools
import math

import torch

from ._attention_common import check_attention_inputs, check_int_vector, check_page_table, gather_pages
from ._common import (
    HAS_TRITON,
    check_float_dtype,
    check_launch_device,
    check_last_dim_contiguous,
    check_ndim,
    check_same_device,
    is_interpreted,
    next_power_of_2,
    require_triton,
    tl,
    triton,
)
from .decode_attention import dot_flags, launch_merge_splits, num_sms

__all__ = ["extend_attention", "extend_attention_reference"]

_LOG2E = 1.4426950408889634


def _validate(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
              seq_lens: torch.Tensor, extend_lens: torch.Tensor, cu_extend: torch.Tensor, max_extend_len: int,
              sm_scale: float, k_new: torch.Tensor | None, v_new: torch.Tensor | None) -> None:
    op = "extend_attention"
    _, _, hkv, d, _ = check_attention_inputs(op, q, k_cache, v_cache, "[T, num_q_heads, head_dim]")
    b = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    check_int_vector(op, "seq_lens", seq_lens, None)
    check_int_vector(op, "extend_lens", extend_lens, b)
    check_int_vector(op, "cu_extend", cu_extend, b + 1)
    check_page_table(op, "page_table", page_table, b)
    if not isinstance(max_extend_len, int) or max_extend_len < 0:
        raise ValueError(f"{op}: max_extend_len must be a non-negative int, got {max_extend_len!r}")
    if not isinstance(sm_scale, (float, int)) or not math.isfinite(sm_scale):
        raise ValueError(f"{op}: sm_scale must be a finite float, got {sm_scale!r}")
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{op}: pass both k_new and v_new, or neither")
    if k_new is None or v_new is None:
        return
    expected = (q.shape[0], hkv, d)
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        check_ndim(op, name, x, 3, "[T, num_kv_heads, head_dim]")
        if tuple(x.shape) != expected:
            raise ValueError(f"{op}: {name} has shape {tuple(x.shape)}, expected [T, num_kv_heads, head_dim] = "
                             f"{expected}")
        check_float_dtype(op, name, x, q.dtype)
        check_last_dim_contiguous(op, name, x)
    check_same_device(op, q=q, k_new=k_new, v_new=v_new)


def extend_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               page_table: torch.Tensor, seq_lens: torch.Tensor, extend_lens: torch.Tensor,
                               cu_extend: torch.Tensor, max_extend_len: int, sm_scale: float, *,
                               k_new: torch.Tensor | None = None,
                               v_new: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch path (fp32 inside, output [T, Hq, D] in q.dtype). Reads the lengths on the host.

    With k_new/v_new the new tokens' keys/values come from them and only the prefix from the pages.
    """
    _validate(q, k_cache, v_cache, page_table, seq_lens, extend_lens, cu_extend, max_extend_len, sm_scale,
              k_new, v_new)
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
        paged = prefix if k_new is not None else length
        k = gather_pages(k_cache, page_table[i : i + 1], paged)[0, :paged]  # [paged, Hkv, D]
        v = gather_pages(v_cache, page_table[i : i + 1], paged)[0, :paged]
        if k_new is not None and v_new is not None:
            k = torch.cat([k, k_new[s : s + e].float()])
            v = torch.cat([v, v_new[s : s + e].float()])
        qi = q[s : s + e].float().transpose(0, 1)  # [Hq, E, D]
        out = _causal_attention_fp32(qi, k.transpose(0, 1), v.transpose(0, 1), prefix, sm_scale)
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
    try:  # host-side TMA descriptors (Triton >= 3.4; the interpreter emulates them)
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # pragma: no cover
        TensorDescriptor = None

    @triton.jit
    def _softmax_step(q, k, v, m_i, l_i, acc, qk_scale, allowed,
                      MASKED: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
        """Fold one key block (k, v [BLOCK_N, BLOCK_D]) into the online softmax; MASKED keeps only
        the scores where `allowed` [BLOCK_M or 1, BLOCK_N] holds."""
        if DOT_F32:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DOT_F32:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _load_rows(k_ptr, v_ptr, k_off, v_off, valid,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr):
        """K, V [BLOCK_N, BLOCK_D] from rows at element offsets k_off / v_off (contiguous along D);
        rows where `valid` is false read as 0, MASKED=False promises every row is valid."""
        offs_d = tl.arange(0, BLOCK_D)
        k_ptrs = k_ptr + k_off[:, None] + offs_d[None, :]
        v_ptrs = v_ptr + v_off[:, None] + offs_d[None, :]
        if MASKED or D != BLOCK_D:
            mask = valid[:, None] & (offs_d < D)[None, :]
            k = tl.load(k_ptrs, mask=mask, other=0.0)
            v = tl.load(v_ptrs, mask=mask, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        return k, v

    @triton.jit
    def _load_paged(k_cache_ptr, v_cache_ptr, page_row_ptr, pos, valid, kvh,
                    HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
                    MASKED: tl.constexpr):
        """K, V of key positions `pos` [BLOCK_N], each gathered through the page table."""
        if MASKED:
            page = tl.load(page_row_ptr + pos // PAGE_SIZE, mask=valid, other=0)
        else:
            page = tl.load(page_row_ptr + pos // PAGE_SIZE)
        off = (page.to(tl.int64) * PAGE_SIZE + pos % PAGE_SIZE) * (HKV * D) + kvh * D
        return _load_rows(k_cache_ptr, v_cache_ptr, off, off, valid, D, BLOCK_D, MASKED)

    @triton.jit
    def _load_new(k_new, v_new, k_cache_ptr, v_cache_ptr, page_row_ptr, q_start, prefix, j, e, kvh,
                  stride_kt, stride_kh, stride_vt, stride_vh,
                  HKV: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  PAGE_SIZE: tl.constexpr, NEW_KV: tl.constexpr, MASKED: tl.constexpr):
        """K, V of new keys j .. j + BLOCK_N - 1 (those < e are valid): rows q_start + j of k_new /
        v_new (NEW_KV 2: TMA descriptors, 1: pointers), or positions prefix + j of the pages (0)."""
        offs_n = j + tl.arange(0, BLOCK_N)
        valid = offs_n < e
        if NEW_KV == 2:
            # TMA zero-fills rows past T; rows of the next request are masked out by the caller.
            row = (q_start + j).to(tl.int32)
            k = k_new.load([row, kvh * D])
            v = v_new.load([row, kvh * D])
        elif NEW_KV == 1:
            rows = q_start + offs_n
            k, v = _load_rows(k_new, v_new, rows * stride_kt + kvh * stride_kh, rows * stride_vt + kvh * stride_vh,
                              valid, D, BLOCK_D, MASKED)
        else:
            k, v = _load_paged(k_cache_ptr, v_cache_ptr, page_row_ptr, prefix + offs_n, valid, kvh,
                               HKV, D, BLOCK_D, PAGE_SIZE, MASKED)
        return k, v

    @triton.jit
    def _extend_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, k_new, v_new, o_ptr, page_table_ptr, seq_lens_ptr, extend_lens_ptr,
        cu_extend_ptr, mid_o_ptr, mid_lse_ptr,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_pt, stride_kt, stride_kh, stride_vt,
        stride_vh, qk_scale, num_m_blocks, num_splits,
        HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
        NEW_KV: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    ):
        # Largest m first: under the causal mask later query blocks carry more keys, so starting
        # them first shortens the tail of the grid. With SPLIT, axis 0 is (m, split): num_splits
        # programs per query block. (num_splits is a runtime value: each count would otherwise
        # compile a kernel of its own while serving.)
        m = num_m_blocks - 1 - tl.program_id(0) // num_splits
        split = tl.program_id(0) % num_splits
        last = split == num_splits - 1
        h = tl.program_id(1)
        b = tl.program_id(2)
        e = tl.load(extend_lens_ptr + b)
        if m * BLOCK_M >= e:
            return
        prefix = tl.load(seq_lens_ptr + b) - e
        q_start = tl.load(cu_extend_ptr + b).to(tl.int64)
        kvh = h // G

        offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)  # query index j within the request's new tokens
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        io_mask = (offs_m < e)[:, None] & (offs_d < D)[None, :]
        q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=io_mask, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        page_row = page_table_ptr + b.to(tl.int64) * stride_pt

        # 1. Prefix keys, from the pages: all precede every query, so only the tail block is masked.
        #    Split s walks its share [start, end) (a multiple of BLOCK_N long); the tail block is the last's.
        prefix_full = (prefix // BLOCK_N) * BLOCK_N
        share = tl.cdiv(tl.cdiv(prefix, num_splits), BLOCK_N) * BLOCK_N
        start = split * share
        end = tl.minimum(start + share, prefix)
        for n in range(start, tl.maximum(start, tl.minimum(end, prefix_full)), BLOCK_N):
            k, v = _load_paged(k_cache_ptr, v_cache_ptr, page_row, n + offs_n, n + offs_n < prefix, kvh,
                               HKV, D, BLOCK_D, PAGE_SIZE, False)
            m_i, l_i, acc = _softmax_step(q, k, v, m_i, l_i, acc, qk_scale, None, False, DOT_F32, PRECISION)
        if (prefix_full < prefix) & (prefix_full >= start) & (end == prefix):
            pos = prefix_full + offs_n
            k, v = _load_paged(k_cache_ptr, v_cache_ptr, page_row, pos, pos < prefix, kvh,
                               HKV, D, BLOCK_D, PAGE_SIZE, True)
            m_i, l_i, acc = _softmax_step(q, k, v, m_i, l_i, acc, qk_scale, (pos < prefix)[None, :], True,
                                          DOT_F32, PRECISION)
        # 2. New keys before the tile's first query: seen by every row (the last split's).
        for j in range(0, tl.where(last, m * BLOCK_M, 0), BLOCK_N):
            k, v = _load_new(k_new, v_new, k_cache_ptr, v_cache_ptr, page_row, q_start, prefix, j, e, kvh,
                             stride_kt, stride_kh, stride_vt, stride_vh,
                             HKV, D, BLOCK_N, BLOCK_D, PAGE_SIZE, NEW_KV, False)
            m_i, l_i, acc = _softmax_step(q, k, v, m_i, l_i, acc, qk_scale, None, False, DOT_F32, PRECISION)
        # 3. Diagonal blocks: causal mask; keys from e on belong to the next request (or to no one).
        for j in range(m * BLOCK_M, tl.where(last, tl.minimum((m + 1) * BLOCK_M, e), m * BLOCK_M), BLOCK_N):
            k, v = _load_new(k_new, v_new, k_cache_ptr, v_cache_ptr, page_row, q_start, prefix, j, e, kvh,
                             stride_kt, stride_kh, stride_vt, stride_vh,
                             HKV, D, BLOCK_N, BLOCK_D, PAGE_SIZE, NEW_KV, True)
            keys = j + offs_n
            allowed = (keys[None, :] <= offs_m[:, None]) & (keys < e)[None, :]
            m_i, l_i, acc = _softmax_step(q, k, v, m_i, l_i, acc, qk_scale, allowed, True, DOT_F32, PRECISION)
        nonempty = l_i > 0.0
        o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        if not SPLIT:
            tl.store(o_ptr + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                     o.to(o_ptr.dtype.element_ty), mask=io_mask)
        else:
            # Partial results for decode_attention's stage 2: mid_o [T, Hq, S, D], mid_lse [T, Hq, S]
            # fp32, lse in log2 units (-inf for a split with no keys).
            lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
            row = ((q_start + offs_m) * (HKV * G) + h) * num_splits + split
            tl.store(mid_o_ptr + row[:, None] * D + offs_d[None, :], o, mask=io_mask)
            tl.store(mid_lse_ptr + row, lse, mask=offs_m < e)


def _default_config(head_dim: int, dtype: torch.dtype, interpreted: bool, query_tiles: int,
                    sm_count: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); `query_tiles` = (BLOCK_M = 128) tiles x heads.

    Measured on an H100 (benchmarks/kernels/bench_kernels.py, causal 2k-8k tokens and a 4k cached
    prefix + 512 new, 32 heads, bf16, new keys through TMA): d128 is fastest with 128 x 128 tiles
    (8 warps, 3 stages) once there are >= 4 tiles per SM (438-499 TFLOP/s at 4k-8k tokens) and
    with 64 x 64 (4 warps) below that (338 vs 311 TFLOP/s at 2k); d64 with 128 x 64 (8 warps,
    3 stages) from 8 tiles per SM (8k tokens: 374 TFLOP/s), 64 x 64 (4 warps, 3 stages) below
    that (2k / 4k tokens: 274 / 349 vs 232 / 328 TFLOP/s with 128 x 64), 4 stages where there are
    fewer tiles than two per SM.
    """
    if interpreted:
        return 32, 16, 4, 1
    if dtype == torch.float32:
        return 64, 32, 4, 2
    if head_dim <= 64:
        if query_tiles >= 8 * sm_count:
            return 128, 64, 8, 3
        return (64, 64, 4, 3) if query_tiles >= 2 * sm_count else (64, 64, 4, 4)
    return (128, 128, 8, 3) if query_tiles >= 4 * sm_count else (64, 64, 4, 3)


@functools.lru_cache(maxsize=8)
def _has_tma(device_index: int) -> bool:
    """TMA (the bulk tensor copy engine) exists from compute capability 9 (Hopper) on."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _tma_blocker(x: torch.Tensor, block_d: int, interpreted: bool) -> str | None:
    """Why k_new / v_new cannot be read with a TMA descriptor over its 2D view [T, Hkv * D], or None."""
    d = x.shape[2]
    if TensorDescriptor is None:
        return "this Triton has no triton.tools.tensor_descriptor"
    if not interpreted and not (x.is_cuda and _has_tma(x.get_device())):
        return "TMA needs a GPU of compute capability >= 9"
    if d != block_d:
        return f"head_dim {d} is not a power of 2 >= 16 (a box would read the next head)"
    if x.shape[1] > 1 and x.stride(1) != d:
        return f"heads are not adjacent (stride(1) {x.stride(1)} != head_dim {d})"
    if x.data_ptr() % 16 or (x.stride(0) * x.element_size()) % 16:
        return "base pointer or row stride is not 16-byte aligned"
    return None


def extend_attention_impl(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                          seq_lens: torch.Tensor, extend_lens: torch.Tensor, cu_extend: torch.Tensor,
                          max_extend_len: int, sm_scale: float, *, k_new: torch.Tensor | None = None,
                          v_new: torch.Tensor | None = None, block_m: int | None = None,
                          block_n: int | None = None, num_warps: int | None = None,
                          num_stages: int | None = None, use_tma: bool | None = None,
                          num_splits: int | None = None) -> torch.Tensor:
    """Launch with optional tuning overrides (tests, benchmarks); inputs already validated.

    use_tma: None reads k_new/v_new through TMA descriptors where possible (sm90+ or the
    interpreter, see `_tma_blocker`), else with pointer loads; True insists, False never does.
    num_splits: None picks it (`choose_extend_splits`); > 1 splits each tile's prefix keys
    over that many programs and merges their partial results in decode_attention's stage 2.
    """
    t, hq, d = q.shape
    _, page_size, hkv, _ = k_cache.shape
    o = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    b = seq_lens.shape[0]
    if t == 0 or b == 0 or max_extend_len == 0:
        return o
    interpreted = is_interpreted(_extend_kernel)
    bm, bn, nw, ns = _default_config(d, q.dtype, interpreted, triton.cdiv(max_extend_len, 128) * hq * b,
                                     num_sms(q.device))
    bm, bn = block_m or bm, block_n or bn
    if bm % bn or bn < 16:
        # tl.dot needs every dimension >= 16 on the GPU; loops 2 and 3 assume BLOCK_N divides BLOCK_M.
        raise ValueError(f"extend_attention: need BLOCK_N >= 16 dividing BLOCK_M, got {bm}, {bn}")
    nw, ns = num_warps or nw, num_stages or ns
    block_d = max(16, next_power_of_2(d))
    new_kv, k_arg, v_arg, new_strides = 0, k_cache, v_cache, (0, 0, 0, 0)  # 0: new keys from the pages
    if k_new is not None and v_new is not None:
        new_strides = (k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1))
        blocker = _tma_blocker(k_new, block_d, interpreted) or _tma_blocker(v_new, block_d, interpreted)
        if use_tma and blocker:
            raise ValueError(f"extend_attention: use_tma=True but {blocker}")
        if use_tma is not False and blocker is None:
            new_kv = 2
            k_arg, v_arg = (TensorDescriptor(x, [t, hkv * d], [x.stride(0), 1], [bn, block_d]) for x in (k_new, v_new))
        else:
            new_kv, k_arg, v_arg = 1, k_new, v_new
    elif use_tma:
        raise ValueError("extend_attention: use_tma=True needs k_new and v_new")
    dot_f32, precision = dot_flags(q.dtype, interpreted)
    num_m_blocks = triton.cdiv(max_extend_len, bm)
    splits = num_splits or choose_extend_splits(
        min(num_m_blocks * b, triton.cdiv(t, bm) + b) * hq, page_table.shape[1] * page_size, num_sms(q.device),
        resident_programs(bm, bn, block_d, ns, q.element_size(), q.device))
    if splits > 1:
        mid_o = torch.empty((t, hq, splits, d), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((t, hq, splits), dtype=torch.float32, device=q.device)
    else:
        mid_o = mid_lse = o  # unread
    _extend_kernel[(num_m_blocks * splits, hq, b)](
        q, k_cache, v_cache, k_arg, v_arg, o, page_table, seq_lens, extend_lens, cu_extend, mid_o, mid_lse,
        q.stride(0), q.stride(1), o.stride(0), o.stride(1), page_table.stride(0), *new_strides,
        float(sm_scale) * _LOG2E, num_m_blocks, splits,
        HKV=hkv, G=hq // hkv, D=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, PAGE_SIZE=page_size,
        NEW_KV=new_kv, DOT_F32=dot_f32, PRECISION=precision, SPLIT=splits > 1, num_warps=nw, num_stages=ns,
    )
    if splits > 1:
        launch_merge_splits(mid_o, mid_lse, o, None)
    return o


def choose_extend_splits(programs: int, max_keys: int, sm_count: int, per_sm: int = 2,
                         min_keys_per_split: int = 512, max_splits: int = 16) -> int:
    """Prefix splits for a launch of about `programs` (tile, head) programs over at most
    `max_keys` keys each: 1 once they fill the GPU, else as many as fit one wave (`per_sm`
    programs resident on each SM, `resident_programs`), never splits of fewer than
    `min_keys_per_split` keys. A short new turn over a long cached history is the case: 128
    queries over 8k cached tokens are 64 programs on a 132-SM GPU, each walking 8k keys (the
    layer waits on the slowest SM's stream of 2 MB). One program more than a wave holds costs a
    second wave: measured on an H100 (d128, 2 resident per SM), 4 splits 83 us, 5 splits 111."""
    if programs >= sm_count:
        return 1
    want = per_sm * sm_count // max(1, programs)
    return max(1, min(want, max_keys // min_keys_per_split, max_splits))


def resident_programs(block_m: int, block_n: int, block_d: int, num_stages: int, element_size: int,
                      device: torch.device) -> int:
    """Extend programs of one tile configuration that an SM holds at once, by shared memory:
    `num_stages` buffers of a K and a V block plus the query tile (an estimate of what Triton
    allocates; registers bind later at these tile sizes)."""
    smem = (num_stages * 2 * block_n + block_m) * block_d * element_size
    return max(1, _smem_per_sm(device) // smem)


@functools.lru_cache(maxsize=8)
def _smem_per_sm_of(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_multiprocessor", 0)) or 228 * 1024


def _smem_per_sm(device: torch.device) -> int:
    if device.type != "cuda":
        return 228 * 1024  # the interpreter: an H100's, so CPU tests choose as the GPU would
    return _smem_per_sm_of(device.index if device.index is not None else torch.cuda.current_device())


def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                     seq_lens: torch.Tensor, extend_lens: torch.Tensor, cu_extend: torch.Tensor,
                     max_extend_len: int, sm_scale: float, *, k_new: torch.Tensor | None = None,
                     v_new: torch.Tensor | None = None) -> torch.Tensor:
    """Triton path, same contract as `extend_attention_reference`.

    `max_extend_len` must be >= max(extend_lens) (it sizes the grid; longer requests would be
    cut off). It is not checked against the device tensor: that would synchronize. Neither is
    that k_new/v_new hold what the cache holds for the new tokens (the caller's promise).
    """
    require_triton("extend_attention")
    _validate(q, k_cache, v_cache, page_table, seq_lens, extend_lens, cu_extend, max_extend_len, sm_scale,
              k_new, v_new)
    new_kv = {} if k_new is None or v_new is None else {"k_new": k_new, "v_new": v_new}
    check_launch_device("extend_attention", _extend_kernel, q=q, k_cache=k_cache, v_cache=v_cache,
                        page_table=page_table, seq_lens=seq_lens, extend_lens=extend_lens, cu_extend=cu_extend,
                        **new_kv)
    check_last_dim_contiguous("extend_attention", "q", q)
    return extend_attention_impl(q, k_cache, v_cache, page_table, seq_lens, extend_lens, cu_extend,
                                 max_extend_len, sm_scale, **new_kv)
