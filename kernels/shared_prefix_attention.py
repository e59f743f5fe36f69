"""Shared-prefix (cascade) decode attention: read a common prefix's KV once per group.

Requests that share a prefix (a system prompt, a retrieved document, a forked program) hold
the same KV pages for it. Plain decode attention reads those pages once per request; here the
prefix is read once per group for all of the group's queries, and each request's own suffix
(the rest of its sequence, always including the token being decoded) is read separately:

    group g: requests cu_groups[g] .. cu_groups[g+1]-1 (contiguous rows of q; sort by group)
        prefix: prefix_lens[g] tokens through prefix_page_table[g]       -> (o_p, lse_p)
                one program tile = (several requests) x (Hq/Hkv heads of one KV head) rows,
                so the shared K/V block feeds a [rows, D] x [D, BLOCK_N] tensor-core product
    request r: suffix_lens[r] tokens through suffix_page_table[r]       -> (o_s, lse_s)
    o = merge: lse = log(e^lse_p + e^lse_s);  o = o_p e^(lse_p - lse) + o_s e^(lse_s - lse)

Token t of the prefix is at prefix_page_table[g][t // P] * P + t % P, token t of the suffix at
suffix_page_table[r][t // P] * P + t % P: the two parts are independent paged sequences, so a
prefix that ends mid-page needs its suffix table to continue on a private copy of that page.
With the radix cache, shared prefixes are whole pages, so the suffix table is simply the rest
of the request's page table (page_table[r, prefix_len // P:]).

Contract of `shared_prefix_decode_attention(q, k_cache, v_cache, prefix_page_table, prefix_lens,
cu_groups, suffix_page_table, suffix_lens, sm_scale, max_prefix_len, max_suffix_len,
max_group_size) -> o [B, Hq, D]`:
    q [B, Hq, D]; prefix_page_table [G, max_prefix_pages] int32; prefix_lens [G] int32 (0 allowed);
    cu_groups [G+1] int32, cu_groups[0] = 0, cu_groups[G] = B, non-decreasing (every request in
    exactly one group; a request that shares nothing is a group of one with prefix_len 0);
    suffix_page_table [B, max_suffix_pages] int32; suffix_lens [B] int32;
    host ints max_prefix_len >= max(prefix_lens), max_suffix_len >= max(suffix_lens),
    max_group_size >= max group size (they size grids and gathers; no device sync).
The result equals decode attention over the concatenated sequence prefix + suffix.

The Triton path launches one of two ways, both writing every part of a row (prefix splits,
then suffix splits) to an fp32 scratch [B, Hq, parts, D] and merging by lse:

    small and medium batches, one launch: prefix programs and suffix programs in one grid; each
        counts itself in on its rows (an atomic per row and head, on counts zeroed for this
        launch), and the program that brings a row's count to `parts` merges that row. No
        launch gaps between the parts and no merge launch: what a 32-row decode step needs,
        where each kernel is a few microseconds. (The counts are zeroed by every call, not
        left at zero by the last one: a launch whose rows break the contract, such as a CUDA
        graph's warm-up on placeholder inputs, must not corrupt the launches after it.)
    large batches, two launches: the prefix kernel, then the suffix kernel with one split per
        row, which merges the prefix parts into its own and writes o.

`merge_attention_states(o1, lse1, o2, lse2) -> (o, lse)` merges two partial attentions over
disjoint key sets: o [..., D] normalized outputs, lse [...] fp32 natural-log sum of
exp(scaled scores) (-inf for an empty part). The Triton cascade merges its parts itself, so
the helper is for other composition.
"""

from __future__ import annotations

import math

import torch

from ._attention_common import (
    check_attention_inputs,
    check_int_vector,
    check_page_table,
    gather_pages,
)
from ._attention_common import merge_states
from ._common import (
    HAS_TRITON,
    check_contiguous,
    check_float_dtype,
    check_launch_device,
    check_last_dim_contiguous,
    is_interpreted,
    next_power_of_2,
    require_triton,
    tl,
    triton,
)
from .decode_attention import (
    _decode_reference_fp32,
    choose_num_splits,
    dot_flags,
    launch_decode_splits,
    launch_merge_splits,
    num_sms,
)

if HAS_TRITON:
    from .decode_attention import _paged_partial_attention, _request_split_part

__all__ = [
    "shared_prefix_decode_attention",
    "shared_prefix_decode_attention_reference",
    "merge_attention_states",
    "merge_attention_states_reference",
]

_LOG2E = 1.4426950408889634


def _validate(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_page_table: torch.Tensor,
              prefix_lens: torch.Tensor, cu_groups: torch.Tensor, suffix_page_table: torch.Tensor,
              suffix_lens: torch.Tensor, sm_scale: float, max_prefix_len: int, max_suffix_len: int,
              max_group_size: int) -> None:
    op = "shared_prefix_decode_attention"
    check_attention_inputs(op, q, k_cache, v_cache, "[B, num_q_heads, head_dim]")
    b = q.shape[0]
    check_int_vector(op, "prefix_lens", prefix_lens, None)
    g = prefix_lens.shape[0]
    check_page_table(op, "prefix_page_table", prefix_page_table, g)
    check_int_vector(op, "cu_groups", cu_groups, g + 1)
    check_page_table(op, "suffix_page_table", suffix_page_table, b)
    check_int_vector(op, "suffix_lens", suffix_lens, b)
    for name, value in (("max_prefix_len", max_prefix_len), ("max_suffix_len", max_suffix_len),
                        ("max_group_size", max_group_size)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{op}: {name} must be a non-negative int, got {value!r}")
    if not isinstance(sm_scale, (float, int)) or not math.isfinite(sm_scale):
        raise ValueError(f"{op}: sm_scale must be a finite float, got {sm_scale!r}")


def shared_prefix_decode_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_page_table: torch.Tensor,
    prefix_lens: torch.Tensor, cu_groups: torch.Tensor, suffix_page_table: torch.Tensor, suffix_lens: torch.Tensor,
    sm_scale: float, max_prefix_len: int, max_suffix_len: int, max_group_size: int,
) -> torch.Tensor:
    """PyTorch path (fp32 inside): the prefix of each group is gathered once for its requests."""
    _validate(q, k_cache, v_cache, prefix_page_table, prefix_lens, cu_groups, suffix_page_table, suffix_lens,
              sm_scale, max_prefix_len, max_suffix_len, max_group_size)
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    gq = hq // hkv
    o_p = torch.zeros(b, hq, d, device=q.device)
    lse_p = torch.full((b, hq), float("-inf"), device=q.device)
    cu = cu_groups.tolist()
    lens = prefix_lens.tolist()
    for g, length in enumerate(lens):
        r0, r1 = cu[g], cu[g + 1]
        n = r1 - r0
        if n <= 0 or length == 0:
            continue
        k = gather_pages(k_cache, prefix_page_table[g : g + 1], length)[0, :length]  # [L, Hkv, D]
        v = gather_pages(v_cache, prefix_page_table[g : g + 1], length)[0, :length]
        # All n requests x gq heads of KV head h form the rows of one product with the prefix.
        qg = q[r0:r1].float().view(n, hkv, gq, d).permute(1, 0, 2, 3).reshape(hkv, n * gq, d)
        scores = torch.matmul(qg, k.permute(1, 2, 0)) * sm_scale  # [Hkv, n*gq, L]
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.matmul(torch.exp(scores - lse[..., None]), v.transpose(0, 1))  # [Hkv, n*gq, D]
        o_p[r0:r1] = out.view(hkv, n, gq, d).permute(1, 0, 2, 3).reshape(n, hq, d)
        lse_p[r0:r1] = lse.view(hkv, n, gq).permute(1, 0, 2).reshape(n, hq)
    o_s, lse_s = _decode_reference_fp32(q, k_cache, v_cache, suffix_page_table, suffix_lens, sm_scale,
                                        max_suffix_len, True)
    o, _ = merge_states(o_p, lse_p, o_s, lse_s)
    return o.to(q.dtype)


def _validate_merge(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> None:
    op = "merge_attention_states"
    for name, t in (("o1", o1), ("o2", o2), ("lse1", lse1), ("lse2", lse2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor")
    if o1.dim() < 1 or o1.shape != o2.shape:
        raise ValueError(f"{op}: o1 {tuple(o1.shape)} and o2 {tuple(o2.shape)} must have one shape [..., D]")
    if lse1.shape != o1.shape[:-1] or lse2.shape != o1.shape[:-1]:
        raise ValueError(f"{op}: lse1 {tuple(lse1.shape)} and lse2 {tuple(lse2.shape)} must be "
                         f"{tuple(o1.shape[:-1])} (o's shape without its last dimension)")
    check_float_dtype(op, "o1", o1)
    check_float_dtype(op, "o2", o2, o1.dtype)
    check_float_dtype(op, "lse1", lse1, torch.float32)
    check_float_dtype(op, "lse2", lse2, torch.float32)


def merge_attention_states_reference(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor,
                             lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch path of merge_attention_states (o in o1.dtype, lse fp32)."""
    _validate_merge(o1, lse1, o2, lse2)
    return merge_states(o1, lse1, o2, lse2)




if HAS_TRITON:

    @triton.jit
    def _group_prefix_part(
        q_ptr, k_cache_ptr, v_cache_ptr, prefix_pt_ptr, prefix_lens_ptr, mid_o_ptr, mid_lse_ptr,
        g, kvh, first, r_end, s, col, stride_qb, stride_qh, stride_pt, qk_scale,
        HKV: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
        TOTAL_SPLITS: tl.constexpr, RPB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """Split s of NUM_SPLITS of group g's prefix for up to RPB requests from row `first`
        (rows before r_end) and the GQ query heads of KV head kvh: tile row i is request
        first + i // GQ, query head kvh * GQ + i % GQ, so every K/V block loaded feeds a
        [rows, D] x [D, BLOCK_N] tensor-core product. Stores each row's normalized part and
        log2-sum-exp in scratch column `col`; returns (flat rows b * Hq + head, row mask)."""
        plen = tl.load(prefix_lens_ptr + g)
        split_len = tl.cdiv(tl.cdiv(plen, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = s * split_len
        end = tl.minimum(start + split_len, plen)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        req = first + offs_m // GQ
        head = kvh * GQ + offs_m % GQ
        rmask = (offs_m < RPB * GQ) & (req < r_end)
        io_mask = rmask[:, None] & (offs_d < D)[None, :]
        q = tl.load(q_ptr + req.to(tl.int64)[:, None] * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                    mask=io_mask, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        m_i, l_i, acc = _paged_partial_attention(
            q, k_cache_ptr, v_cache_ptr, prefix_pt_ptr + g.to(tl.int64) * stride_pt, kvh, start, end,
            qk_scale, m_i, l_i, acc, HKV, D, BLOCK_D, BLOCK_N, PAGE_SIZE, DOT_F32, PRECISION,
        )
        nonempty = l_i > 0.0
        o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        rows = req.to(tl.int64) * (HKV * GQ) + head
        tl.store(mid_o_ptr + (rows * TOTAL_SPLITS + col)[:, None] * D + offs_d[None, :], o, mask=io_mask)
        tl.store(mid_lse_ptr + rows * TOTAL_SPLITS + col, lse, mask=rmask)
        return rows, rmask

    @triton.jit
    def _prefix_split_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, prefix_pt_ptr, prefix_lens_ptr, cu_groups_ptr, mid_o_ptr, mid_lse_ptr,
        stride_qb, stride_qh, stride_pt, qk_scale,
        HKV: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
        TOTAL_SPLITS: tl.constexpr, RPB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # Grid (G, Hkv, request blocks x splits); split s goes to scratch column s.
        g = tl.program_id(0)
        kvh = tl.program_id(1)
        rb = tl.program_id(2) // NUM_SPLITS
        s = tl.program_id(2) % NUM_SPLITS
        r_end = tl.load(cu_groups_ptr + g + 1)
        first = tl.load(cu_groups_ptr + g) + rb * RPB
        if first < r_end:
            _group_prefix_part(
                q_ptr, k_cache_ptr, v_cache_ptr, prefix_pt_ptr, prefix_lens_ptr, mid_o_ptr, mid_lse_ptr,
                g, kvh, first, r_end, s, s, stride_qb, stride_qh, stride_pt, qk_scale,
                HKV, GQ, D, NUM_SPLITS, TOTAL_SPLITS, RPB, BLOCK_M, BLOCK_D, BLOCK_N, PAGE_SIZE, DOT_F32, PRECISION,
            )

    @triton.jit
    def _arrive_and_merge(
        mid_o_ptr, mid_lse_ptr, counters_ptr, o_ptr, rows, out_off, mask,
        D: tl.constexpr, BLOCK_D: tl.constexpr, TOTAL_SPLITS: tl.constexpr,
    ):
        """After a program stored its partial for `rows` (flat b * Hq + head): count it in, and
        the program that brings a row's count to TOTAL_SPLITS merges the row's parts and writes
        o. The barrier makes every thread's partial stores precede the gpu-scope release of the
        atomic; the loads after it bypass L1."""
        tl.debug_barrier()
        old = tl.atomic_add(counters_ptr + rows, 1, mask=mask, sem="acq_rel", scope="gpu")
        last = mask & (old == TOTAL_SPLITS - 1)
        if tl.max(last.to(tl.int32), 0) > 0:
            tl.debug_barrier()
            offs_d = tl.arange(0, BLOCK_D)
            io_mask = last[:, None] & (offs_d < D)[None, :]
            cell = rows * TOTAL_SPLITS
            m = tl.full(rows.shape, float("-inf"), tl.float32)
            for j in range(TOTAL_SPLITS):
                m = tl.maximum(m, tl.load(mid_lse_ptr + cell + j, mask=last, other=float("-inf"),
                                          cache_modifier=".cg"))
            m = tl.where(m == float("-inf"), 0.0, m)  # every part empty: weights all 0, output 0
            total = tl.zeros(rows.shape, tl.float32)
            acc = tl.zeros([rows.shape[0], BLOCK_D], tl.float32)
            for j in range(TOTAL_SPLITS):
                w = tl.exp2(tl.load(mid_lse_ptr + cell + j, mask=last, other=float("-inf"), cache_modifier=".cg") - m)
                part = tl.load(mid_o_ptr + (cell + j)[:, None] * D + offs_d[None, :], mask=io_mask, other=0.0,
                               cache_modifier=".cg")
                acc += part * w[:, None]
                total += w
            o = acc / tl.where(total > 0.0, total, 1.0)[:, None]
            tl.store(o_ptr + out_off[:, None] + offs_d[None, :], o.to(o_ptr.dtype.element_ty), mask=io_mask)

    @triton.jit
    def _cascade_one_launch_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, prefix_pt_ptr, prefix_lens_ptr, cu_groups_ptr, suffix_pt_ptr,
        suffix_lens_ptr, mid_o_ptr, mid_lse_ptr, counters_ptr, o_ptr,
        stride_qb, stride_qh, stride_ppt, stride_spt, stride_ob, stride_oh, qk_scale, num_prefix_programs,
        HKV: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr, PREFIX_SPLITS: tl.constexpr,
        SUFFIX_SPLITS: tl.constexpr, RBLOCKS: tl.constexpr, RPB: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
        DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # One grid, prefix programs first: pid < num_prefix_programs is (group, KV head, request
        # block, prefix split) as in _prefix_split_kernel, the rest (request, KV head, suffix
        # split). Every program writes one scratch column of its rows (prefix split s: column s,
        # suffix split s: column PREFIX_SPLITS + s); the last to arrive at a row merges it.
        pid = tl.program_id(0)
        total: tl.constexpr = PREFIX_SPLITS + SUFFIX_SPLITS
        if pid < num_prefix_programs:
            g = pid // (HKV * RBLOCKS * PREFIX_SPLITS)
            rest = pid % (HKV * RBLOCKS * PREFIX_SPLITS)
            kvh = rest // (RBLOCKS * PREFIX_SPLITS)
            rb = (rest // PREFIX_SPLITS) % RBLOCKS
            s = rest % PREFIX_SPLITS
            r_end = tl.load(cu_groups_ptr + g + 1)
            first = tl.load(cu_groups_ptr + g) + rb * RPB
            if first < r_end:
                rows, rmask = _group_prefix_part(
                    q_ptr, k_cache_ptr, v_cache_ptr, prefix_pt_ptr, prefix_lens_ptr, mid_o_ptr, mid_lse_ptr,
                    g, kvh, first, r_end, s, s, stride_qb, stride_qh, stride_ppt, qk_scale,
                    HKV, GQ, D, PREFIX_SPLITS, total, RPB, BLOCK_M, BLOCK_D, BLOCK_N, PAGE_SIZE, DOT_F32, PRECISION,
                )
                # rows = b * Hq + head; o [B, Hq, D] has strides (stride_ob, stride_oh, 1)
                out_off = (rows // (HKV * GQ)) * stride_ob + (rows % (HKV * GQ)) * stride_oh
                _arrive_and_merge(mid_o_ptr, mid_lse_ptr, counters_ptr, o_ptr, rows, out_off, rmask, D, BLOCK_D,
                                  total)
        else:
            sid = pid - num_prefix_programs
            b = sid // (HKV * SUFFIX_SPLITS)
            kvh = (sid // SUFFIX_SPLITS) % HKV
            s = sid % SUFFIX_SPLITS
            o, lse, heads, gmask = _request_split_part(
                q_ptr, k_cache_ptr, v_cache_ptr, suffix_pt_ptr + b.to(tl.int64) * stride_spt,
                tl.load(suffix_lens_ptr + b), b, kvh, s, stride_qb, stride_qh, qk_scale,
                HKV, GQ, D, SUFFIX_SPLITS, BLOCK_G, BLOCK_D, BLOCK_N, PAGE_SIZE, DOT_F32, PRECISION,
            )
            offs_d = tl.arange(0, BLOCK_D)
            rows = b.to(tl.int64) * (HKV * GQ) + heads
            cell = rows * total + PREFIX_SPLITS + s
            tl.store(mid_o_ptr + cell[:, None] * D + offs_d[None, :], o, mask=gmask[:, None] & (offs_d < D)[None, :])
            tl.store(mid_lse_ptr + cell, lse, mask=gmask)
            _arrive_and_merge(mid_o_ptr, mid_lse_ptr, counters_ptr, o_ptr, rows,
                              b.to(tl.int64) * stride_ob + heads * stride_oh, gmask, D, BLOCK_D, total)

    @triton.jit
    def _merge_states_kernel(o1_ptr, lse1_ptr, o2_ptr, lse2_ptr, o_ptr, lse_ptr,
                             D: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        lse1 = tl.load(lse1_ptr + row)
        lse2 = tl.load(lse2_ptr + row)
        m = tl.maximum(lse1, lse2)
        m = tl.where(m == float("-inf"), 0.0, m)
        w1 = tl.exp(lse1 - m)
        w2 = tl.exp(lse2 - m)
        total = w1 + w2
        inv = 1.0 / tl.where(total > 0.0, total, 1.0)
        o1 = tl.load(o1_ptr + row * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
        o2 = tl.load(o2_ptr + row * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
        o = (o1 * w1 + o2 * w2) * inv
        tl.store(o_ptr + row * D + offs_d, o.to(o_ptr.dtype.element_ty), mask=dmask)
        tl.store(lse_ptr + row, tl.where(total > 0.0, m + tl.log(tl.where(total > 0.0, total, 1.0)),
                                         float("-inf")))


def merge_attention_states(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor,
                           lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path: merge two partial attentions; returns (o in o1.dtype, lse fp32)."""
    require_triton("merge_attention_states")
    _validate_merge(o1, lse1, o2, lse2)
    check_launch_device("merge_attention_states", _merge_states_kernel, o1=o1, lse1=lse1, o2=o2, lse2=lse2)
    for name, t in (("o1", o1), ("o2", o2), ("lse1", lse1), ("lse2", lse2)):
        check_contiguous("merge_attention_states", name, t)
    d = o1.shape[-1]
    o = torch.empty_like(o1)
    lse = torch.empty_like(lse1)
    rows = lse1.numel()
    if rows and d:
        _merge_states_kernel[(rows,)](o1, lse1, o2, lse2, o, lse, D=d, BLOCK_D=next_power_of_2(d))
    return o, lse


def shared_prefix_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_page_table: torch.Tensor,
    prefix_lens: torch.Tensor, cu_groups: torch.Tensor, suffix_page_table: torch.Tensor, suffix_lens: torch.Tensor,
    sm_scale: float, max_prefix_len: int, max_suffix_len: int, max_group_size: int,
) -> torch.Tensor:
    """Triton path (see the module docstring for the contract)."""
    require_triton("shared_prefix_decode_attention")
    _validate(q, k_cache, v_cache, prefix_page_table, prefix_lens, cu_groups, suffix_page_table, suffix_lens,
              sm_scale, max_prefix_len, max_suffix_len, max_group_size)
    check_launch_device("shared_prefix_decode_attention", _prefix_split_kernel, q=q, k_cache=k_cache,
                        v_cache=v_cache, prefix_page_table=prefix_page_table, prefix_lens=prefix_lens,
                        cu_groups=cu_groups, suffix_page_table=suffix_page_table, suffix_lens=suffix_lens)
    check_last_dim_contiguous("shared_prefix_decode_attention", "q", q)
    return shared_prefix_impl(q, k_cache, v_cache, prefix_page_table, prefix_lens, cu_groups, suffix_page_table,
                              suffix_lens, sm_scale, max_prefix_len, max_suffix_len, max_group_size)


def shared_prefix_impl(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_page_table: torch.Tensor,
    prefix_lens: torch.Tensor, cu_groups: torch.Tensor, suffix_page_table: torch.Tensor, suffix_lens: torch.Tensor,
    sm_scale: float, max_prefix_len: int, max_suffix_len: int, max_group_size: int, *,
    prefix_splits: int | None = None, suffix_splits: int | None = None, block_m: int | None = None,
    block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
    one_launch: bool | None = None,
) -> torch.Tensor:
    """Launch with optional tuning overrides (tests, benchmarks); inputs already validated.
    `one_launch` picks the single-grid kernel (default: for batches up to ~32 waves of programs)."""
    b, hq, d = q.shape
    _, page_size, hkv, _ = k_cache.shape
    gq = hq // hkv
    groups = prefix_lens.shape[0]
    o = torch.empty((b, hq, d), dtype=q.dtype, device=q.device)
    if b == 0:
        return o
    sms = num_sms(q.device)
    # Rows of a prefix tile: as many whole requests (x gq heads) as fit in up to 64 rows.
    bm = block_m or max(16, min(64, next_power_of_2(max(1, max_group_size) * gq)))
    if bm < gq:
        bm = next_power_of_2(gq)
    rpb = bm // gq
    rblocks = max(1, -(-max_group_size // rpb))
    # Prefix splits sized for the fewest groups that can hold the batch, ceil(B / max_group_size):
    # a CUDA graph passes one group slot per row and most slots are empty, so sizing for the
    # slots would leave 2 real groups of 16 with 2 x Hkv x 2 programs walking 1k tokens each
    # (measured on an H100: 25 us per layer, 0.3 TB/s, slower than reading the prefix per request).
    fewest_groups = min(max(1, groups), -(-b // max(1, max_group_size)))
    has_prefix = groups > 0 and max_prefix_len > 0
    if one_launch is None:
        # One launch up to ~32 waves of one-split suffix programs. Llama-1b's decode graphs on
        # gsp-shaped batches, one launch vs two (bench_kernels.py --only cascade-graph
        # --cascade-groups 2,8,16,32,64, H100): 128 rows 49.6 vs 60.3 us, 256 rows 88.4 vs 95.8,
        # 512 rows 164 vs 171; 32 rows 16.2 us (three launches at their splits: ~20); at 1,024
        # rows two launches win, 317 vs 323.
        one_launch = b * hkv <= 32 * sms
    one_launch = one_launch and has_prefix  # without a prefix there is nothing to launch beside
    if one_launch:
        # One grid holds both parts, so they share its ~2 waves: the prefix splits for about one
        # wave, the suffix splits for what is left (the 32-row graph: 9 and 1 split(s), where
        # the two-launch sizing is 17 and 2).
        sp = prefix_splits or choose_num_splits(fewest_groups * rblocks, hkv, max_prefix_len, sms,
                                                target_programs=sms)
        ss = suffix_splits or choose_num_splits(b, hkv, max_suffix_len, sms,
                                                target_programs=2 * sms - fewest_groups * rblocks * hkv * sp)
    else:  # each launch fills ~2 waves on its own
        sp = prefix_splits or choose_num_splits(fewest_groups * rblocks, hkv, max_prefix_len, sms)
        ss = suffix_splits or choose_num_splits(b, hkv, max_suffix_len, sms)
    block_d = max(16, next_power_of_2(d))  # tl.dot needs K >= 16 on the GPU
    bn = max(16, block_n or (64 if block_d <= 128 else 32))
    dot_f32, precision = dot_flags(q.dtype, is_interpreted(_prefix_split_kernel))
    extra = {}
    if num_warps is not None:
        extra["num_warps"] = num_warps
    if num_stages is not None:
        extra["num_stages"] = num_stages
    if one_launch:
        # One grid: every row's sp prefix parts and ss suffix parts, merged by the last to finish.
        num_prefix_programs = groups * hkv * rblocks * sp
        mid_o = torch.empty((b, hq, sp + ss, d), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((b, hq, sp + ss), dtype=torch.float32, device=q.device)
        _cascade_one_launch_kernel[(num_prefix_programs + b * hkv * ss,)](
            q, k_cache, v_cache, prefix_page_table, prefix_lens, cu_groups, suffix_page_table, suffix_lens,
            mid_o, mid_lse, torch.zeros(b * hq, dtype=torch.int32, device=q.device), o,
            q.stride(0), q.stride(1), prefix_page_table.stride(0), suffix_page_table.stride(0), o.stride(0),
            o.stride(1), float(sm_scale) * _LOG2E, num_prefix_programs,
            HKV=hkv, GQ=gq, D=d, PREFIX_SPLITS=sp, SUFFIX_SPLITS=ss, RBLOCKS=rblocks, RPB=rpb, BLOCK_M=bm,
            BLOCK_G=max(16, next_power_of_2(gq)), BLOCK_D=block_d, BLOCK_N=bn, PAGE_SIZE=page_size,
            DOT_F32=dot_f32, PRECISION=precision, **extra,
        )
        return o
    # Two or three launches: the prefix kernel, the suffix kernel, and the split merge when
    # there are several suffix splits. With one suffix split (large batches) the suffix kernel
    # merges the prefix columns into its own part and writes o; the scratch then holds the
    # prefix columns only. Every cell is written: the prefix kernel writes all splits of every
    # row of a group (the contract puts every row in one), the suffix kernel all of its splits.
    total = sp + ss if ss > 1 else sp
    mid_o = torch.empty((b, hq, total, d), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((b, hq, total), dtype=torch.float32, device=q.device)
    if has_prefix:
        _prefix_split_kernel[(groups, hkv, rblocks * sp)](
            q, k_cache, v_cache, prefix_page_table, prefix_lens, cu_groups, mid_o, mid_lse,
            q.stride(0), q.stride(1), prefix_page_table.stride(0), float(sm_scale) * _LOG2E,
            HKV=hkv, GQ=gq, D=d, NUM_SPLITS=sp, TOTAL_SPLITS=total, RPB=rpb, BLOCK_M=bm, BLOCK_D=block_d,
            BLOCK_N=bn, PAGE_SIZE=page_size, DOT_F32=dot_f32, PRECISION=precision, **extra,
        )
    else:  # no prefix anywhere: the prefix columns are empty parts
        mid_o[:, :, :sp].zero_()
        mid_lse[:, :, :sp].fill_(float("-inf"))
    tune = dict(block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    if ss == 1:
        launch_decode_splits(q, k_cache, v_cache, suffix_page_table, suffix_lens, sm_scale, mid_o, mid_lse, sp, 1,
                             o=o, **tune)
        return o
    launch_decode_splits(q, k_cache, v_cache, suffix_page_table, suffix_lens, sm_scale, mid_o, mid_lse, sp, ss, **tune)
    launch_merge_splits(mid_o, mid_lse, o, None)
    return o
