"""Paged attention ops: Triton (interpreted on CPU) vs the PyTorch reference vs float64 oracles."""

from __future__ import annotations

import importlib

import pytest
import torch

from kernel_test_utils import DEVICE, TOL, assert_close, gpu, make_paged_batch, naive_extend
from radixserve.kernels import (
    decode_attention,
    decode_attention_reference,
    extend_attention,
    extend_attention_reference,
    merge_attention_states,
    merge_attention_states_reference,
    shared_prefix_decode_attention,
    shared_prefix_decode_attention_reference,
)

decode_mod = importlib.import_module("radixserve.kernels.decode_attention")
extend_mod = importlib.import_module("radixserve.kernels.extend_attention")
shared_mod = importlib.import_module("radixserve.kernels.shared_prefix_attention")

# (seq_lens, extend_lens): decode rows, a long prefill, prefix hits, and lengths that end exactly
# on / just past a page boundary for page sizes 4 and 16.
MIXED = ([17, 40, 37, 32, 33, 1], [1, 40, 5, 16, 33, 1])
# For the three key loops of the kernel (prefix, new keys before the tile, diagonal): prefixes
# 53 and 63 end mid-page (P 4, 16, 64) and mid-block, a zero-length extend (50, 0), decode rows,
# and extends of 22 and 40 that span two query tiles of 16 or 32 rows.
THREE_LOOPS = ([75, 9, 1, 50, 23, 64, 70], [22, 9, 1, 0, 7, 1, 40])


def _extend_args(b):
    return (b.q, b.k_cache, b.v_cache, b.page_table, b.seq_lens, b.extend_lens, b.cu_extend,
            b.max_extend_len, b.sm_scale)


def _new_kv(b):
    """{k_new, v_new} [T, Hkv, D]: what the cache holds for each request's new tokens, in q's order."""
    seq, ext = b.seq_lens.tolist(), b.extend_lens.tolist()
    return {name: torch.cat([x[n - e :] for x, n, e in zip(dense, seq, ext)]).to(b.q.device)
            for name, dense in (("k_new", b.dense_k), ("v_new", b.dense_v))}


# ---------------------------------------------------------------- extend attention

@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_extend_reference_matches_dense_float64(page_size, group):
    b = make_paged_batch(*MIXED, page_size=page_size, num_kv_heads=2, group=group, head_dim=16, device="cpu",
                         seed=page_size * 10 + group)
    out = extend_attention_reference(*_extend_args(b))
    assert out.dtype == b.q.dtype
    assert_close(out, naive_extend(b), 1e-5, "reference vs float64")


@pytest.mark.parametrize("page_size,group", [(1, 3), (4, 1), (16, 4)])
def test_extend_triton_matches_reference_fp32(page_size, group):
    b = make_paged_batch(*MIXED, page_size=page_size, num_kv_heads=2, group=group, head_dim=16, seed=group)
    expected = extend_attention_reference(*_extend_args(b))
    assert_close(extend_attention(*_extend_args(b)), expected, TOL[torch.float32], "triton vs reference")


def test_extend_triton_small_blocks_odd_head_dim():
    # Several key blocks in both phases (BLOCK_N 16 < prefix), head_dim 24 (not a power of 2).
    b = make_paged_batch([75, 40], [22, 40], page_size=4, num_kv_heads=1, group=3, head_dim=24, seed=5)
    expected = extend_attention_reference(*_extend_args(b))
    out = extend_mod.extend_attention_impl(*_extend_args(b), block_m=16, block_n=16)
    assert_close(out, expected, TOL[torch.float32], "small blocks")


@pytest.mark.parametrize("page_size,group,source", [(1, 1, "pointers"), (16, 4, "tma"), (64, 2, "tma"),
                                                     (64, 3, "pointers"), (16, 2, "pages")])
def test_extend_triton_three_loops_fp32(page_size, group, source):
    b = make_paged_batch(*THREE_LOOPS, page_size=page_size, num_kv_heads=2, group=group, head_dim=16,
                         seed=page_size + group)
    new_kv = {} if source == "pages" else _new_kv(b)
    expected = naive_extend(b)
    assert_close(extend_attention_reference(*_extend_args(b), **new_kv), expected, 1e-5, "reference vs float64")
    out = extend_mod.extend_attention_impl(*_extend_args(b), **new_kv, block_m=16, block_n=16,
                                           use_tma=None if source == "pages" else source == "tma")
    assert_close(out, expected, TOL[torch.float32], f"triton ({source}) vs float64")


@pytest.mark.parametrize("page_size,splits,source", [(4, 2, "tma"), (16, 3, "pointers"), (1, 5, "pages")])
def test_extend_triton_prefix_splits(page_size, splits, source):
    # Prefix keys split over several programs per tile (shares ending mid-page and mid-block,
    # empty shares past short prefixes, a zero prefix), merged by stage 2.
    b = make_paged_batch(*THREE_LOOPS, page_size=page_size, num_kv_heads=2, group=2, head_dim=16,
                         seed=page_size + splits)
    new_kv = {} if source == "pages" else _new_kv(b)
    out = extend_mod.extend_attention_impl(*_extend_args(b), **new_kv, block_m=16, block_n=16, num_splits=splits,
                                           use_tma=None if source == "pages" else source == "tma")
    assert_close(out, naive_extend(b), TOL[torch.float32], f"{splits} splits ({source}) vs float64")


def test_choose_extend_splits():
    choose = extend_mod.choose_extend_splits
    # 128 queries x 32 heads over 8k cached: one wave of 2 (d128 tiles) or 3 (d64) programs per SM
    assert choose(64, 8320, 132, per_sm=2) == 4 and choose(64, 8320, 132, per_sm=3) == 6
    assert choose(132, 8320, 132) == 1  # the grid fills the GPU already
    assert choose(64, 700, 132) == 1  # shares of at least 512 keys
    assert choose(1, 1 << 20, 132) == 16
    # Shared memory per program: 3 stages of 64-key K and V blocks + a 64-query tile, bf16, d128
    # = 112 KiB, two on an H100's 228 KiB; d64 with 4 stages = 72 KiB, three.
    cpu = torch.device("cpu")
    assert extend_mod.resident_programs(64, 64, 128, 3, 2, cpu) == 2
    assert extend_mod.resident_programs(64, 64, 64, 4, 2, cpu) == 3


@pytest.mark.parametrize("use_tma", [False, True])
def test_extend_triton_reads_new_kv_from_k_new(use_tma):
    # k_new/v_new differ from the cache here only to show which source each key came from: the
    # kernel must read the prefix from the pages and the new tokens from k_new/v_new.
    b = make_paged_batch([40, 23], [21, 23], page_size=4, num_kv_heads=1, group=2, head_dim=16, seed=13)
    new_kv = {name: torch.randn_like(x) for name, x in _new_kv(b).items()}
    expected = extend_attention_reference(*_extend_args(b), **new_kv)
    assert (expected - extend_attention_reference(*_extend_args(b))).abs().max() > 0.1
    out = extend_mod.extend_attention_impl(*_extend_args(b), **new_kv, use_tma=use_tma)
    assert_close(out, expected, TOL[torch.float32], f"use_tma={use_tma}")


def test_extend_new_kv_strided_and_fallbacks():
    b = make_paged_batch([20, 9], [20, 3], page_size=4, num_kv_heads=2, group=2, head_dim=16, seed=4)
    new_kv = _new_kv(b)
    expected = extend_attention_reference(*_extend_args(b))
    # Views of a fused QKV projection [T, Hq + 2 Hkv, D]: heads adjacent, TMA-compatible.
    qkv = torch.cat([b.q, new_kv["k_new"], new_kv["v_new"]], 1)
    args = list(_extend_args(b))
    args[0] = qkv[:, :4]
    views = {"k_new": qkv[:, 4:6], "v_new": qkv[:, 6:]}
    assert_close(extend_mod.extend_attention_impl(*args, **views, use_tma=True), expected, TOL[torch.float32])
    # Heads not adjacent (stride(1) != D): no 2D view for TMA, pointer loads by default.
    wide = {name: torch.cat([x, x], 2)[..., :16] for name, x in new_kv.items()}
    assert_close(extend_attention(*_extend_args(b), **wide), expected, TOL[torch.float32], "stride(1) != D")
    with pytest.raises(ValueError, match="stride"):
        extend_mod.extend_attention_impl(*_extend_args(b), **wide, use_tma=True)
    with pytest.raises(ValueError, match="needs k_new"):
        extend_mod.extend_attention_impl(*_extend_args(b), use_tma=True)
    # head_dim 24 (not a power of 2): a TMA box would read the next head, pointer loads by default.
    b = make_paged_batch([40, 5], [22, 5], page_size=4, num_kv_heads=1, group=3, head_dim=24, seed=6)
    out = extend_mod.extend_attention_impl(*_extend_args(b), **_new_kv(b), block_m=16, block_n=16)
    assert_close(out, naive_extend(b), TOL[torch.float32], "head_dim 24")


def test_extend_new_kv_validation():
    b = make_paged_batch([9, 5], [4, 5], page_size=4, num_kv_heads=2, group=1, head_dim=16)
    kv = _new_kv(b)
    bad_inputs = [
        ({"k_new": kv["k_new"]}, ValueError, "both"),
        ({"k_new": kv["k_new"][:-1], "v_new": kv["v_new"][:-1]}, ValueError, "shape"),
        ({"k_new": kv["k_new"][:, :1], "v_new": kv["v_new"]}, ValueError, "shape"),
        ({"k_new": kv["k_new"][0], "v_new": kv["v_new"][0]}, ValueError, "k_new"),
        ({"k_new": kv["k_new"].half(), "v_new": kv["v_new"]}, TypeError, "k_new"),
        ({"k_new": kv["k_new"], "v_new": kv["v_new"].transpose(1, 2).contiguous().transpose(1, 2)}, ValueError,
         "contiguous"),
    ]
    for fn in (extend_attention, extend_attention_reference):
        for new_kv, exc, match in bad_inputs:
            with pytest.raises(exc, match=match):
                fn(*_extend_args(b), **new_kv)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_extend_triton_half_precision(dtype):
    b = make_paged_batch(*MIXED, page_size=4, num_kv_heads=2, group=2, head_dim=32, dtype=dtype, seed=7)
    out = extend_attention(*_extend_args(b))
    assert out.dtype == dtype
    assert_close(out, naive_extend(b).to(out.device), TOL[dtype], f"triton {dtype} vs float64")
    out = extend_attention(*_extend_args(b), **_new_kv(b))
    assert_close(out, naive_extend(b).to(out.device), TOL[dtype], f"triton {dtype} with k_new vs float64")
    assert_close(extend_attention_reference(*_extend_args(b)), naive_extend(b).to(out.device), TOL[dtype],
                 f"reference {dtype} vs float64")


def test_extend_strided_q_from_fused_qkv():
    b = make_paged_batch([20, 9], [20, 3], page_size=4, num_kv_heads=1, group=2, head_dim=16, seed=3)
    qkv = torch.randn(b.q.shape[0], 4, 16, device=b.q.device)
    qkv[:, :2] = b.q
    q_view = qkv[:, :2]
    assert not q_view.is_contiguous()
    args = list(_extend_args(b))
    args[0] = q_view
    assert_close(extend_attention(*args), extend_attention_reference(*_extend_args(b)), TOL[torch.float32])


@pytest.mark.parametrize("head_dim", [64, 128], ids=["d64", "d128"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_extend_gpu_sizes(head_dim, dtype, page_size):
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    seq = [1500, 700, 2048, 129, 1, 64, 1000]
    ext = [1500, 300, 2048, 1, 1, 63, 0]
    b = make_paged_batch(seq, ext, page_size=page_size, num_kv_heads=4, group=4, head_dim=head_dim, dtype=dtype)
    expected = extend_attention_reference(*_extend_args(b))
    assert_close(extend_attention(*_extend_args(b)), expected, TOL[dtype], "pages")
    new_kv = _new_kv(b)
    assert_close(extend_attention(*_extend_args(b), **new_kv), expected, TOL[dtype], "k_new (TMA on sm90+)")
    out = extend_mod.extend_attention_impl(*_extend_args(b), **new_kv, use_tma=False)
    assert_close(out, expected, TOL[dtype], "k_new, pointer loads")
    out = extend_mod.extend_attention_impl(*_extend_args(b), **new_kv, num_splits=4)
    assert_close(out, expected, TOL[dtype], "k_new, 4 prefix splits")


def test_extend_short_turn_over_long_prefix_gpu():
    # 128 new tokens over 8k cached ones: the default launch splits the prefix keys.
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    b = make_paged_batch([8320, 3000], [128, 1], page_size=16, num_kv_heads=8, group=4, head_dim=64,
                         dtype=torch.bfloat16)
    new_kv = _new_kv(b)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert extend_mod.choose_extend_splits(2 * 32 + 32, 8320, sms) > 1
    expected = extend_attention_reference(*_extend_args(b), **new_kv)
    assert_close(extend_attention(*_extend_args(b), **new_kv), expected, TOL[torch.bfloat16], "default (split)")


for _mark in gpu:
    test_extend_gpu_sizes = _mark(test_extend_gpu_sizes)
    test_extend_short_turn_over_long_prefix_gpu = _mark(test_extend_short_turn_over_long_prefix_gpu)


# ---------------------------------------------------------------- decode attention

DECODE_LENS = [1, 4, 16, 17, 31, 64, 65, 100]


def _decode_batch(page_size, group, dtype=torch.float32, lens=DECODE_LENS, hkv=2, d=16, seed=0, device=DEVICE):
    b = make_paged_batch(lens, [1] * len(lens), page_size=page_size, num_kv_heads=hkv, group=group,
                         head_dim=d, dtype=dtype, seed=seed, device=device)
    return b


def _decode_args(b, max_seq_len=None):
    return (b.q, b.k_cache, b.v_cache, b.page_table, b.seq_lens, b.sm_scale,
            b.max_seq_len if max_seq_len is None else max_seq_len)


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_decode_reference_matches_dense_float64(page_size, group):
    b = _decode_batch(page_size, group, seed=page_size + group, device="cpu")
    expected = naive_extend(b)
    assert_close(decode_attention_reference(*_decode_args(b)), expected, 1e-5, "reference vs float64")
    # A loose upper bound (e.g. a CUDA-graph capacity) changes nothing.
    assert_close(decode_attention_reference(*_decode_args(b, b.max_seq_len + 37)), expected, 1e-5, "loose bound")


@pytest.mark.parametrize("page_size,group,splits", [(1, 4, 1), (4, 3, 3), (16, 1, 2), (16, 4, 5)])
def test_decode_triton_matches_reference_fp32(page_size, group, splits):
    b = _decode_batch(page_size, group, seed=splits)
    expected = decode_attention_reference(*_decode_args(b))
    out, lse = decode_mod.paged_decode_with_lse(*_decode_args(b), with_lse=True, num_splits=splits, block_n=16)
    assert_close(out, expected, TOL[torch.float32], f"{splits} splits")
    _, lse_ref = decode_mod._decode_reference_fp32(*_decode_args(b), True)
    assert_close(lse, lse_ref.to(lse.device), 1e-5, "lse")
    # Without lse, one split writes o from stage 1 (no scratch, no stage 2).
    out, _ = decode_mod.paged_decode_with_lse(*_decode_args(b), with_lse=False, num_splits=splits, block_n=16)
    assert_close(out, expected, TOL[torch.float32], f"{splits} splits, no lse")


def test_decode_public_launcher_default_tuning():
    b = _decode_batch(4, 2, seed=11)
    assert_close(decode_attention(*_decode_args(b, 4096)), decode_attention_reference(*_decode_args(b)),
                 TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_triton_half_precision(dtype):
    b = _decode_batch(4, 4, dtype=dtype, d=32, seed=2)
    expected = naive_extend(b).to(b.q.device)
    out, _ = decode_mod.paged_decode_with_lse(*_decode_args(b), with_lse=False, num_splits=2, block_n=16)
    assert out.dtype == dtype
    assert_close(out, expected, TOL[dtype], "triton")
    assert_close(decode_attention_reference(*_decode_args(b)), expected, TOL[dtype], "reference")


def test_decode_empty_sequence_gives_zeros():
    # A padded batch row (seq_len 0, e.g. CUDA-graph padding) must give 0, not nan.
    b = _decode_batch(4, 2, lens=[5, 9])
    seq = b.seq_lens.clone()
    seq[1] = 0
    args = list(_decode_args(b))
    args[4] = seq
    for fn in (decode_attention, decode_attention_reference):
        out = fn(*args)
        assert torch.isfinite(out).all()
        assert out[1].abs().max() == 0


@pytest.mark.parametrize("page_size", [1, 16])
def test_decode_gpu_sizes(page_size):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    lens = [4096, 1, 17, 3000, 65, 8191, 128, 129]
    b = _decode_batch(page_size, 4, dtype=torch.bfloat16, lens=lens, hkv=8, d=128)
    assert_close(decode_attention(*_decode_args(b)), decode_attention_reference(*_decode_args(b)),
                 TOL[torch.bfloat16])


for _mark in gpu:
    test_decode_gpu_sizes = _mark(test_decode_gpu_sizes)


# ---------------------------------------------------------------- shared prefix (cascade)

def _cascade_case(page_size, group, groups, suffixes, dtype=torch.float32, hkv=2, d=16, seed=0, device=DEVICE):
    """groups: prefix length (a multiple of page_size) per group; suffixes: per group, the
    suffix lengths of its requests. Returns (args, full-sequence PagedBatch for oracles)."""
    seq, owner = [], []
    for g, (plen, sufs) in enumerate(zip(groups, suffixes)):
        assert plen % page_size == 0
        for s in sufs:
            seq.append(plen + s)
            owner.append(g)
    b = make_paged_batch(seq, [1] * len(seq), page_size=page_size, num_kv_heads=hkv, group=group, head_dim=d,
                         dtype=dtype, seed=seed, device=device)
    # Make the requests of a group really share their prefix pages: copy the first request's.
    pt = b.page_table.clone()
    first = {}
    for r, g in enumerate(owner):
        npg = groups[g] // page_size
        if g in first:
            pt[r, :npg] = pt[first[g], :npg]
        else:
            first[g] = r
    b.page_table = pt
    # Rebuild the dense K/V through the shared table (the oracle reads what the kernels read).
    pos_all = [torch.arange(n) for n in seq]
    pt_cpu = pt.cpu()
    b.dense_k = [b.k_cache.cpu()[pt_cpu[r, p // page_size].long(), p % page_size] for r, p in enumerate(pos_all)]
    b.dense_v = [b.v_cache.cpu()[pt_cpu[r, p // page_size].long(), p % page_size] for r, p in enumerate(pos_all)]
    prefix_pages = max(groups) // page_size
    prefix_pt = torch.zeros(len(groups), max(prefix_pages, 1), dtype=torch.int32, device=device)
    for g, r in first.items():
        prefix_pt[g, : groups[g] // page_size] = pt[r, : groups[g] // page_size]
    max_suffix_pages = max(-(-(n - groups[owner[r]]) // page_size) for r, n in enumerate(seq)) + 1
    suffix_pt = torch.zeros(len(seq), max_suffix_pages, dtype=torch.int32, device=device)
    for r, n in enumerate(seq):
        start = groups[owner[r]] // page_size
        npg = -(-n // page_size) - start
        suffix_pt[r, :npg] = pt[r, start : start + npg]
    counts = [len(s) for s in suffixes]
    cu_groups = torch.tensor([0] + list(torch.cumsum(torch.tensor(counts), 0).tolist()), dtype=torch.int32,
                             device=device)
    suffix_lens = torch.tensor([n - groups[owner[r]] for r, n in enumerate(seq)], dtype=torch.int32, device=device)
    args = (b.q, b.k_cache, b.v_cache, prefix_pt, torch.tensor(groups, dtype=torch.int32, device=device), cu_groups,
            suffix_pt, suffix_lens, b.sm_scale, max(groups), int(suffix_lens.max()), max(counts))
    return args, b


CASCADE = ([16, 32, 0, 8], [[1, 5, 17], [4], [3, 9], [1, 2, 3, 4, 5, 6]])


@pytest.mark.parametrize("page_size,group", [(1, 3), (4, 1), (8, 4)])
def test_shared_prefix_reference_matches_float64(page_size, group):
    args, b = _cascade_case(page_size, group, *CASCADE, device="cpu", seed=page_size)
    expected = naive_extend(b)
    assert_close(shared_prefix_decode_attention_reference(*args), expected, 1e-5, "cascade reference")
    # ... and equals plain decode attention over the whole sequence.
    assert_close(decode_attention_reference(*_decode_args(b)), expected, 1e-5, "decode reference")


@pytest.mark.parametrize("one_launch", [False, True], ids=["launches", "one_launch"])
@pytest.mark.parametrize("page_size,group,splits", [(1, 3, (1, 1)), (4, 4, (2, 3)), (8, 1, (3, 1))])
def test_shared_prefix_triton_matches_reference(page_size, group, splits, one_launch):
    args, b = _cascade_case(page_size, group, *CASCADE, seed=page_size + 1)
    expected = shared_prefix_decode_attention_reference(*args)
    # One suffix split: the suffix kernel merges the prefix parts and writes o (no stage 2);
    # one launch: the last program to finish a row merges it.
    out = shared_mod.shared_prefix_impl(*args, prefix_splits=splits[0], suffix_splits=splits[1], block_n=16,
                                        one_launch=one_launch)
    assert_close(out, expected, TOL[torch.float32], "cascade triton")
    # Tiles holding fewer requests than a group (request blocks) must give the same result.
    out = shared_mod.shared_prefix_impl(*args, block_m=16 if group <= 4 else None, block_n=16,
                                        one_launch=one_launch)
    assert_close(out, expected, TOL[torch.float32], "cascade triton, small tiles")
    assert_close(shared_prefix_decode_attention(*args), expected, TOL[torch.float32], "public launcher")


def test_shared_prefix_one_launch_padded_and_after_bad_rows():
    """The one-launch kernel with empty group slots and padding rows (no tokens), as a CUDA
    graph of a larger batch passes them; and right after a launch whose groups cover no row
    (a graph's warm-up on zeroed buffers), whose arrival counts must not carry over."""
    args, _ = _cascade_case(4, 2, [8, 0], [[3, 1], [2]], seed=3)
    q, k, v, prefix_pt, prefix_lens, cu_groups, suffix_pt, suffix_lens = args[:8]
    pad = 2  # two padding rows, each its own empty group
    q = torch.cat([q, torch.zeros(pad, *q.shape[1:], device=q.device)])
    suffix_pt = torch.cat([suffix_pt, torch.zeros(pad, suffix_pt.shape[1], dtype=torch.int32, device=q.device)])
    suffix_lens = torch.cat([suffix_lens, torch.zeros(pad, dtype=torch.int32, device=q.device)])
    prefix_pt = torch.cat([prefix_pt, torch.zeros(pad, prefix_pt.shape[1], dtype=torch.int32, device=q.device)])
    prefix_lens = torch.cat([prefix_lens, torch.zeros(pad, dtype=torch.int32, device=q.device)])
    cu_groups = torch.cat([cu_groups, cu_groups[-1:] + torch.arange(1, pad + 1, dtype=torch.int32,
                                                                    device=q.device)])
    padded = (q, k, v, prefix_pt, prefix_lens, cu_groups, suffix_pt, suffix_lens, *args[8:])
    expected = shared_prefix_decode_attention_reference(*padded)
    tune = dict(prefix_splits=2, suffix_splits=3, block_n=16, one_launch=True)
    no_rows = (*padded[:5], torch.zeros_like(cu_groups), *padded[6:])
    shared_mod.shared_prefix_impl(*no_rows, **tune)
    out = shared_mod.shared_prefix_impl(*padded, **tune)
    assert_close(out, expected, TOL[torch.float32], "one launch, padded")
    assert not out[-pad:].any(), "padding rows attend to nothing"


def test_shared_prefix_triton_bf16():
    args, b = _cascade_case(4, 4, *CASCADE, dtype=torch.bfloat16, d=32, seed=9)
    out = shared_prefix_decode_attention(*args)
    assert out.dtype == torch.bfloat16
    assert_close(out, naive_extend(b).to(out.device), TOL[torch.bfloat16])


def test_merge_attention_states():
    gen = torch.Generator().manual_seed(0)
    o1, o2 = torch.randn(2, 3, 5, 8, generator=gen).to(DEVICE).unbind(0)
    lse1, lse2 = (torch.randn(2, 3, 5, generator=gen) * 3).to(DEVICE).unbind(0)
    lse2 = lse2.clone()
    lse2[0, 0] = float("-inf")  # an empty second part: result is the first part
    lse1 = lse1.clone()
    lse1[1, 1] = float("-inf")
    lse2[1, 1] = float("-inf")  # both empty: 0, not nan
    w1 = torch.exp(lse1.double())
    w2 = torch.exp(lse2.double())
    tot = (w1 + w2).clamp_min(1e-300)
    expected = (o1.double() * (w1 / tot)[..., None] + o2.double() * (w2 / tot)[..., None])
    for fn in (merge_attention_states, merge_attention_states_reference):
        o, lse = fn(o1.contiguous(), lse1.contiguous(), o2.contiguous(), lse2.contiguous())
        assert torch.isfinite(o).all()
        assert_close(o, expected.to(o.device), 1e-6, fn.__name__)
        assert torch.equal(o[0, 0], o1[0, 0]) or (o[0, 0] - o1[0, 0]).abs().max() < 1e-6
        assert lse[1, 1] == float("-inf")


def test_shared_prefix_gsp_like_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    groups = [2048] * 4
    suffixes = [[128 + i for i in range(16)]] * 4
    args, _ = _cascade_case(16, 4, groups, suffixes, dtype=torch.bfloat16, hkv=8, d=128)
    expected = shared_prefix_decode_attention_reference(*args)
    assert_close(shared_prefix_decode_attention(*args), expected, TOL[torch.bfloat16])
    # Programs racing to merge on the GPU: every launch right.
    for one_launch in (False, True):
        for splits in ((16, 2), (3, 7)):
            for _ in range(20):
                out = shared_mod.shared_prefix_impl(*args, prefix_splits=splits[0], suffix_splits=splits[1],
                                                    one_launch=one_launch)
            assert_close(out, expected, TOL[torch.bfloat16], f"one_launch={one_launch} splits={splits}")


for _mark in gpu:
    test_shared_prefix_gsp_like_gpu = _mark(test_shared_prefix_gsp_like_gpu)


# ---------------------------------------------------------------- validation

def test_attention_validation_errors():
    b = _decode_batch(4, 2, lens=[5, 9])
    args = list(_decode_args(b))
    for fn in (decode_attention, decode_attention_reference):
        bad = list(args)
        bad[4] = b.seq_lens.long()
        with pytest.raises(TypeError, match="seq_lens"):
            fn(*bad)
        bad = list(args)
        bad[0] = b.q[:, :3]  # 3 query heads over 2 KV heads
        with pytest.raises(ValueError, match="multiple"):
            fn(*bad)
        bad = list(args)
        bad[0] = b.q.double()
        with pytest.raises(TypeError):
            fn(*bad)
        bad = list(args)
        bad[2] = b.v_cache[:, :2]
        with pytest.raises(ValueError, match="shape"):
            fn(*bad)
        bad = list(args)
        bad[3] = b.page_table[:1]
        with pytest.raises(ValueError, match="rows"):
            fn(*bad)
    e = make_paged_batch([5], [5], page_size=4, num_kv_heads=1, group=1, head_dim=8)
    bad = list(_extend_args(e))
    bad[6] = e.cu_extend[:1]
    with pytest.raises(ValueError, match="cu_extend"):
        extend_attention(*bad)
