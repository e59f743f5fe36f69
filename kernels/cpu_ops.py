"""Fast CPU implementations of the attention and rotary ops (the "cpu" ops backend).

The `*_reference` functions stay the simple, obviously-correct oracle; these are what the CPU
serves with. Same signatures and contracts, same results up to fp32 rounding (rotary is
bit-identical). Where the time went in the references (profile of a batch-32 gsp decode step
with SmolLM2-135M on 2 cores) and what replaces it here:

    reference                                      here
    gather every page of the prefix (a copy)       a view of the cache when the pages are one
                                                   ascending run (how the allocator hands out a
                                                   prompt's pages), a gather otherwise
    scores, scale, logsumexp (amax, sub, exp,      one fused flash-attention call that also
    sum, log), exp, matmul: ~10 ops per part       returns the logsumexp (PyTorch's CPU kernel)
    rotary of q and of k: 2 x 7 ops + 2 cats       q and k rotated together when they are
                                                   adjacent slices of the fused QKV output

Each op on 2 cores pays a fixed threading cost (far more than its arithmetic at these sizes
when the cores are shared), so fewer, fused ops are what makes the CPU path fast.

These functions read the (small) index tensors on the host, which is free on the CPU and is
why they are CPU-only: CUDA uses the Triton kernels.
"""

from __future__ import annotations

import numpy as np
import torch

from ._attention_common import gather_pages, merge_states
from .decode_attention import _validate as _validate_decode
from .extend_attention import _REFERENCE_Q_CHUNK
from .extend_attention import _validate as _validate_extend
from .rotary import _validate as _validate_rotary
from .shared_prefix_attention import _validate as _validate_shared

__all__ = [
    "CPU_OPS",
    "paged_tokens",
    "decode_attention_cpu",
    "shared_prefix_decode_attention_cpu",
    "extend_attention_cpu",
    "apply_rotary_cpu",
]

_NEG_INF = float("-inf")


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, *, causal: bool = False,
           mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [N, Hq, M, D], lse [N, Hq, M] natural log) of q [N, Hq, M, D] over k, v [N, Hkv, L, D].

    PyTorch's fused CPU flash attention: GQA (query head h reads KV head h // (Hq // Hkv)),
    strided inputs and an additive fp32 `mask` broadcast to [N, Hq, M, L]. A row that sees no
    key gets o = 0 and lse = 0 (not -inf): callers that can produce such rows fix the lse.
    """
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=mask, scale=float(sm_scale))


def _host_ints(t: torch.Tensor) -> np.ndarray:
    """A CPU index tensor as a numpy array without a copy (the op is CPU-only)."""
    if t.device.type != "cpu":
        raise ValueError(f"the cpu ops backend needs CPU tensors, got a tensor on {t.device}")
    return t.numpy()


def paged_tokens(cache: torch.Tensor, pages: np.ndarray, num_tokens: int) -> torch.Tensor:
    """[num_tokens, Hkv, D]: the first tokens of a paged sequence whose page row is `pages`.

    A view into `cache` (no copy) when the pages needed are one ascending run p, p+1, ...;
    otherwise a gather of whole pages:

        pages = [7, 8, 9]  ->  cache[7:10].view(3 * P, Hkv, D)[:num_tokens]   (view)
        pages = [7, 2, 9]  ->  cache[[7, 2, 9]].view(3 * P, Hkv, D)[:num_tokens] (copy)
    """
    _, page_size, hkv, d = cache.shape
    n = -(-num_tokens // page_size)
    row = pages[:n]
    if n and int(row[-1]) - int(row[0]) == n - 1 and (n == 1 or bool((np.diff(row) == 1).all())):
        first = int(row[0])
        block = cache[first : first + n]
    else:
        block = cache.index_select(0, torch.from_numpy(row.astype(np.int64)))
    return block.view(n * page_size, hkv, d)[:num_tokens]


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """[L, H, D] -> [1, H, L, D] view, the layout `_flash` takes."""
    return t.transpose(0, 1).unsqueeze(0)


def _length_mask(lens: np.ndarray, length: int) -> torch.Tensor:
    """Additive fp32 mask [R, 1, 1, length]: 0 for the first lens[r] keys of row r, -inf after."""
    past = np.arange(length)[None, :] >= lens[:, None]
    mask = np.where(past, np.float32(_NEG_INF), np.float32(0.0))
    return torch.from_numpy(mask.astype(np.float32))[:, None, None, :]


def _decode_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                 seq_lens: torch.Tensor, sm_scale: float, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (o [B, Hq, D], lse [B, Hq]) of one query per row over its first seq_lens keys;
    rows with no key (or an empty table) get o = 0, lse = -inf."""
    b, hq, d = q.shape
    lens = _host_ints(seq_lens).astype(np.int64)
    length = min(max_seq_len, page_table.shape[1] * k_cache.shape[1])
    if b == 0 or length == 0:
        return q.new_zeros(b, hq, d, dtype=torch.float32), q.new_full((b, hq), _NEG_INF, dtype=torch.float32)
    lens = np.minimum(lens, length)
    # [B, Hkv, length, D] views of gathered copies of whole pages.
    k = gather_pages(k_cache, page_table, length)[:, :length].transpose(1, 2)
    v = gather_pages(v_cache, page_table, length)[:, :length].transpose(1, 2)
    # An empty row sees key 0 (so the kernel is well defined) and is zeroed afterwards.
    mask = _length_mask(np.maximum(lens, 1), length)
    o, lse = _flash(q.float().unsqueeze(2), k, v, sm_scale, mask=mask)
    o, lse = o[:, :, 0], lse[:, :, 0]
    empty = lens == 0
    if empty.any():
        rows = torch.from_numpy(empty)
        o = o.masked_fill(rows[:, None, None], 0.0)
        lse = lse.masked_fill(rows[:, None], _NEG_INF)
    return o, lse


def decode_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                         seq_lens: torch.Tensor, sm_scale: float, max_seq_len: int) -> torch.Tensor:
    """CPU path of `decode_attention` (contract: `decode_attention_reference`)."""
    _validate_decode(q, k_cache, v_cache, page_table, seq_lens, sm_scale, max_seq_len)
    o, _ = _decode_rows(q, k_cache, v_cache, page_table, seq_lens, sm_scale, max_seq_len)
    return o.to(q.dtype)


def shared_prefix_decode_attention_cpu(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_page_table: torch.Tensor,
    prefix_lens: torch.Tensor, cu_groups: torch.Tensor, suffix_page_table: torch.Tensor, suffix_lens: torch.Tensor,
    sm_scale: float, max_prefix_len: int, max_suffix_len: int, max_group_size: int,
) -> torch.Tensor:
    """CPU path of `shared_prefix_decode_attention` (contract: its reference).

    Per group one flash call whose rows are the group's requests x query heads of each KV
    head (`_fold_group`) over the shared prefix, read in place when its pages are contiguous;
    one flash call for all suffixes; then the two parts are merged by their logsumexp.
    """
    _validate_shared(q, k_cache, v_cache, prefix_page_table, prefix_lens, cu_groups, suffix_page_table,
                     suffix_lens, sm_scale, max_prefix_len, max_suffix_len, max_group_size)
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    qf = q.float()
    o_p = torch.zeros(b, hq, d)
    lse_p = torch.full((b, hq), _NEG_INF)
    cu = _host_ints(cu_groups).tolist()
    prefix_pt = _host_ints(prefix_page_table)
    for g, length in enumerate(_host_ints(prefix_lens).tolist()):
        r0, r1 = cu[g], cu[g + 1]
        if r1 <= r0 or length == 0:
            continue
        k = _heads_first(paged_tokens(k_cache, prefix_pt[g], length)).float()
        v = _heads_first(paged_tokens(v_cache, prefix_pt[g], length)).float()
        o, lse = _flash(_fold_group(qf[r0:r1], hkv), k, v, sm_scale)
        o_p[r0:r1] = _unfold_group(o[0], r1 - r0)
        lse_p[r0:r1] = _unfold_group(lse[0][..., None], r1 - r0)[..., 0]
    o_s, lse_s = _decode_rows(q, k_cache, v_cache, suffix_page_table, suffix_lens, sm_scale, max_suffix_len)
    o, _ = merge_states(o_p, lse_p, o_s, lse_s)
    return o.to(q.dtype)


def _fold_group(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """q [n, Hq, D] of n requests -> [1, Hkv, n * G, D]: every KV head's G query heads of all n
    requests as rows of one tile (a copy), which the flash kernel runs faster than the same
    work as Hq heads of n rows (measured 144 vs 171 us for a 512-token prefix, n = 8).

        row (r, g) of KV head h  =  q[r, h * G + g]
    """
    n, hq, d = q.shape
    return q.view(n, hkv, hq // hkv, d).permute(1, 0, 2, 3).reshape(1, hkv, n * (hq // hkv), d)


def _unfold_group(x: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `_fold_group` for a result [Hkv, n * G, C] -> [n, Hq, C]."""
    hkv, rows, c = x.shape
    return x.view(hkv, n, rows // n, c).permute(1, 0, 2, 3).reshape(n, hkv * (rows // n), c)


def _causal_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, sm_scale: float) -> torch.Tensor:
    """q [E, Hq, D] at positions prefix.. over k, v [prefix + E, Hkv, D] -> fp32 [E, Hq, D].

    Without a prefix the mask is the plain causal one; with one, query rows go in chunks whose
    additive mask hides each row's future keys (bottom-right aligned):

        row i (position prefix + lo + i) sees keys 0 .. prefix + lo + i
    """
    e = q.shape[0]
    qh = _heads_first(q.float())
    kh, vh = _heads_first(k.float()), _heads_first(v.float())
    if prefix == 0:
        return _flash(qh, kh, vh, sm_scale, causal=True)[0][0].transpose(0, 1)
    out = torch.empty(e, q.shape[1], q.shape[2])
    for lo in range(0, e, _REFERENCE_Q_CHUNK):
        hi = min(e, lo + _REFERENCE_Q_CHUNK)
        keys = prefix + hi  # no row of this chunk sees past its last position
        future = torch.arange(keys)[None, :] > (prefix + lo + torch.arange(hi - lo))[:, None]
        mask = torch.zeros(future.shape).masked_fill_(future, _NEG_INF)
        o, _ = _flash(qh[:, :, lo:hi], kh[:, :, :keys], vh[:, :, :keys], sm_scale, mask=mask)
        out[lo:hi] = o[0].transpose(0, 1)
    return out


def extend_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                         seq_lens: torch.Tensor, extend_lens: torch.Tensor, cu_extend: torch.Tensor,
                         max_extend_len: int, sm_scale: float) -> torch.Tensor:
    """CPU path of `extend_attention` (contract: `extend_attention_reference`)."""
    _validate_extend(q, k_cache, v_cache, page_table, seq_lens, extend_lens, cu_extend, max_extend_len, sm_scale)
    o = torch.empty_like(q)
    table = _host_ints(page_table)
    seq, ext, starts = (_host_ints(t).tolist() for t in (seq_lens, extend_lens, cu_extend))
    for i, (length, e, s) in enumerate(zip(seq, ext, starts)):
        if e == 0:
            continue
        if not 0 < e <= length:
            raise ValueError(f"extend_attention: request {i} has extend_len {e} and seq_len {length}")
        k = paged_tokens(k_cache, table[i], length)
        v = paged_tokens(v_cache, table[i], length)
        o[s : s + e] = _causal_part(q[s : s + e], k, v, length - e, sm_scale).to(q.dtype)
    return o


def _adjacent_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q [T, Hq, D] and k [T, Hkv, D] as one [T, Hq + Hkv, D] view when k's heads directly
    follow q's in memory (slices of one fused QKV row), else None."""
    t, hq, d = q.shape
    if (k.dtype != q.dtype or k.stride() != q.stride() or q.stride(2) != 1 or q.stride(1) != d
            or k.untyped_storage().data_ptr() != q.untyped_storage().data_ptr()
            or k.data_ptr() != q.data_ptr() + hq * d * q.element_size()):
        return None
    return q.as_strided((t, hq + k.shape[1], d), q.stride())


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[x1 | x2] -> [x1*cos - x2*sin | x2*cos + x1*sin] into a new tensor, with the reference's
    operations in the reference's order (so results are bit-identical) but no concatenation."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    out = torch.empty(xf.shape)
    tmp = torch.empty(x1.shape)
    torch.mul(x1, cos, out=out[..., :half])
    out[..., :half].sub_(torch.mul(x2, sin, out=tmp))
    torch.mul(x2, cos, out=out[..., half:])
    out[..., half:].add_(torch.mul(x1, sin, out=tmp))
    return out.to(x.dtype)


def apply_rotary_cpu(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU path of `apply_rotary` (bit-identical to the reference). Returns new tensors (q_out,
    k_out), which may be two views of one [T, Hq + Hkv, D] buffer."""
    _validate_rotary(positions, q, k, cos_sin_cache)
    half = q.shape[2] // 2
    cs = cos_sin_cache.index_select(0, positions.long()).float()
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    both = _adjacent_heads(q, k)
    if both is None:
        return _rotate(q, cos, sin), _rotate(k, cos, sin)
    out = _rotate(both, cos, sin)
    return out[:, : q.shape[1]], out[:, q.shape[1] :]


# Op name -> CPU implementation; ops not listed here use the reference (see runtime/ops.py).
# The fused kernel is a private aten op (present since torch 2.3, used by SDPA on the CPU): a
# torch without it serves attention with the references instead of failing.
HAS_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")

CPU_OPS = {
    **({
        "decode_attention": decode_attention_cpu,
        "shared_prefix_decode_attention": shared_prefix_decode_attention_cpu,
        "extend_attention": extend_attention_cpu,
    } if HAS_CPU_FLASH else {}),
    "apply_rotary": apply_rotary_cpu,
}
