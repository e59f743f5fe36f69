"""Check every Triton kernel of radixserve.kernels against its reference on the GPU, then time it.

    python benchmarks/kernels/bench_kernels.py            # full run (CUDA required)
    python benchmarks/kernels/bench_kernels.py --quick    # fewer tuning variants
    python benchmarks/kernels/bench_kernels.py --smoke    # tiny sizes; on CPU runs under TRITON_INTERPRET

Figures (BENCHMARKS.md, kernel targets):
  * copy: device-to-device copy bandwidth, bytes read + written (the HBM ceiling)
  * decode: paged split-KV decode attention, batch 64, context 4k, head_dim 128, 32 q / 8 kv
    heads, page 16, bf16: GB/s of KV read, as a fraction of the copy bandwidth (target >= 0.85);
    dense SDPA over the same KV (unpaged) as an anchor
  * extend: causal prefill 2k/4k/8k tokens, 32 heads, head_dim 64 and 128, bf16: TFLOP/s vs torch
    SDPA with the cuDNN and the FlashAttention backends (target >= 0.8x cuDNN, > flash), with the
    new tokens' K/V passed as k_new/v_new (as the engine calls it) and all read from the pages; a
    prefix-heavy shape (4096 cached + 512 new tokens); a config sweep at 4k, best 5 timed per length
  * extend-loads (not in the default --only): where the extend kernel's keys come from, at
    three shapes (4k causal; gsp's prefill chunk, 128 requests x 128 new over 2,048 cached; a
    short turn, 128 new over 8k): new keys by TMA, by pointers, or from the pages; pages of 16
    scattered, of 16 in order, of 64
  * cascade: shared-prefix decode vs plain paged decode on a gsp-like batch (64 groups x 16
    requests, 2048-token shared prefix, 256-token private suffix), and the KV-bytes ratio
  * cascade-graph (not in the default --only): the shared-prefix op at llama-1b's decode-graph
    shapes (`--cascade-groups` groups of 16), one launch vs two and their split counts
  * rms_norm (with residual), silu_and_mul, store_kv: GB/s
Times are medians of triton.testing.do_bench, except the extend rows per length and SDPA's:
device time per call from a CUDA graph of 10 calls (`device_ms`), because at 2k tokens the
kernel is shorter than its Python launcher; the launcher-included wall time is a row of its own.
One table is printed at the end, also when a SIGTERM (the GPU suite's `timeout`) stops the run:
the rows measured so far, and a row naming the section it stopped in.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import statistics
import sys
import time
from typing import Callable

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import radixserve.kernels as K  # noqa: E402
from radixserve.runtime.cuda_graphs import group_cap  # noqa: E402

decode_mod = importlib.import_module("radixserve.kernels.decode_attention")
extend_mod = importlib.import_module("radixserve.kernels.extend_attention")
shared_mod = importlib.import_module("radixserve.kernels.shared_prefix_attention")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ROWS: list[tuple[str, str, str, str]] = []  # (figure, shape, value, note)


def row(figure: str, shape: str, value: str, note: str = "") -> None:
    ROWS.append((figure, shape, value, note))
    print(f"  {figure:<28} {shape:<44} {value:<22} {note}", flush=True)


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds."""
    if DEV == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def device_ms(fn: Callable[[], object], calls: int = 10, reps: int = 30) -> float:
    """Median device milliseconds per call, the host's launch cost taken out: `calls` calls
    captured in one CUDA graph, the graph replayed `reps` times between CUDA events. A kernel
    shorter than its Python launcher (validation, descriptors, Triton's argument handling) is
    otherwise timed by the launcher under `bench`. Falls back to `bench` off CUDA or where the
    call cannot be captured."""
    if DEV != "cuda":
        return bench(fn)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and warm up off the capture
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - report and time it the other way
        print(f"  (not capturable, timed with its launcher: {type(exc).__name__}: {str(exc)[:100]})")
        return bench(fn)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    del graph
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    err = rel_err(got, ref)
    ok = bool(torch.isfinite(got).all()) and err <= tol
    print(f"  check {name:<50} rel err {err:.2e} (tol {tol:.0e}) {'ok' if ok else 'FAIL'}", flush=True)
    if not ok:
        row(f"CHECK FAILED {name}", "", f"{err:.2e}", f"tol {tol:.0e}")
    return err


def paged_kv(seq_lens: list[int], page_size: int, hkv: int, d: int, dtype: torch.dtype,
             extra_pages: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Caches and a page table with each request's pages scattered at random over the pool."""
    pages = [-(-n // page_size) for n in seq_lens]
    num_pages = sum(pages) + extra_pages + 1
    k = torch.randn(num_pages, page_size, hkv, d, device=DEV, dtype=dtype)
    v = torch.randn(num_pages, page_size, hkv, d, device=DEV, dtype=dtype)
    perm = torch.randperm(num_pages, device=DEV)
    table = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32, device=DEV)
    used = 0
    for i, n in enumerate(pages):
        table[i, :n] = perm[used : used + n].int()
        used += n
    return k, v, table


# ------------------------------------------------------------------ copy bandwidth

def bench_copy() -> float:
    n = (1 << 30) if not SMOKE else (1 << 20)
    src = torch.randn(n // 4, device=DEV)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    gbs = 2 * n / ms / 1e6
    row("copy d2d (read+write)", f"{n >> 20} MiB fp32", f"{gbs:,.0f} GB/s")
    return gbs


# ------------------------------------------------------------------ decode

def bench_decode(copy_gbs: float, quick: bool) -> None:
    b, ctx, hq, hkv, d, p = (64, 4096, 32, 8, 128, 16) if not SMOKE else (4, 100, 4, 2, 32, 16)
    dtype = torch.bfloat16
    seq = [ctx] * b
    k, v, table = paged_kv(seq, p, hkv, d, dtype)
    q = torch.randn(b, hq, d, device=DEV, dtype=dtype)
    seq_lens = torch.tensor(seq, dtype=torch.int32, device=DEV)
    scale = d**-0.5
    args = (q, k, v, table, seq_lens, scale, ctx)
    ref = K.decode_attention_reference(*args)
    check("decode bf16 vs reference", K.decode_attention(*args), ref, 2e-2)
    # Mixed lengths, fp32 exact path.
    mseq = [1, 17, 31, 16, 4095, 700, 128, 129] if not SMOKE else [1, 17, 33]
    k32, v32, t32 = paged_kv(mseq, p, hkv, d, torch.float32)
    q32 = torch.randn(len(mseq), hq, d, device=DEV)
    a32 = (q32, k32, v32, t32, torch.tensor(mseq, dtype=torch.int32, device=DEV), scale, max(mseq))
    check("decode fp32 mixed lengths vs reference", K.decode_attention(*a32), K.decode_attention_reference(*a32), 1e-5)

    kv_bytes = 2 * b * ctx * hkv * d * k.element_size()
    shape = f"B{b} ctx{ctx} {hq}/{hkv}h d{d} P{p} bf16"
    default_splits = decode_mod.choose_num_splits(b, hkv, ctx, decode_mod.num_sms(q.device))
    variants: list[dict] = [{}]
    if not SMOKE:
        for splits in ([1, 2, 4, 8] if not quick else [2, 4]):
            for bn in (32, 64, 128):
                for nw, ns in ((4, 2), (8, 3)) if not quick else ((4, 3),):
                    variants.append(dict(num_splits=splits, block_n=bn, num_warps=nw, num_stages=ns))
    results = []
    for var in variants:
        try:
            fn = lambda var=var: decode_mod.paged_decode_with_lse(*args, with_lse=False, **var)  # noqa: E731
            out, _ = fn()
            if rel_err(out, ref) > 2e-2:
                print(f"  decode variant {var} WRONG ({rel_err(out, ref):.2e})")
                continue
            ms = bench(fn)
        except Exception as exc:  # a variant that does not compile (shared memory) is skipped
            print(f"  decode variant {var} failed: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        results.append((ms, var))
        print(f"  decode {str(var or {'default splits': default_splits}):<75} {ms * 1e3:8.1f} us "
              f"{kv_bytes / ms / 1e6:8.0f} GB/s", flush=True)
    ms_default = results[0][0]
    row("decode paged (default)", shape, f"{kv_bytes / ms_default / 1e6:,.0f} GB/s",
        f"{kv_bytes / ms_default / 1e6 / copy_gbs:.0%} of copy; {ms_default * 1e3:.0f} us; splits {default_splits}")
    best_ms, best = min(results, key=lambda r: r[0])
    row("decode paged (best variant)", shape, f"{kv_bytes / best_ms / 1e6:,.0f} GB/s",
        f"{kv_bytes / best_ms / 1e6 / copy_gbs:.0%} of copy; {best_ms * 1e3:.0f} us; {best}")
    # Anchor: dense (unpaged) SDPA decode over the same amount of KV.
    kd = torch.randn(b, hkv, ctx, d, device=DEV, dtype=dtype)
    vd = torch.randn_like(kd)
    q4 = q[:, :, None, :]
    try:
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q4, kd, vd, enable_gqa=True)  # noqa: E731
        ms = bench(fn)
        row("decode dense SDPA (anchor)", shape.replace(f" P{p}", ""), f"{kv_bytes / ms / 1e6:,.0f} GB/s",
            f"{kv_bytes / ms / 1e6 / copy_gbs:.0%} of copy; {ms * 1e3:.0f} us")
    except Exception as exc:
        print(f"  dense SDPA decode failed: {exc}")


# ------------------------------------------------------------------ extend

# (BLOCK_M, BLOCK_N, num_warps, num_stages, use_tma) per head_dim, swept at T4096 with k_new/v_new
# given (as the engine calls it); --quick takes the first 8. The defaults for many query tiles
# come first (kernels/extend_attention.py, `_default_config`).
EXTEND_SWEEP = {
    64: [(128, 64, 8, 3, True), (128, 64, 8, 3, False), (64, 64, 4, 4, True), (128, 64, 8, 2, True),
         (64, 64, 4, 3, True), (64, 32, 4, 3, True), (128, 32, 8, 3, True), (128, 64, 8, 4, True),
         (128, 128, 8, 3, True), (128, 64, 4, 3, True), (128, 32, 4, 4, True), (128, 128, 8, 4, True),
         (128, 64, 8, 5, True), (256, 64, 8, 3, True)],
    128: [(128, 128, 8, 3, True), (128, 128, 8, 3, False), (64, 64, 4, 3, True), (64, 64, 4, 2, True),
          (64, 32, 4, 3, True), (128, 64, 8, 3, True), (64, 64, 8, 3, True), (128, 128, 8, 2, True),
          (128, 64, 8, 4, True), (128, 64, 4, 3, True), (128, 32, 4, 4, True), (64, 64, 4, 4, True),
          (128, 64, 8, 2, True), (128, 128, 4, 2, True)],
}
SMOKE_SWEEP = [(32, 16, 4, 1, True), (32, 16, 4, 1, False)]


def _cfg_kw(cfg: tuple[int, int, int, int, bool]) -> dict:
    return dict(zip(("block_m", "block_n", "num_warps", "num_stages", "use_tma"), cfg))


def _new_kv(k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, seq: list[int], ext: list[int]) -> dict:
    """{k_new, v_new} [T, Hkv, D]: the cache's values at each request's new positions, in q's order."""
    p = k.shape[1]
    pos = [torch.arange(n - e, n, device=DEV) for n, e in zip(seq, ext)]
    slots = torch.cat([table[i, x // p].long() * p + x % p for i, x in enumerate(pos)])
    return {"k_new": k.flatten(0, 1)[slots], "v_new": v.flatten(0, 1)[slots]}


def _extend_batch(seq: list[int], ext: list[int], h: int, hkv: int, d: int, p: int, dtype: torch.dtype,
                  in_order: bool = False):
    """Requests of `seq` tokens each, the last `ext` of them new: (args, {k_new, v_new}, causal
    FLOPs). `in_order`: each request's pages are consecutive pool pages instead of scattered."""
    k, v, table = paged_kv(seq, p, hkv, d, dtype)
    i32 = dict(dtype=torch.int32, device=DEV)
    if in_order:
        used = 0
        for i, n in enumerate(seq):
            pages = -(-n // p)
            table[i, :pages] = torch.arange(used, used + pages, **i32)
            used += pages
    q = torch.randn(sum(ext), h, d, device=DEV, dtype=dtype)
    cu = torch.tensor([0] + torch.cumsum(torch.tensor(ext), 0).tolist(), **i32)
    args = (q, k, v, table, torch.tensor(seq, **i32), torch.tensor(ext, **i32), cu, max(ext), d**-0.5)
    flops = sum(4 * h * d * e * (n - e + (e + 1) / 2) for n, e in zip(seq, ext))
    return args, _new_kv(k, v, table, seq, ext), flops


def _extend_case(t: int, h: int, d: int, p: int, dtype: torch.dtype, prefix: int = 0, hkv: int | None = None):
    """One request of `prefix` cached + t new tokens, `hkv` KV heads (default: as many as query
    heads)."""
    return _extend_batch([prefix + t], [t], h, hkv or h, d, p, dtype)


def _sdpa_ms(t_q: int, t_k: int, h: int, d: int, dtype: torch.dtype) -> dict[str, float]:
    """cuDNN and FlashAttention SDPA over dense [1, h, L, d] tensors, causal mask aligned bottom-right."""
    if DEV != "cuda":
        return {}
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    q = torch.randn(1, h, t_q, d, device=DEV, dtype=dtype)
    k, v = torch.randn(2, 1, h, t_k, d, device=DEV, dtype=dtype).unbind(0)
    mask = dict(is_causal=True) if t_q == t_k else dict(attn_mask=causal_lower_right(t_q, t_k))
    out = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, **mask)  # noqa: E731
                fn()
                out[name] = device_ms(fn)
        except Exception as exc:
            print(f"  sdpa {name} failed: {str(exc)[:120]}")
    return out


def _tflops(ms: float, flops: float) -> str:
    return f"{flops / ms / 1e9:.0f} TFLOP/s"


def _vs_sdpa(sdpa: dict[str, float], ms: float, flops: float) -> str:
    return "; ".join(f"{name} {_tflops(s, flops)}, ours {s / ms:.2f}x" for name, s in sdpa.items())


def _extend_checks(dims: list[int], p: int) -> None:
    """A mixed batch (prefix hits, decode rows, a page-ragged prefill, a zero-length extend) in
    bf16 and fp32, new keys from the pages, from k_new by TMA (sm90+) and by pointers."""
    mseq, mext = ([1500, 700, 2048, 129, 1, 64, 900], [1500, 300, 2048, 1, 1, 63, 0]) if not SMOKE else \
        ([20, 9, 7], [20, 3, 0])
    for dt, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-5)):
        for d in dims:
            args, new_kv, _ = _extend_batch(mseq, mext, 32 if not SMOKE else 2, 8 if not SMOKE else 1, d, p, dt)
            ref = K.extend_attention_reference(*args)
            name = f"extend {dt} d{d} mixed GQA batch"
            check(f"{name}, pages", K.extend_attention(*args), ref, tol)
            check(f"{name}, k_new", K.extend_attention(*args, **new_kv), ref, tol)
            check(f"{name}, k_new pointers", extend_mod.extend_attention_impl(*args, **new_kv, use_tma=False), ref,
                  tol)


def _extend_sweep(t: int, h: int, d: int, p: int, quick: bool) -> list[tuple[int, int, int, int, bool]]:
    """Time the sweep's configs at `t` tokens; returns them fastest first (wrong or uncompilable
    configs are reported and left out)."""
    args, new_kv, flops = _extend_case(t, h, d, p, torch.bfloat16)
    ref = K.extend_attention_reference(*args)
    timed = []
    for cfg in SMOKE_SWEEP if SMOKE else EXTEND_SWEEP[d][: 8 if quick else None]:
        try:
            fn = lambda cfg=cfg: extend_mod.extend_attention_impl(*args, **new_kv, **_cfg_kw(cfg))  # noqa: E731
            err = rel_err(fn(), ref)
            if err > 2e-2:
                print(f"  extend d{d} {cfg} WRONG ({err:.2e})")
                continue
            timed.append((bench(fn), cfg))
        except Exception as exc:  # a config that does not compile (shared memory) is skipped
            print(f"  extend d{d} {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}")
    timed.sort()
    print(f"  extend d{d} T{t} sweep (BLOCK_M, BLOCK_N, warps, stages, tma), fastest first:")
    for ms, cfg in timed:
        print(f"    {str(cfg):<28} {ms * 1e3:9.1f} us {flops / ms / 1e9:7.1f} TFLOP/s", flush=True)
    return [cfg for _, cfg in timed]


def _extend_at_length(t: int, h: int, d: int, p: int, top: list) -> None:
    """Rows for one causal length: the default path with k_new (device time and wall time per
    call), all paged, and the fastest of `top`, each beside cuDNN and FlashAttention SDPA."""
    args, new_kv, flops = _extend_case(t, h, d, p, torch.bfloat16)
    ms_new = device_ms(lambda: K.extend_attention(*args, **new_kv))
    ms_wall = bench(lambda: K.extend_attention(*args, **new_kv))
    ms_paged = device_ms(lambda: K.extend_attention(*args))
    per_cfg = [(device_ms(lambda cfg=cfg: extend_mod.extend_attention_impl(*args, **new_kv, **_cfg_kw(cfg))), cfg)
               for cfg in top]
    print(f"  extend d{d} T{t} top configs: " + "; ".join(f"{c} {_tflops(ms, flops)}" for ms, c in per_cfg))
    sdpa = _sdpa_ms(t, t, h, d, torch.bfloat16)
    shape = f"T{t} causal {h}h P{p} bf16"
    row(f"extend d{d} k_new (default cfg)", shape, _tflops(ms_new, flops), _vs_sdpa(sdpa, ms_new, flops))
    row(f"extend d{d} k_new (default cfg), wall per call", shape, f"{ms_wall * 1e3:.0f} us",
        f"device {ms_new * 1e3:.0f} us; the rest is the Python launcher")
    row(f"extend d{d} all paged (default cfg)", shape, _tflops(ms_paged, flops), f"k_new {ms_paged / ms_new:.2f}x faster")
    if per_cfg:
        ms_best, cfg_best = min(per_cfg)
        row(f"extend d{d} k_new best {cfg_best}", shape, _tflops(ms_best, flops), _vs_sdpa(sdpa, ms_best, flops))


def _extend_prefix_heavy(prefix: int, t: int, h: int, d: int, p: int) -> None:
    """Most keys from the pages: a long cached prompt and a short new turn."""
    args, new_kv, flops = _extend_case(t, h, d, p, torch.bfloat16, prefix=prefix)
    check(f"extend d{d} prefix {prefix} + {t} new, k_new", K.extend_attention(*args, **new_kv),
          K.extend_attention_reference(*args), 2e-2)
    ms_new = device_ms(lambda: K.extend_attention(*args, **new_kv))
    ms_paged = device_ms(lambda: K.extend_attention(*args))
    sdpa = _sdpa_ms(t, prefix + t, h, d, torch.bfloat16)
    shape = f"{prefix} cached + {t} new, {h}h P{p} bf16"
    row(f"extend d{d} prefix-heavy k_new", shape, _tflops(ms_new, flops), _vs_sdpa(sdpa, ms_new, flops))
    row(f"extend d{d} prefix-heavy all paged", shape, _tflops(ms_paged, flops), f"k_new {ms_paged / ms_new:.2f}x faster")


def _extend_short_turn(prefix: int, t: int, h: int, d: int, p: int, quick: bool) -> None:
    """One request's short new turn over a long cached history (cached-prefix TTFT, agent
    turns), with Llama's 4 query heads per KV head: the default launch (prefix keys split over
    several programs) vs one program per tile, and a sweep of split counts and pipeline depths."""
    hkv = max(1, h // 4)
    args, new_kv, flops = _extend_case(t, h, d, p, torch.bfloat16, prefix=prefix, hkv=hkv)
    check(f"extend d{d} short turn {t} over {prefix}", K.extend_attention(*args, **new_kv),
          K.extend_attention_reference(*args), 2e-2)
    ms_split = device_ms(lambda: K.extend_attention(*args, **new_kv))
    ms_one = device_ms(lambda: extend_mod.extend_attention_impl(*args, **new_kv, num_splits=1))
    shape = f"{t} new over {prefix} cached, {h}/{hkv}h P{p} bf16"
    note = f"{flops / ms_split / 1e9:.0f} TFLOP/s; unsplit {ms_one * 1e3:.1f} us ({ms_one / ms_split:.2f}x)"
    if not quick:  # split counts and pipeline depths around the default (64 x 64 tiles, 4 warps here)
        sweep = {}
        for splits in (4, 5, 6, 8, 12, 16):
            for stages in (2, 3, 4):
                sweep[(splits, stages)] = device_ms(lambda: extend_mod.extend_attention_impl(
                    *args, **new_kv, num_splits=splits, num_stages=stages))
        (best_splits, best_stages), best = min(sweep.items(), key=lambda kv: kv[1])
        note += f"; sweep best {best * 1e3:.1f} us at {best_splits} splits, {best_stages} stages"
    row(f"extend d{d} short turn, split prefix", shape, f"{ms_split * 1e3:.1f} us", note)


def bench_extend(quick: bool) -> None:
    h, p = (32, 16) if not SMOKE else (2, 16)
    lengths = [2048, 4096, 8192] if not SMOKE else [40]
    dims = [64, 128] if not SMOKE else [32]
    _extend_checks(dims, p)
    for d in dims:
        _extend_short_turn(*((8192, 128) if not SMOKE else (48, 8)), h, d, p, quick)
    for d in dims:
        # Sweep at one length, then time the 5 fastest configs at every length.
        top = _extend_sweep(4096 if not SMOKE else lengths[0], h, d, p, quick)[:5]
        if not top:
            row(f"extend d{d}", "", "no config ran", "")
            continue
        for t in lengths:
            _extend_at_length(t, h, d, p, top)
        _extend_prefix_heavy(*((4096, 512) if not SMOKE else (48, 8)), h, d, p)


def bench_extend_loads() -> None:
    """Does the extend kernel lose to the page table? The same launch with the new keys read by
    TMA (the engine's path), by pointer loads, or through the pages like the prefix, and with
    the pool's pages scattered, in order, or 64 tokens long."""
    h, hkv = (32, 8) if not SMOKE else (2, 1)
    shapes = {"4k causal": ([4096], [4096]), "gsp chunk 128 x 128 new over 2048": ([2176] * 128, [128] * 128),
              "short turn 128 new over 8192": ([8320], [128])} if not SMOKE else {"smoke": ([40, 24], [40, 8])}
    for d in (64, 128) if not SMOKE else (32,):
        for name, (seq, ext) in shapes.items():
            for p, in_order in ((16, False), (16, True), (64, False)):
                args, new_kv, flops = _extend_batch(seq, ext, h, hkv, d, p, torch.bfloat16, in_order)
                variants = {"new keys by TMA": lambda: K.extend_attention(*args, **new_kv),
                            "new keys by pointers": lambda: extend_mod.extend_attention_impl(*args, **new_kv,
                                                                                             use_tma=False),
                            "all from the pages": lambda: K.extend_attention(*args)}
                pages = f"P{p} {'in order' if in_order else 'scattered'}"
                for label, fn in variants.items():
                    if (p, in_order) != (16, False) and label != "all from the pages":
                        continue  # the page layout only changes the paged reads
                    ms = device_ms(fn)
                    row(f"extend-loads d{d} {label}", f"{name}, {h}/{hkv}h {pages}", _tflops(ms, flops),
                        f"{ms * 1e3:.1f} us")


# ------------------------------------------------------------------ cascade (shared prefix)

def bench_cascade(copy_gbs: float) -> None:
    groups, per, prefix, suffix, hq, hkv, d, p = (64, 16, 2048, 256, 32, 8, 128, 16) if not SMOKE else \
        (2, 3, 32, 9, 4, 2, 32, 16)
    dtype = torch.bfloat16
    b = groups * per
    prefix_pages = prefix // p
    suffix_pages = -(-suffix // p)
    num_pages = groups * prefix_pages + b * suffix_pages + 1
    k = torch.randn(num_pages, p, hkv, d, device=DEV, dtype=dtype)
    v = torch.randn_like(k)
    perm = torch.randperm(num_pages, device=DEV).int()
    prefix_pt = perm[: groups * prefix_pages].view(groups, prefix_pages)
    suffix_pt = perm[groups * prefix_pages : groups * prefix_pages + b * suffix_pages].view(b, suffix_pages)
    full_pt = torch.cat([prefix_pt.repeat_interleave(per, 0), suffix_pt], 1).contiguous()
    q = torch.randn(b, hq, d, device=DEV, dtype=dtype)
    i32 = dict(dtype=torch.int32, device=DEV)
    prefix_lens = torch.full((groups,), prefix, **i32)
    cu_groups = torch.arange(0, b + 1, per, **i32)
    suffix_lens = torch.full((b,), suffix, **i32)
    seq_lens = torch.full((b,), prefix + suffix, **i32)
    scale = d**-0.5
    cargs = (q, k, v, prefix_pt, prefix_lens, cu_groups, suffix_pt.contiguous(), suffix_lens, scale, prefix, suffix,
             per)
    dargs = (q, k, v, full_pt, seq_lens, scale, prefix + suffix)
    ref = K.decode_attention_reference(*dargs) if b * (prefix + suffix) < 2_000_000 else None
    plain = K.decode_attention(*dargs)
    casc = K.shared_prefix_decode_attention(*cargs)
    if ref is not None:
        check("plain decode on gsp vs reference", plain, ref, 2e-2)
    check("cascade vs plain decode (gsp)", casc, plain, 2e-2)
    ms_plain = bench(lambda: K.decode_attention(*dargs))
    ms_casc = bench(lambda: K.shared_prefix_decode_attention(*cargs))
    tok_bytes = 2 * hkv * d * k.element_size()
    plain_bytes = b * (prefix + suffix) * tok_bytes
    casc_bytes = (groups * prefix + b * suffix) * tok_bytes
    shape = f"{groups}x{per} req, prefix {prefix}, suffix {suffix}, {hq}/{hkv}h d{d}"
    row("decode plain paged (gsp)", shape, f"{ms_plain * 1e3:,.0f} us",
        f"{plain_bytes / ms_plain / 1e6:,.0f} GB/s = {plain_bytes / ms_plain / 1e6 / copy_gbs:.0%} of copy")
    row("decode shared-prefix (gsp)", shape, f"{ms_casc * 1e3:,.0f} us",
        f"speedup {ms_plain / ms_casc:.2f}x; KV bytes ratio {plain_bytes / casc_bytes:.2f}x; "
        f"{casc_bytes / ms_casc / 1e6:,.0f} GB/s effective")


def bench_cascade_graph(copy_gbs: float, quick: bool, groups: tuple[int, ...] = (64, 2, 8)) -> None:
    """The shared-prefix op as llama-1b's decode graphs run it on gsp (d64, the context limit as
    the length bounds, one group slot per row, the rest empty), for `groups` groups of 16: the
    1024-row graph (64 groups), the 32-row graph of the peer's subset (2) and a 128-row one (8)."""
    if SMOKE:
        _cascade_graph(copy_gbs, groups=2, per=3, prefix=32, suffix=9, hq=4, hkv=2, d=32, bound=64, quick=quick)
        return
    for g in groups:
        _cascade_graph(copy_gbs, groups=g, per=16, prefix=2048, suffix=256, hq=32, hkv=8, d=64, bound=16384,
                       quick=quick)


def _cascade_graph(copy_gbs: float, groups: int, per: int, prefix: int, suffix: int, hq: int, hkv: int, d: int,
                   bound: int, quick: bool) -> None:
    """Default tuning, then split counts with one launch and with several, and (without
    `quick`) a sweep of the tile, warp and stage settings (applied to every kernel alike),
    fastest first."""
    p = 16
    dtype = torch.bfloat16
    b = groups * per
    k, v, table = paged_kv([prefix] * groups + [suffix] * b, p, hkv, d, dtype)
    prefix_pt, suffix_pt = table[:groups, : prefix // p], table[groups:, : -(-suffix // p)].contiguous()
    i32 = dict(dtype=torch.int32, device=DEV)
    slots_pt = torch.zeros(b, prefix_pt.shape[1], **i32)
    slots_pt[:groups] = prefix_pt
    prefix_lens = torch.zeros(b, **i32)
    prefix_lens[:groups] = prefix
    cu_groups = torch.full((b + 1,), b, **i32)
    cu_groups[: groups + 1] = torch.arange(0, b + 1, per, **i32)
    q = torch.randn(b, hq, d, device=DEV, dtype=dtype)
    args = (q, k, v, slots_pt, prefix_lens, cu_groups, suffix_pt, torch.full((b,), suffix, **i32), d**-0.5,
            bound, bound, min(group_cap(hq, hkv), b))
    ref = K.shared_prefix_decode_attention_reference(q, k, v, prefix_pt, prefix_lens[:groups].clone(),
                                                     cu_groups[: groups + 1].clone(), *args[6:9], prefix, suffix, per)
    check(f"cascade, graph-shaped batch of {b}", K.shared_prefix_decode_attention(*args), ref, 2e-2)
    nbytes = (groups * prefix + b * suffix) * 2 * hkv * d * 2
    variants: list[dict] = [{}] + [dict(one_launch=ol, suffix_splits=ss, prefix_splits=sp) for ol in (False, True)
                                   for ss in (None, 1, 2, 4) for sp in (None, 2, 4, 8, 16)]
    if not quick:
        variants += [dict(block_n=bn, num_warps=w, num_stages=st) for bn in (32, 64, 128) for w in (2, 4, 8)
                     for st in (2, 3, 4)]
    timed = []
    for var in variants if not SMOKE else variants[:2]:
        var = {key: val for key, val in var.items() if val is not None}
        try:
            fn = lambda var=var: shared_mod.shared_prefix_impl(*args, **var)  # noqa: E731
            if rel_err(fn(), ref) > 2e-2:
                print(f"  cascade graph {var} WRONG")
                continue
            timed.append((device_ms(fn), var))
        except Exception as exc:  # a setting that does not compile (shared memory) is skipped
            print(f"  cascade graph {var} failed: {type(exc).__name__}: {str(exc)[:100]}")
    default_ms = next(ms for ms, var in timed if not var)
    shape = f"{groups}x{per} req in {b} slots, prefix {prefix}, suffix {suffix}, {hq}/{hkv}h d{d}"
    print(f"  cascade graph {shape}, fastest first:")
    for ms, var in sorted(timed, key=lambda x: x[0])[:8]:
        print(f"    {str(var or 'default'):<58} {ms * 1e3:8.1f} us {nbytes / ms / 1e6 / copy_gbs:6.0%} of copy")
    best_ms, best = min(timed, key=lambda x: x[0])
    row(f"decode shared-prefix, llama-1b {b}-row graph", shape, f"{default_ms * 1e3:,.1f} us",
        f"{nbytes / default_ms / 1e6 / copy_gbs:.0%} of copy; best {best or 'default'} {best_ms * 1e3:,.1f} us")


# ------------------------------------------------------------------ elementwise

def bench_elementwise(copy_gbs: float) -> None:
    t, hidden, inter = (16384, 4096, 14336) if not SMOKE else (8, 64, 96)
    dtype = torch.bfloat16
    x = torch.randn(t, hidden, device=DEV, dtype=dtype)
    r = torch.randn_like(x)
    w = torch.randn(hidden, device=DEV, dtype=dtype)
    y, h = K.rms_norm(x, w, 1e-5, residual=r)
    y_ref, h_ref = K.rms_norm_reference(x, w, 1e-5, residual=r)
    check("rms_norm+residual bf16", y, y_ref, 1e-2)
    check("rms_norm residual sum bf16", h, h_ref, 0.0 if DEV == "cuda" else 1e-2)  # interpreter truncates bf16
    x32 = torch.randn(64, hidden, device=DEV)
    check("rms_norm fp32", K.rms_norm(x32, w.float(), 1e-5), K.rms_norm_reference(x32, w.float(), 1e-5), 1e-6)
    ms = bench(lambda: K.rms_norm(x, w, 1e-5, residual=r))
    nbytes = 4 * x.numel() * x.element_size()
    ms_t = bench(lambda: K.rms_norm_reference(x, w, 1e-5, residual=r))
    row("rms_norm + residual", f"[{t}, {hidden}] bf16", f"{nbytes / ms / 1e6:,.0f} GB/s",
        f"{nbytes / ms / 1e6 / copy_gbs:.0%} of copy; torch eager {nbytes / ms_t / 1e6:,.0f} GB/s")

    g = torch.randn(t, 2 * inter, device=DEV, dtype=dtype)
    check("silu_and_mul bf16", K.silu_and_mul(g), K.silu_and_mul_reference(g), 1e-2)
    ms = bench(lambda: K.silu_and_mul(g))
    ms_t = bench(lambda: K.silu_and_mul_reference(g))
    nbytes = g.numel() * g.element_size() * 3 // 2
    row("silu_and_mul", f"[{t}, 2x{inter}] bf16", f"{nbytes / ms / 1e6:,.0f} GB/s",
        f"{nbytes / ms / 1e6 / copy_gbs:.0%} of copy; torch eager {nbytes / ms_t / 1e6:,.0f} GB/s")

    # store_kv: a prefill of 16k tokens into a 16-token-page pool, 8 KV heads x 128.
    hkv, d, p = (8, 128, 16) if not SMOKE else (2, 32, 4)
    ntok = t
    kc = torch.zeros(ntok // p + 8, p, hkv, d, device=DEV, dtype=dtype)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(kc.shape[0] * p, device=DEV)[:ntok]
    kk = torch.randn(ntok, hkv, d, device=DEV, dtype=dtype)
    vv = torch.randn_like(kk)
    K.store_kv(kk, vv, kc, vc, slots)
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    K.store_kv_reference(kk, vv, kc2, vc2, slots)
    check("store_kv bf16 (exact)", kc.float(), kc2.float(), 0.0)
    ms = bench(lambda: K.store_kv(kk, vv, kc, vc, slots))
    nbytes = 4 * kk.numel() * kk.element_size()
    row("store_kv", f"{ntok} tok {hkv}x{d} P{p} bf16", f"{nbytes / ms / 1e6:,.0f} GB/s",
        f"{nbytes / ms / 1e6 / copy_gbs:.0%} of copy")

    pos = torch.randint(0, 8192, (t,), device=DEV)
    qr = torch.randn(t, 32, 128, device=DEV, dtype=dtype) if not SMOKE else torch.randn(t, 4, 32, device=DEV)
    kr = torch.randn(t, 8, 128, device=DEV, dtype=dtype) if not SMOKE else torch.randn(t, 2, 32, device=DEV)
    cache = K.rope_cos_sin_cache(qr.shape[2], 8192, 500000.0).to(DEV)
    qo, ko = K.apply_rotary(pos, qr, kr, cache)
    qo_r, ko_r = K.apply_rotary_reference(pos, qr, kr, cache)
    check("apply_rotary bf16", qo, qo_r, 1e-2)
    ms = bench(lambda: K.apply_rotary(pos, qr, kr, cache))
    nbytes = 2 * (qr.numel() + kr.numel()) * qr.element_size()
    row("apply_rotary", f"{t} tok 32/8h d128 bf16", f"{nbytes / ms / 1e6:,.0f} GB/s",
        f"{nbytes / ms / 1e6 / copy_gbs:.0%} of copy")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--only", default="copy,decode,extend,cascade,elementwise")
    parser.add_argument("--cascade-groups", default="64,2,8",
                        help="cascade-graph: batches of this many groups of 16 requests (comma-separated)")
    opts = parser.parse_args()
    torch.manual_seed(0)
    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        import triton

        print(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
              f"triton {triton.__version__}", flush=True)
    only = set(opts.only.split(","))
    copy_gbs = bench_copy()
    cascade_groups = tuple(int(g) for g in opts.cascade_groups.split(","))
    sections = [("decode", lambda: bench_decode(copy_gbs, opts.quick)), ("extend", lambda: bench_extend(opts.quick)),
                ("extend-loads", bench_extend_loads),
                ("cascade", lambda: bench_cascade(copy_gbs)),
                ("cascade-graph", lambda: bench_cascade_graph(copy_gbs, opts.quick, cascade_groups)),
                ("elementwise", lambda: bench_elementwise(copy_gbs))]
    # The GPU suite runs this under `timeout` (SIGTERM): the rows measured so far still make the
    # table, with a row that says where it stopped.
    signal.signal(signal.SIGTERM, _stop)
    name = "start-up"
    try:
        for name, fn in sections:
            if name in only:
                print(f"== {name}", flush=True)
                try:
                    fn()
                except Exception as exc:  # keep the other sections' figures
                    import traceback

                    traceback.print_exc()
                    row(f"{name} FAILED", "", type(exc).__name__, str(exc)[:80])
                torch.cuda.empty_cache() if DEV == "cuda" else None
    except _Stopped:
        row(f"stopped in {name}", "", "time limit", "sections after it did not run")
    finally:
        print("\n" + "=" * 150)
        print(f"{'figure':<40} {'shape':<46} {'value':<18} note")
        for fig, shape, value, note in ROWS:
            print(f"{fig:<40} {shape:<46} {value:<18} {note}", flush=True)


class _Stopped(BaseException):  # not an Exception: a section's own handler must not swallow it
    pass


def _stop(signum: int, frame: object) -> None:
    raise _Stopped


if __name__ == "__main__":
    main()
