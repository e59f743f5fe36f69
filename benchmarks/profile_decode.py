"""Where a decode step's device time goes: the kernels of one CUDA-graph replay, on the GPU.

    python benchmarks/profile_decode.py                       # llama-1b, gsp-like batches
    python benchmarks/profile_decode.py --model llama-8b --batches 64
    python benchmarks/profile_decode.py --batches 32,1024 --burst 8   # + a decode burst of 8
    python benchmarks/profile_decode.py --batches 1024 --two-streams  # + two half batches at once
    python benchmarks/profile_decode.py --batches 512 --burst 0 --sm-partition  # GEMMs beside attention
    python benchmarks/profile_decode.py --gemms --batches 32,64,256   # the projections alone, by layout
    python benchmarks/profile_decode.py --batches 1024 --burst 0 --beside-prefill 4096,16384  # decode beside prefill

Builds the engine's decode graphs (plain and shared-prefix) for a gsp-like batch: groups of 16
requests sharing a 2048-token prefix, each with 128 question tokens plus 128 generated ones of
its own. Times a replay with CUDA events (median of 50), then profiles 20 replays with
torch.profiler and prints, per kernel name, the device time per replay and the share of the
step, next to the step's byte floor (weights once + the KV the step must read, over the copy
bandwidth measured here). Random weights (`load_format="dummy"`): the bytes and FLOPs are the
real model's.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gpu_bench import bench_ms, copy_bandwidth, decode_weight_bytes, kv_bytes_per_token  # noqa: E402
from radixserve.runtime.cuda_graphs import DecodeGraphs, DecodeRows, capture_graph  # noqa: E402
from radixserve.runtime.kv_cache import KVCache  # noqa: E402
from radixserve.runtime.loader import ResolvedModel, load_model  # noqa: E402
from radixserve.runtime.model_config import NAMED_SHAPES, ModelConfig  # noqa: E402

PAGE = 16
CHUNK_NEW, CHUNK_CACHED = 128, 2048  # --beside-prefill: each request of a chunk, as in gsp's prefill steps


def gsp_rows(batch: int, prefix: int, own: int, rng: random.Random, free: list[int],
             spare: int = 0) -> tuple[DecodeRows, list]:
    """Groups of 16 rows sharing `prefix` tokens of pages; each row `own` more tokens (and pages
    for `spare` tokens past them, which a burst writes)."""
    rows_pages, groups = [], []
    shared_pages = prefix // PAGE
    own_pages = -(-(own + spare) // PAGE)
    for start in range(0, batch, 16):
        end = min(batch, start + 16)
        head = [free.pop() for _ in range(shared_pages)]
        for _ in range(start, end):
            rows_pages.append(head + [free.pop() for _ in range(own_pages)])
        groups.append((start, end, shared_pages))
    tokens = [rng.randrange(1000, 30000) for _ in range(batch)]
    return DecodeRows(tokens, [prefix + own] * batch, rows_pages), groups


def profile(fn, reps: int = 20) -> dict[str, float]:  # noqa: ANN001
    """Kernel name -> device microseconds per call of fn."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type.name == "CUDA" and ev.device_time_total > 0:
            per[ev.name] += ev.device_time_total / reps
    return per


def burst_ms(graphs: DecodeGraphs, rows: DecodeRows, groups: list, steps: int) -> tuple[float, dict[str, float]]:
    """(milliseconds a step, kernel name -> device us a step) of a decode burst as the model
    runner runs it (greedy): one upload, `steps` replays, an argmax after each, the device-side
    advance of the inputs between."""

    def burst() -> None:
        tokens = graphs.run(rows, groups, steps=steps).argmax(dim=-1)
        for _ in range(steps - 1):
            tokens = graphs.next_step(tokens).argmax(dim=-1)

    with torch.inference_mode():
        ms = bench_ms(burst, reps=10, warmup=2) / steps
        kernels = profile(burst, reps=3)
    return ms, {name: us / steps for name, us in kernels.items()}


def on_two_streams(first: Callable[[], object], first_stream: torch.cuda.Stream,
                   second: Callable[[], object], second_stream: torch.cuda.Stream) -> None:
    """Launch `first` on `first_stream` and `second` on `second_stream`, both after the work
    already queued on the current stream, which then waits for both (fork, join)."""
    cur = torch.cuda.current_stream()
    first_stream.wait_stream(cur)
    second_stream.wait_stream(cur)
    with torch.cuda.stream(first_stream):
        first()
    with torch.cuda.stream(second_stream):
        second()
    cur.wait_stream(first_stream)
    cur.wait_stream(second_stream)


def two_streams_ms(model: torch.nn.Module, cfg: ModelConfig, kv: KVCache, rows: DecodeRows, groups: list,
                   max_model_len: int, dummy_page: int, offsets_ms: tuple[float, ...]) -> list[tuple[str, float]]:
    """Does a decode batch run faster as two half batches on two streams (one half's
    compute-bound GEMMs beside the other's bandwidth-bound attention) than as one graph?
    Each half is its own graph set (own static buffers and memory pool); the second half's
    stream may start later by `offsets_ms` (a sleep kernel) to put the halves out of phase.
    Returns (label, ms) rows: the first half alone, both in sequence, both at once per offset."""
    half = len(rows) // 2
    cut = next(i for i, g in enumerate(groups) if g[0] >= half)
    parts = []
    for lo, hi, gs in ((0, groups[cut][0], groups[:cut]), (groups[cut][0], len(rows), groups[cut:])):
        sub = DecodeRows(rows.token_ids[lo:hi], rows.seq_lens[lo:hi], rows.pages[lo:hi])
        g = DecodeGraphs(model, kv, max_bs=hi - lo, max_model_len=max_model_len, dummy_page=dummy_page,
                         num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, cascade=True, sizes=[hi - lo])
        g.capture()
        with torch.inference_mode():
            g.run(sub, [(a - lo, b - lo, n) for a, b, n in gs])
        parts.append(g)  # the graph reads this object's static buffers: keep it alive
    a, b = (g._graphs[(g.max_bs, True)] for g in parts)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    cycles_per_ms = torch.cuda.get_device_properties(0).clock_rate  # kHz = cycles per ms

    def later(offset_ms: float) -> None:
        if offset_ms:
            torch.cuda._sleep(int(offset_ms * cycles_per_ms))
        b.replay()

    out = [(f"first half ({groups[cut][0]} rows) alone", bench_ms(a.replay, reps=30, warmup=3))]
    out.append(("both halves in sequence, one stream", bench_ms(lambda: (a.replay(), b.replay()), reps=30)))
    for off in offsets_ms:
        out.append((f"both halves at once, two streams, second {off:.2f} ms later",
                    bench_ms(lambda off=off: on_two_streams(a.replay, s1, lambda: later(off), s2), reps=30)))
    return out


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of a decoder layer, as the model fuses them."""
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    return {"qkv": (cfg.hidden_size, qkv), "o": (cfg.num_heads * cfg.head_dim, cfg.hidden_size),
            "gate_up": (cfg.hidden_size, 2 * cfg.intermediate_size), "down": (cfg.intermediate_size, cfg.hidden_size)}


def gemm_layouts(cfg: ModelConfig, batches: list[int], copy_bps: float) -> None:
    """Each decode projection of `cfg` (one weight per layer, as the model reads them: nothing
    reused from L2) at each row count, captured as one CUDA graph of all layers' calls: F.linear
    on [out, in] weights (the model's), a matmul on [in, out] copies, and F.linear through
    cuBLASLt. Prints the fraction of the copy rate each reaches on the weights' bytes."""
    from torch.nn import functional as F

    layers = cfg.num_layers
    for name, (k_in, n_out) in projection_shapes(cfg).items():
        w = [torch.randn(n_out, k_in, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
        wt = [x.t().contiguous() for x in w]
        nbytes = layers * n_out * k_in * 2
        for bs in batches:
            x = torch.randn(bs, k_in, device="cuda", dtype=torch.bfloat16)
            variants = {"F.linear [out,in]": lambda: [F.linear(x, a) for a in w],
                        "matmul [in,out]": lambda: [x @ a for a in wt]}
            results = {}
            for label, fn in variants.items():
                results[label] = _graph_ms(fn)
            prev = torch.backends.cuda.preferred_blas_library()
            try:
                torch.backends.cuda.preferred_blas_library("cublaslt")
                results["F.linear, cuBLASLt"] = _graph_ms(variants["F.linear [out,in]"])
            except Exception as exc:  # noqa: BLE001 (a backend this build lacks)
                print(f"   cuBLASLt: {type(exc).__name__}: {exc}")
            finally:
                torch.backends.cuda.preferred_blas_library(prev)
            print(f"   {name:8s} {k_in}->{n_out} rows {bs:5d}: " + "; ".join(
                f"{label} {ms * 1e3 / layers:6.1f} us {nbytes / (ms / 1e3) / copy_bps:4.0%}"
                for label, ms in results.items()))


def sm_partition(cfg: ModelConfig, kv: KVCache, rows: DecodeRows, groups: list,
                 carveouts: tuple[int | None, ...] = (None, 16, 32, 48, 66)) -> None:
    """Can a decode step's compute-bound GEMMs run beside its bandwidth-bound attention if the
    GEMMs leave SMs free? All layers' projections at this batch (cuBLASLt, SM count target =
    SMs - carve-out, torch's experimental knob) in one graph, the shared-prefix attention of
    all layers in another; each alone, then both replayed at once on two streams."""
    from torch.nn import functional as F

    from radixserve.kernels import shared_prefix_decode_attention
    from radixserve.runtime.cascade import CascadePlan, build_cascade_info

    set_carveout = getattr(torch._C, "_set_sm_carveout_experimental", None)
    if set_carveout is None:
        print("   torch has no _set_sm_carveout_experimental: nothing to measure")
        return
    bs, layers = len(rows), cfg.num_layers
    shapes = list(projection_shapes(cfg).values())
    w = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for k, n in shapes] for _ in range(layers)]
    xs = {k: torch.randn(bs, k, device="cuda", dtype=torch.bfloat16) for k, _ in shapes}
    plan = CascadePlan(list(range(bs)), groups)
    info = build_cascade_info(plan, rows.pages, rows.seq_lens, PAGE, torch.device("cuda"))
    q = torch.randn(bs, cfg.num_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    scale = cfg.head_dim ** -0.5

    def attention() -> None:
        for layer in range(layers):
            k_cache, v_cache = kv.layer(layer)
            shared_prefix_decode_attention(q, k_cache, v_cache, info.prefix_page_table, info.prefix_lens,
                                           info.cu_groups, info.suffix_page_table, info.suffix_lens, scale,
                                           info.max_prefix_len, info.max_suffix_len, info.max_group_size)

    def gemms() -> None:
        for layer in range(layers):
            for (k, _), weight in zip(shapes, w[layer]):
                F.linear(xs[k], weight)

    prev = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    # The GEMMs' stream outranks the attention's: when a GEMM launches, its blocks are placed
    # before the attention's pending ones as SMs free up (graph nodes keep their stream's priority).
    low, high = torch.cuda.Stream(priority=0), torch.cuda.Stream(priority=-1)
    attn_graph, _ = capture_graph(attention, None, low)
    attn_ms = bench_ms(attn_graph.replay, reps=30, warmup=3)
    print(f"   batch {bs}: attention of {layers} layers alone {attn_ms:.3f} ms")

    def at_once(gemm_fn, attn_fn) -> float:  # noqa: ANN001
        return bench_ms(lambda: on_two_streams(gemm_fn, high, attn_fn, low), reps=30, warmup=3)

    try:
        for carve in carveouts:
            set_carveout(carve)
            gemm_graph, _ = capture_graph(gemms, None, high)
            gemm_ms = bench_ms(gemm_graph.replay, reps=30, warmup=3)
            both_ms = at_once(gemm_graph.replay, attn_graph.replay)
            eager_ms = at_once(gemms, attention)
            print(f"   carve-out {carve or 0:3d} SMs: GEMMs alone {gemm_ms:.3f} ms; both at once {both_ms:.3f} ms "
                  f"(in sequence {attn_ms + gemm_ms:.3f}; saved {1 - both_ms / (attn_ms + gemm_ms):.0%}); "
                  f"launched eagerly at once {eager_ms:.3f} ms")
    finally:
        set_carveout(None)
        torch.backends.cuda.preferred_blas_library(prev)


def beside_prefill(model: torch.nn.Module, cfg: ModelConfig, kv: KVCache, decode_graph: torch.cuda.CUDAGraph,
                   tokens: int, first_page: int) -> list[tuple[str, float]]:
    """Can decode steps run beside a prefill chunk? A prefill forward is compute-bound (its
    GEMMs read the weights once for thousands of rows) and a large decode step mostly
    bandwidth-bound (its attention), so on two streams each could take what the other leaves.
    Builds a gsp-like chunk of `tokens` new tokens (requests of 128 over 2,048 cached, pages from
    `first_page` on), captures its forward as a graph, and times k decode replays (k so that
    they take about as long as the chunk) beside it, with either stream at the higher priority,
    against the two in sequence. Returns (label, ms) rows."""
    from radixserve.runtime.forward_batch import SeqStep, build_forward_batch

    rng = random.Random(tokens)
    requests, new, cached = tokens // CHUNK_NEW, CHUNK_NEW, CHUNK_CACHED
    per = -(-(new + cached) // PAGE)
    steps = [SeqStep(token_ids=[rng.randrange(cfg.vocab_size) for _ in range(new)], start=cached,
                     pages=list(range(first_page + r * per, first_page + (r + 1) * per))) for r in range(requests)]
    batch = build_forward_batch(steps, PAGE, "cuda")
    with torch.inference_mode():
        prefill_graph, _ = capture_graph(lambda: model(batch, kv), None, torch.cuda.Stream())
    prefill_ms = bench_ms(prefill_graph.replay, reps=10, warmup=2)
    decode_ms = bench_ms(decode_graph.replay, reps=20, warmup=2)
    k = max(1, round(prefill_ms / decode_ms))

    def decodes() -> None:
        for _ in range(k):
            decode_graph.replay()

    out = [(f"prefill chunk of {tokens} tokens alone", prefill_ms), (f"{k} decode replays alone", k * decode_ms),
           (f"chunk then {k} decode replays, one stream", bench_ms(lambda: (prefill_graph.replay(), decodes()), reps=10))]
    for label, decode_priority in (("decode", -1), ("prefill", 0)):
        d_stream, p_stream = torch.cuda.Stream(priority=decode_priority), torch.cuda.Stream(priority=-1 - decode_priority)
        both_ms = bench_ms(lambda: on_two_streams(prefill_graph.replay, p_stream, decodes, d_stream), reps=10)
        out.append((f"chunk beside {k} decode replays, two streams, {label} stream first", both_ms))
    return out


def _graph_ms(fn) -> float:  # noqa: ANN001
    """Median ms of one replay of `fn` captured in a CUDA graph (as the engine captures)."""
    graph, _ = capture_graph(fn, None, torch.cuda.Stream())
    return bench_ms(graph.replay, reps=30, warmup=3)


def short(name: str) -> str:
    for key in ("gemm", "gemv", "splitK", "Kernel2", "sm90_xmma", "cutlass"):
        if key in name:
            return "matmul " + name[:70]
    return name[:90]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--batches", default="32,256,512")
    ap.add_argument("--prefix", type=int, default=2048)
    ap.add_argument("--own", type=int, default=256)
    ap.add_argument("--burst", type=int, default=8, help="also time cascade decode bursts of this many steps")
    ap.add_argument("--two-streams", action="store_true",
                    help="also time each batch as two half batches replayed on two streams at once")
    ap.add_argument("--gemms", action="store_true", help="only the projections at each batch, by weight layout")
    ap.add_argument("--beside-prefill", default="",
                    help="also time decode replays beside prefill chunks of these token counts (comma-separated)")
    ap.add_argument("--sm-partition", action="store_true",
                    help="also time all layers' GEMMs (with SM carve-outs) beside all layers' attention")
    args = ap.parse_args()
    batches = [int(x) for x in args.batches.split(",")]
    cfg = NAMED_SHAPES[args.model]
    if args.gemms:
        gemm_layouts(cfg, batches, copy_bandwidth())
        return 0
    resolved = ResolvedModel(name=args.model, path=None, config=cfg, load_format="dummy", tokenizer_path=None)
    model = load_model(resolved, "cuda", torch.bfloat16, progress=False)
    copy_bps = copy_bandwidth()
    max_bs = max(batches)
    groups_max = -(-max_bs // 16)
    own_pages = -(-(args.own + args.burst) // PAGE)
    prefill_chunks = [int(x) for x in args.beside_prefill.split(",") if x]
    prefill_pages = max(prefill_chunks, default=0) // CHUNK_NEW * -(-(CHUNK_NEW + CHUNK_CACHED) // PAGE)
    decode_pages = groups_max * (args.prefix // PAGE) + max_bs * own_pages + 1
    num_pages = decode_pages + prefill_pages + 1
    kv = KVCache.for_model(cfg, num_pages, PAGE, torch.bfloat16, "cuda")
    for t in kv.k + kv.v:
        t.normal_(0, 1)
    graphs = DecodeGraphs(model, kv, max_bs=max_bs, max_model_len=args.prefix + args.own + args.burst + PAGE,
                          dummy_page=num_pages - 1, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                          cascade=True, sizes=batches, max_steps=max(1, args.burst))
    graphs.capture()
    weight_bytes = decode_weight_bytes(model)
    kv_tok = kv_bytes_per_token(cfg)
    print(f"{args.model}: weights read per step {weight_bytes / 1e9:.2f} GB, copy {copy_bps / 1e12:.2f} TB/s")
    summary = []
    for bs in batches:
        rng = random.Random(bs)
        free = list(range(decode_pages))
        rng.shuffle(free)
        rows, groups = gsp_rows(bs, args.prefix, args.own, rng, free, spare=args.burst)
        for cascade in (False, True):
            with torch.inference_mode():
                graphs.run(rows, groups if cascade else None)
                graph = graphs._graphs[(bs, cascade)]
                ms = bench_ms(graph.replay, reps=50, warmup=5)
                kernels = profile(graph.replay)
            seq = args.prefix + args.own
            kv_bytes = (len(groups) * args.prefix + bs * args.own) * kv_tok if cascade else bs * seq * kv_tok
            floor_ms = (weight_bytes + kv_bytes) / copy_bps * 1e3
            total = sum(kernels.values())
            label = f"batch {bs} {'cascade' if cascade else 'plain'}"
            print(f"\n== {label}: replay {ms:.3f} ms (kernels sum {total / 1e3:.3f} ms, "
                  f"{len(kernels)} kernel names); byte floor {floor_ms:.3f} ms "
                  f"(weights {weight_bytes / 1e9:.2f} GB + KV {kv_bytes / 1e9:.2f} GB) -> {floor_ms / ms:.2f} of it")
            merged: dict[str, float] = defaultdict(float)
            for name, us in kernels.items():
                merged[short(name)] += us
            for name, us in sorted(merged.items(), key=lambda kv_: -kv_[1])[:18]:
                print(f"   {us:9.1f} us  {us / max(total, 1e-9):5.1%}  {name}")
            summary.append((label, ms, floor_ms))
        if args.burst > 1:  # the cascade graph, k replays with argmax and the inputs' advance between
            per_step, burst_kernels = burst_ms(graphs, rows, groups, args.burst)
            label = f"batch {bs} cascade, burst of {args.burst}"
            extra = {short(k): us - kernels.get(k, 0.0) for k, us in burst_kernels.items()}
            print(f"\n== {label}: {per_step:.3f} ms a step (one replay alone: {ms:.3f} ms); kernels "
                  f"{sum(burst_kernels.values()) / 1e3:.3f} ms a step (the replay's {total / 1e3:.3f} ms); "
                  "kernel time a step beyond the replay's:")
            for name, us in sorted(extra.items(), key=lambda kv_: -kv_[1])[:6]:
                print(f"   {us:9.1f} us  {name}")
            summary.append((label, per_step, floor_ms))
        if args.sm_partition:
            sm_partition(cfg, kv, rows, groups)
        for chunk in prefill_chunks:
            for label, ms in beside_prefill(model, cfg, kv, graphs._graphs[(bs, True)], chunk, decode_pages):
                summary.append((f"batch {bs} cascade: {label}", ms, None))
        if args.two_streams:
            max_len = args.prefix + args.own + args.burst + PAGE
            for label, ms in two_streams_ms(model, cfg, kv, rows, groups, max_len, num_pages - 1,
                                            (0.0, 0.1, 0.2, 0.3)):
                whole = label.startswith("both")  # the byte floor is the whole batch's
                summary.append((f"batch {bs} cascade: {label}", ms, floor_ms if whole else None))
    print("\n| step | replay ms | byte floor ms | fraction |\n|---|---|---|---|")
    for label, ms, floor_ms in summary:
        floor = "- | -" if floor_ms is None else f"{floor_ms:.3f} | {floor_ms / ms:.2f}"
        print(f"| {label} | {ms:.3f} | {floor} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
