"""The fast CPU ops (kernels/cpu_ops.py, kernels/cpu_attention.py) against float64 oracles and
the plain references.

Pages are laid out two ways: scattered at random (the gather path) and, after `_relayout`, as
ascending runs per request (the zero-copy view path the allocator usually allows).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernel_test_utils import assert_close, make_paged_batch, naive_extend
from radixserve.kernels import (
    apply_rotary_reference,
    decode_attention_reference,
    extend_attention_reference,
    rope_cos_sin_cache,
    shared_prefix_decode_attention_reference,
)
from radixserve.kernels.cpu_attention import (
    decode_attention_cpu,
    extend_attention_cpu,
    paged_tokens,
    shared_prefix_decode_attention_cpu,
)
from radixserve.kernels.cpu_ops import CPU_OPS, apply_rotary_cpu
from test_kernel_attention import CASCADE, MIXED, _cascade_case, _decode_args, _extend_args

TOL = 1e-5


def _relayout(cache_k: torch.Tensor, cache_v: torch.Tensor, *tables: torch.Tensor, lens: list[list[int]]):
    """Renumber pages in order of first use (rows of `tables` in turn, the first lens[t][r]
    pages of row r), so each row's pages become an ascending run; returns new caches and tables.
    The K/V each row reads is unchanged."""
    order: list[int] = []
    seen: set[int] = set()
    for table, row_lens in zip(tables, lens):
        for row, n in zip(table.tolist(), row_lens):
            for p in row[:n]:
                if p not in seen:
                    seen.add(p)
                    order.append(p)
    order += [p for p in range(cache_k.shape[0]) if p not in seen]
    new_of = torch.empty(len(order), dtype=torch.int32)
    new_of[torch.tensor(order)] = torch.arange(len(order), dtype=torch.int32)
    idx = torch.tensor(order)
    return (cache_k[idx].contiguous(), cache_v[idx].contiguous(), *(new_of[t.long()] for t in tables))


def _pages(lengths, page_size):
    return [-(-n // page_size) for n in lengths]


def _contiguous_batch(b, page_size):
    b.k_cache, b.v_cache, b.page_table = _relayout(b.k_cache, b.v_cache, b.page_table,
                                                   lens=[_pages(b.seq_lens.tolist(), page_size)])
    return b


@pytest.mark.parametrize("contiguous", [False, True], ids=["gathered", "views"])
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_extend_cpu_matches_float64_and_reference(page_size, group, contiguous):
    # Ragged prefixes and extends, plus a request with no new tokens this step.
    seq, ext = MIXED[0] + [9], MIXED[1] + [0]
    b = make_paged_batch(seq, ext, page_size=page_size, num_kv_heads=2, group=group, head_dim=16, device="cpu",
                         seed=page_size * 7 + group)
    if contiguous:
        b = _contiguous_batch(b, page_size)
    out = extend_attention_cpu(*_extend_args(b))
    assert out.dtype == b.q.dtype
    assert_close(out, naive_extend(b), TOL, "cpu vs float64")
    assert_close(out, extend_attention_reference(*_extend_args(b)), TOL, "cpu vs reference")


def test_extend_cpu_long_prefill_chunks():
    # More query rows than one chunk of the masked path (512), over a cached prefix.
    b = make_paged_batch([700, 530], [600, 530], page_size=16, num_kv_heads=1, group=3, head_dim=8, device="cpu",
                         seed=3)
    assert_close(extend_attention_cpu(*_extend_args(b)), naive_extend(b), TOL, "long extend")


@pytest.mark.parametrize("contiguous", [False, True], ids=["gathered", "views"])
@pytest.mark.parametrize("page_size,group", [(1, 1), (4, 3), (16, 4)])
def test_decode_cpu_matches_float64_and_reference(page_size, group, contiguous):
    lens = [1, 4, 16, 17, 31, 64, 65, 100]
    b = make_paged_batch(lens, [1] * len(lens), page_size=page_size, num_kv_heads=2, group=group, head_dim=16,
                         device="cpu", seed=page_size + group)
    if contiguous:
        b = _contiguous_batch(b, page_size)
    expected = naive_extend(b)
    assert_close(decode_attention_cpu(*_decode_args(b)), expected, TOL, "cpu vs float64")
    assert_close(decode_attention_cpu(*_decode_args(b, b.max_seq_len + 37)), expected, TOL, "loose bound")
    assert_close(decode_attention_cpu(*_decode_args(b)), decode_attention_reference(*_decode_args(b)), TOL)


def test_decode_cpu_empty_rows_give_zeros():
    b = make_paged_batch([5, 9, 3], [1, 1, 1], page_size=4, num_kv_heads=2, group=2, head_dim=8, device="cpu")
    args = list(_decode_args(b))
    args[4] = torch.tensor([5, 0, 3], dtype=torch.int32)
    out = decode_attention_cpu(*args)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0
    assert_close(out, decode_attention_reference(*args), TOL)
    args[4] = torch.zeros(3, dtype=torch.int32)
    args[6] = 0
    assert decode_attention_cpu(*args).abs().max() == 0
    empty = decode_attention_cpu(b.q[:0], b.k_cache, b.v_cache, b.page_table[:0], b.seq_lens[:0], b.sm_scale, 9)
    assert empty.shape == (0, *b.q.shape[1:])


def _cascade_contiguous(args, page_size, groups, suffixes):
    q, kc, vc, prefix_pt, prefix_lens, cu, suffix_pt, suffix_lens, *rest = args
    prefix_n = [n // page_size for n in groups]
    suffix_n = _pages(suffix_lens.tolist(), page_size)
    kc, vc, prefix_pt, suffix_pt = _relayout(kc, vc, prefix_pt, suffix_pt, lens=[prefix_n, suffix_n])
    return (q, kc, vc, prefix_pt, prefix_lens, cu, suffix_pt, suffix_lens, *rest)


@pytest.mark.parametrize("contiguous", [False, True], ids=["gathered", "views"])
@pytest.mark.parametrize("page_size,group", [(1, 3), (4, 1), (8, 4)])
def test_shared_prefix_cpu_matches_float64_and_reference(page_size, group, contiguous):
    # CASCADE has a group with an empty prefix and groups of 1..6 requests.
    args, b = _cascade_case(page_size, group, *CASCADE, device="cpu", seed=page_size + 3)
    if contiguous:
        args = _cascade_contiguous(args, page_size, *CASCADE)
        assert_close(shared_prefix_decode_attention_reference(*args), naive_extend(b), TOL, "relayout oracle")
    out = shared_prefix_decode_attention_cpu(*args)
    assert_close(out, naive_extend(b), TOL, "cpu vs float64")
    assert_close(out, shared_prefix_decode_attention_reference(*args), TOL, "cpu vs reference")


def test_paged_tokens_view_and_gather():
    cache = torch.randn(10, 4, 2, 3)
    view = paged_tokens(cache, np.array([3, 4, 5, 0], dtype=np.int32), 10)
    assert view.shape == (10, 2, 3) and view.data_ptr() == cache[3].data_ptr()  # no copy
    torch.testing.assert_close(view, cache[3:6].reshape(12, 2, 3)[:10], rtol=0, atol=0)
    gathered = paged_tokens(cache, np.array([5, 3, 4], dtype=np.int32), 9)
    torch.testing.assert_close(gathered, cache[[5, 3, 4]].reshape(12, 2, 3)[:9], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-qkv", "separate"])
def test_rotary_cpu_bit_identical(dtype, fused):
    t, hq, hkv, d = 7, 6, 2, 16
    cache = rope_cos_sin_cache(d, 64, 10000.0)
    positions = torch.randint(0, 64, (t,), generator=torch.Generator().manual_seed(0))
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=torch.Generator().manual_seed(1)).to(dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    if not fused:
        q, k = q.contiguous(), k.contiguous()
    q_ref, k_ref = apply_rotary_reference(positions, q, k, cache)
    q_out, k_out = apply_rotary_cpu(positions, q, k, cache)
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    assert q_out.dtype == dtype and torch.equal(qkv[:, : hq * d].view(t, hq, d), q)  # inputs untouched


def test_cpu_backend_lays_cpu_ops_over_the_references():
    from radixserve.kernels import REFERENCE_OPS
    from radixserve.runtime.ops import build_ops

    ops = build_ops("cpu")
    for name, ref in REFERENCE_OPS.items():
        if hasattr(ops, name):
            assert getattr(ops, name) is CPU_OPS.get(name, ref)
    # Validation is the references': bad input fails the same way.
    b = make_paged_batch([5], [1], page_size=4, num_kv_heads=1, group=1, head_dim=8, device="cpu")
    with pytest.raises(TypeError, match="page_table must be int32"):
        decode_attention_cpu(b.q, b.k_cache, b.v_cache, b.page_table.long(), b.seq_lens, b.sm_scale, 5)


# ------------------------------------------------- extend with shared prefixes (kernels/cpu_attention.py)

def _share(b, page_size, shares):
    """Make request r read the first n pages of request src ({r: (src, n)}) and rebuild the
    dense K/V the float64 oracle reads from the new table."""
    pt = b.page_table.clone()
    for r, (src, n) in shares.items():
        pt[r, :n] = pt[src, :n]
    b.page_table = pt
    seq = b.seq_lens.tolist()
    b.dense_k = [b.k_cache[pt[r, torch.arange(n) // page_size].long(), torch.arange(n) % page_size]
                 for r, n in enumerate(seq)]
    b.dense_v = [b.v_cache[pt[r, torch.arange(n) // page_size].long(), torch.arange(n) % page_size]
                 for r, n in enumerate(seq)]
    return b


# A gsp step in miniature, in units of 16 tokens so every page size divides the prefixes:
# group A (prefix 32): two followers' questions (5 new), a decode row, a leader's second chunk,
# and one request sharing only A's first 16 tokens; group B (prefix 16) interleaved with A; a
# fresh prompt; a request with nothing new this step.
SHARED_SEQ = [37, 16 + 3, 37, 45, 40, 16 + 3, 9, 12, 16 + 20]
SHARED_EXT = [5, 3, 5, 1, 8, 3, 9, 0, 4]


def _shared_batch(page_size, group, seed):
    b = make_paged_batch(SHARED_SEQ, SHARED_EXT, page_size=page_size, num_kv_heads=2, group=group, head_dim=16,
                         device="cpu", seed=seed)
    a, bb = 32 // page_size, 16 // page_size
    return _share(b, page_size, {2: (0, a), 3: (0, a), 4: (0, a), 8: (0, bb), 5: (1, bb)})


@pytest.mark.parametrize("contiguous", [False, True], ids=["gathered", "views"])
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("group", [1, 3])
def test_extend_cpu_shared_prefixes_match_float64(page_size, group, contiguous):
    b = _shared_batch(page_size, group, seed=page_size + 10 * group)
    if contiguous:
        b = _contiguous_batch(b, page_size)
    expected = naive_extend(b)
    out = extend_attention_cpu(*_extend_args(b))
    assert_close(out, expected, TOL, "cpu vs float64")
    assert_close(out, extend_attention_reference(*_extend_args(b)), TOL, "cpu vs reference")


def test_extend_cpu_plan_groups_by_shared_pages():
    from radixserve.kernels import cpu_attention

    b = _shared_batch(4, 2, seed=0)
    plan = cpu_attention._extend_plan(b.page_table, b.seq_lens, b.extend_lens, b.cu_extend, b.q.shape[0], 4)
    runs = sorted(part.keys.length for part in plan.shared)
    # Group A and the request sharing its first page: 16 tokens in common; group B: 16 too;
    # the fresh prompt and the empty request have no shared run.
    assert runs == [16, 16]
    assert sum(len(range(*p.rows.indices(b.q.shape[0]))) if isinstance(p.rows, slice) else len(p.rows)
               for p in plan.shared) == sum(SHARED_EXT) - 9  # every new token but the fresh prompt's


def test_extend_cpu_singles_when_padding_is_too_large(monkeypatch):
    from radixserve.kernels import cpu_attention

    monkeypatch.setattr(cpu_attention, "_MAX_MASK_ELEMENTS", 1)
    monkeypatch.setattr(cpu_attention, "_extend_plans", cpu_attention._PlanMemo(cpu_attention._extend_plan))
    b = _shared_batch(4, 3, seed=5)
    plan = cpu_attention._extend_plan(b.page_table, b.seq_lens, b.extend_lens, b.cu_extend, b.q.shape[0], 4)
    assert plan.singles and all(bk.e == 1 for bk in plan.buckets)
    assert_close(extend_attention_cpu(*_extend_args(b)), naive_extend(b), TOL, "singles vs float64")


def test_plan_memo_compares_contents_not_identity():
    from radixserve.kernels import cpu_attention

    memo = cpu_attention._PlanMemo(cpu_attention._decode_plan)
    table = torch.tensor([[3, 4, 0], [5, 0, 0]], dtype=torch.int32)
    lens = torch.tensor([9, 2], dtype=torch.int32)
    first = memo.get((table, lens), (16, 4))
    assert memo.get((table.clone(), lens.clone()), (16, 4)) is first  # same contents: reused
    lens[1] = 3  # changed in place (what a reused buffer would do): rebuilt
    assert memo.get((table, lens), (16, 4)) is not first
    assert memo.get((table, lens), (12, 4)) is not memo.get((table, lens), (16, 4))


# ------------------------------------------------------------------ elementwise

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_rms_norm_cpu_matches_float64_and_reference(dtype, with_residual, rows):
    from radixserve.kernels import rms_norm_reference
    from radixserve.kernels.cpu_ops import rms_norm_cpu

    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 96, generator=g) * 3).to(dtype)
    w = torch.randn(96, generator=g).to(dtype)
    res = torch.randn(rows, 96, generator=g).to(dtype) if with_residual else None
    got = rms_norm_cpu(x, w, 1e-6, res)
    want = rms_norm_reference(x, w, 1e-6, res)
    if with_residual:
        assert torch.equal(got[1], want[1])
        got, want = got[0], want[0]
    assert got.dtype == dtype
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)  # other dtypes take the reference (HF's two roundings)
    else:
        h = x.double() + (res.double() if res is not None else 0)
        exact = w.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        assert (got.double() - exact).abs().max() < 1e-5 * exact.abs().max()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_cpu_bit_identical(dtype):
    from radixserve.kernels import silu_and_mul_reference
    from radixserve.kernels.cpu_ops import silu_and_mul_cpu

    x = torch.randn(33, 2 * 48, generator=torch.Generator().manual_seed(2)).to(dtype)
    strided = torch.randn(33, 2 * 48 + 8, generator=torch.Generator().manual_seed(3)).to(dtype)[:, 4:-4]
    for inp in (x, strided):
        assert torch.equal(silu_and_mul_cpu(inp), silu_and_mul_reference(inp))
    with pytest.raises(ValueError, match="even"):
        silu_and_mul_cpu(torch.randn(2, 5))


@pytest.mark.parametrize("groups,suffixes,all_rows,masked", [
    ([16, 16, 0], [[1, 5, 3], [2, 4, 6], [3]], False, False),   # a request with no prefix
    ([16, 12], [[1, 2], [3, 4]], True, True),                  # unequal runs: masked keys
    ([32] * 4, [[9, 10, 11]] * 4, True, False),                # gsp: equal groups
])
def test_shared_prefix_cpu_stacked_groups(groups, suffixes, all_rows, masked):
    from radixserve.kernels import cpu_attention

    args, b = _cascade_case(4, 3, groups, suffixes, device="cpu", seed=len(groups))
    plan = cpu_attention._shared_prefix_plan(*args[3:8], args[10], 4)
    assert plan.stacked is not None
    assert cpu_attention._all_rows(plan.stacked.dest) == all_rows and (plan.stacked.mask is not None) == masked
    out = shared_prefix_decode_attention_cpu(*args)
    assert_close(out, naive_extend(b), TOL, "stacked vs float64")
    assert_close(out, shared_prefix_decode_attention_reference(*args), TOL, "stacked vs reference")


def test_extend_cpu_equal_fresh_prompts_share_one_causal_call():
    from radixserve.kernels import cpu_attention

    b = make_paged_batch([20, 20, 7], [20, 20, 7], page_size=4, num_kv_heads=2, group=3, head_dim=16,
                         device="cpu", seed=11)
    plan = cpu_attention._extend_plan(b.page_table, b.seq_lens, b.extend_lens, b.cu_extend, b.q.shape[0], 4)
    assert [(bk.e, bk.mask is None) for bk in plan.buckets] == [(20, True)] and len(plan.singles) == 1
    assert_close(extend_attention_cpu(*_extend_args(b)), naive_extend(b), TOL, "plain causal bucket")
