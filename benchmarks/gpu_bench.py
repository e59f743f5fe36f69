"""The GPU benchmarks of BENCHMARKS.md in one process run, one table, targets beside figures.

    python benchmarks/gpu_bench.py --out $OUT [--quick]      (run by benchmarks/gpu_suite.sh)

Sections (each guarded: a failure is a table row, the others still run):
  ceilings  device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate
  decode    llama-8b random weights, decode steps as CUDA-graph replays at batch 1..256 and
            contexts 1k / 4k: model bandwidth utilization = (weights read once + KV attended)
            / step time / copy bandwidth (target >= 0.8)
  peer      transformers continuous batching (`generate_batch`, attention "paged|sdpa") on the
            same llama-1b random weights, on a subset of gsp (its full run would take minutes)
  gsp       llama-1b, 64 groups x 16 prompts, 2048-token prefix, 128-token question, 256 out
            (ignore_eos): output tok/s, TTFT / ITL p50 / p99, hit rate vs optimal; the same
            subset the peer ran (ratio target >= 50x); the physical bound of the workload
            (prefill FLOPs / matmul rate + decode bytes / copy bandwidth; target >= 0.6)
  ttft      a request whose 8k-token prefix is cached vs an uncached request of only its
            128-token suffix (target <= 1.2x)
  overhead  64 (and 256) requests decoding together: host time per decode step (scheduling,
            batch building, launching, folding tokens, emitting) against the device time of a
            step (CUDA events), with the overlapped loop and with the synchronous one (target:
            exposed host time <= 10% of the step at batch 64)
  random    no shared prefix, 512 in / 256 out: radix cache on vs off, six alternating runs of
            500 requests (on, off, off, on, on, off; target: on costs <= 1%)
The pytest and kernel-benchmark results of gpu_suite.sh are folded into the table when their
logs are given (--tests-log, --kernels-log).

Random weights as in vLLM's `--load-format dummy`; named shapes get the default model's
tokenizer (benchmarks/gpu_suite.sh carries its files as build/gpu_assets/tokenizer).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import random
import re
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness import RunMetrics, percentile, run_radixserve  # noqa: E402
from benchmarks.workloads import GSPShape, BenchRequest, gsp, gsp_optimal_hit_tokens, random_ids  # noqa: E402
from radixserve.runtime import Engine, SamplingParams  # noqa: E402
from radixserve.runtime.engine_loop import LoopTiming, StepTrace  # noqa: E402
from radixserve.runtime.cuda_graphs import DecodeGraphs, DecodeRows  # noqa: E402
from radixserve.runtime.kv_cache import KVCache  # noqa: E402
from radixserve.runtime.loader import ResolvedModel, load_model  # noqa: E402
from radixserve.runtime.model_config import NAMED_SHAPES, ModelConfig  # noqa: E402

VOCAB_RANGE = (1000, 40000)
START = time.perf_counter()


# ------------------------------------------------------------------ the table


@dataclass
class Row:
    section: str
    figure: str
    value: str
    target: str = ""
    ok: bool | None = None  # None: no target
    note: str = ""


ROWS: list[Row] = []
RATIOS: list[Row] = []


def add(section: str, figure: str, value: str, target: str = "", ok: bool | None = None, note: str = "",
        ratio: bool = False) -> None:
    row = Row(section, figure, value, target, ok, note)
    (RATIOS if ratio else ROWS).append(row)
    mark = "" if ok is None else ("  [ok]" if ok else "  [MISS]")
    print(f"  {section:<9} {figure:<58} {value:<22} {target}{mark} {note}", flush=True)


def elapsed() -> float:
    return time.perf_counter() - START


def section(name: str, fn: Callable[[], None], budget_end_s: float | None) -> None:
    if budget_end_s is not None and elapsed() > budget_end_s:
        add(name, "SKIPPED", f"at {elapsed():.0f} s", note="time budget of the run spent")
        return
    print(f"\n== {name} (t = {elapsed():.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - keep the other sections' figures
        traceback.print_exc()
        add(name, "FAILED", type(exc).__name__, note=str(exc)[:120])
    finally:
        gc.collect()
        torch.cuda.empty_cache()
    print(f"   ({name}: {time.perf_counter() - t0:.1f} s)", flush=True)


def print_table(out: Path | None, header: str) -> str:
    lines = [header, "", "| section | figure | value | target | met |", "|---|---|---|---|---|"]
    for r in ROWS + RATIOS:
        met = "" if r.ok is None else ("yes" if r.ok else "**no**")
        note = f" ({r.note})" if r.note else ""
        lines.append(f"| {r.section} | {r.figure}{note} | {r.value} | {r.target} | {met} |")
    text = "\n".join(lines)
    print("\n" + "=" * 120 + "\n" + text, flush=True)
    if out is not None:
        (out / "gpu_results.md").write_text(text + "\n")
        (out / "gpu_results.json").write_text(json.dumps([r.__dict__ for r in ROWS + RATIOS], indent=1))
    return text


# ------------------------------------------------------------------ helpers


def shape_folder(name: str, tokenizer_dir: Path) -> Path:
    """A folder with a named shape's config.json (and the carried tokenizer files, if any)."""
    folder = Path(tempfile.gettempdir()) / "radixserve-shapes" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(NAMED_SHAPES[name].to_hf()))
    if tokenizer_dir.is_dir():
        for f in tokenizer_dir.iterdir():
            if f.is_file() and not (folder / f.name).exists():
                (folder / f.name).write_bytes(f.read_bytes())
    return folder


def model_source(name: str, tokenizer_dir: Path) -> str:
    """Engine(model=...) for a named shape: the name itself where the default tokenizer's
    package is installed (no carried tokenizer), else the shape's folder with that tokenizer."""
    if not (tokenizer_dir / "tokenizer.json").is_file():
        return name
    return str(shape_folder(name, tokenizer_dir))


def bench_ms(fn: Callable[[], object], reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds over `reps` event-timed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def kv_bytes_per_token(cfg: ModelConfig, itemsize: int = 2) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize


def nonembed_params(cfg: ModelConfig) -> int:
    """Parameters of the decoder layers (the matmul weights of every token)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    return cfg.num_layers * per_layer


def free_engine(engine: Engine | None) -> None:
    if engine is not None:
        engine.shutdown()
    gc.collect()
    torch.cuda.empty_cache()


# ------------------------------------------------------------------ sections


CEIL: dict[str, float] = {}


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, read + written: the HBM ceiling."""
    a = torch.randn(1 << 28, device="cuda")
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a), reps=10)
    return 2 * a.numel() * a.element_size() / (ms / 1e3)


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes a decode step reads: every parameter but the embedding table (it gathers
    only the batch's rows), plus the LM head's matrix where it is the tied embedding."""
    params = dict(model.named_parameters())  # a tied weight appears once, under the embedding's name
    total = sum(p.numel() * p.element_size() for n, p in params.items() if "embed_tokens" not in n)
    head = getattr(model, "lm_head", None)
    if head is not None and "lm_head.weight" not in params:
        total += head.weight.numel() * head.weight.element_size()
    return total


def sec_ceilings() -> None:
    CEIL["copy_Bps"] = copy_bandwidth()
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(lambda: x @ y, reps=10)
    CEIL["matmul_flops"] = 2 * 8192**3 / (ms / 1e3)
    del x, y
    add("ceilings", "copy d2d, 1 GiB (read + write)", f"{CEIL['copy_Bps'] / 1e9:,.0f} GB/s")
    add("ceilings", "bf16 matmul 8192^3, random data", f"{CEIL['matmul_flops'] / 1e12:,.0f} TFLOP/s")


def sec_decode(quick: bool) -> None:
    """llama-8b decode steps as graph replays; MBU per batch size and context."""
    cfg = NAMED_SHAPES["llama-8b"]
    resolved = ResolvedModel(name="llama-8b", path=None, config=cfg, load_format="dummy", tokenizer_path=None)
    t0 = time.perf_counter()
    model = load_model(resolved, "cuda", torch.bfloat16, progress=False)
    torch.cuda.synchronize()
    print(f"   llama-8b dummy weights in {time.perf_counter() - t0:.1f} s", flush=True)
    page = 16
    batches = [1, 8, 64, 256] if quick else [1, 8, 32, 64, 128, 256]
    contexts = [1024, 4096]
    max_tokens = 256 * 1024  # the largest batch x context measured (bs 256 x 1k, bs 64 x 4k)
    num_pages = max_tokens // page + 1
    kv = KVCache.for_model(cfg, num_pages, page, torch.bfloat16, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    for t in kv.k + kv.v:
        t.normal_(0, 1, generator=g)
    graphs = DecodeGraphs(model, kv, max_bs=max(batches), max_model_len=max(contexts) + page,
                          dummy_page=num_pages - 1, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                          cascade=False, sizes=batches)
    t0 = time.perf_counter()
    graphs.capture()
    print(f"   captured {len(batches)} graphs in {time.perf_counter() - t0:.1f} s", flush=True)
    weight_bytes = decode_weight_bytes(model)
    per_tok = kv_bytes_per_token(cfg)
    rng = random.Random(0)
    perm = list(range(num_pages - 1))
    rng.shuffle(perm)
    mbus = []
    for ctx in contexts:
        for bs in batches:
            if bs * ctx > max_tokens:
                continue
            pages_per = -(-ctx // page)
            pages = [perm[i * pages_per:(i + 1) * pages_per] for i in range(bs)]
            rows = DecodeRows([rng.randrange(*VOCAB_RANGE) for _ in range(bs)], [ctx] * bs, pages)
            with torch.inference_mode():
                graphs.run(rows, None)  # uploads the inputs; replays below reuse them
                graph = graphs._graphs[(bs, False)]
                ms = bench_ms(graph.replay, reps=10 if quick else 20)
            step_bytes = weight_bytes + bs * ctx * per_tok
            mbu = step_bytes / (ms / 1e3) / CEIL["copy_Bps"]
            mbus.append(mbu)
            add("decode", f"llama-8b decode step, batch {bs}, context {ctx}", f"{ms:.2f} ms, MBU {mbu:.2f}",
                ">= 0.80", mbu >= 0.8, f"{step_bytes / 1e9:.1f} GB read, {step_bytes / (ms / 1e3) / 1e12:.2f} TB/s")
    add("decode", "llama-8b decode, MBU range over batch 1..256", f"{min(mbus):.2f} .. {max(mbus):.2f}",
        ">= 0.80", min(mbus) >= 0.8, ratio=True)
    del graphs, kv, model


def copy_weights_to_hf(ours: torch.nn.Module, hf: torch.nn.Module, cfg: ModelConfig) -> None:
    """Our fused parameters (qkv_proj, gate_up_proj) into transformers' Llama layout."""
    target = hf.state_dict()
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".qkv_proj." in name:
                for part, t in zip(("q_proj", "k_proj", "v_proj"), p.split([q, kv, kv])):
                    target[name.replace("qkv_proj", part)].copy_(t)
            elif ".gate_up_proj." in name:
                for part, t in zip(("gate_proj", "up_proj"), p.chunk(2)):
                    target[name.replace("gate_up_proj", part)].copy_(t)
            else:
                target[name].copy_(p)


PEER: dict[str, object] = {}


def sec_peer(source: str, folder: Path, subset: list[BenchRequest]) -> None:
    """transformers continuous batching on the gsp subset, same random weights as the engine."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from radixserve.runtime.loader import resolve_model

    resolved = resolve_model(source, "dummy")
    ours = load_model(resolved, "cuda", torch.bfloat16, progress=False)  # seed 0, as the engine's
    hf_config = AutoConfig.from_pretrained(str(folder))
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16, attn_implementation="paged|sdpa")
    hf.eval()
    copy_weights_to_hf(ours, hf, resolved.config)
    del ours
    torch.cuda.empty_cache()
    n_out = subset[0].max_tokens
    gen = GenerationConfig(max_new_tokens=n_out, do_sample=False, eos_token_id=-1, pad_token_id=0)
    inputs = [r.prompt_ids for r in subset]

    def call(batch: list[list[int]]) -> dict:
        try:
            return hf.generate_batch(inputs=batch, generation_config=gen, progress_bar=False)
        except TypeError:
            return hf.generate_batch(batch, generation_config=gen)

    call(inputs[:2])  # warm-up (kernel selection, caches)
    torch.cuda.synchronize()
    # No inference_mode here: generate_batch's worker thread updates tensors created in the
    # calling thread, which inference mode would forbid.
    t0 = time.perf_counter()
    outs = call(inputs)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tokens = sum(len(o.generated_tokens) for o in outs.values())
    PEER.update(tps=tokens / wall, tokens=tokens, wall=wall, requests=len(inputs))
    add("peer", f"transformers {transformers.__version__} generate_batch paged|sdpa, gsp subset "
        f"({len(inputs)} requests)", f"{tokens / wall:,.0f} out tok/s", note=f"{tokens} tokens in {wall:.1f} s")
    del hf
    gc.collect()


def gsp_bound(shape: GSPShape, cfg: ModelConfig, concurrency: int) -> dict[str, float]:
    """The physical limit of gsp: prefill FLOPs of the tokens that must be computed (each
    prefix once, every question) at the measured matmul rate, plus decode bytes at the copy
    rate, with `concurrency` requests decoding together (one weight read per step) and each
    group's prefix KV read once per step, each request's own KV once."""
    n = shape.groups * shape.prompts_per_group
    p_lin = nonembed_params(cfg)
    hq, d, layers = cfg.num_heads, cfg.head_dim, cfg.num_layers
    prefill_tokens = shape.groups * shape.prefix_len + n * shape.question_len
    flops = 2 * p_lin * prefill_tokens + 2 * cfg.hidden_size * cfg.vocab_size * n  # last-token logits
    # causal attention (QK^T and PV, 2 FLOPs per MAC): prefix over itself, question over prefix + itself
    attn = shape.groups * (shape.prefix_len**2 / 2) + n * shape.question_len * (shape.prefix_len + shape.question_len / 2)
    flops += 4 * hq * d * layers * attn
    per_tok = kv_bytes_per_token(cfg)
    weights = 2 * (p_lin + cfg.hidden_size * cfg.vocab_size)  # bf16; lm_head read every step
    conc = min(concurrency, n)
    waves = math.ceil(n / conc)
    steps = waves * shape.output_len
    # KV read per decode step, averaged over the output: own tokens question + t (t = 0..out-1),
    # prefixes: the groups present in a wave (all of them when a wave has >= groups requests).
    groups_per_wave = min(shape.groups, conc)
    decode_bytes = steps * weights
    for w in range(waves):
        reqs = min(conc, n - w * conc)
        own = reqs * (shape.question_len * shape.output_len + shape.output_len * (shape.output_len - 1) / 2)
        decode_bytes += per_tok * (own + groups_per_wave * shape.prefix_len * shape.output_len)
    t_prefill = flops / CEIL["matmul_flops"]
    t_decode = decode_bytes / CEIL["copy_Bps"]
    return {"prefill_s": t_prefill, "decode_s": t_decode, "total_s": t_prefill + t_decode,
            "out_tokens": n * shape.output_len, "flops": flops, "decode_bytes": decode_bytes}


def metrics_rows(name: str, m: RunMetrics) -> None:
    p = lambda xs, q: percentile(xs, q) or 0.0  # noqa: E731
    add(name, "output tok/s (total tok/s)", f"{m.output_tps:,.0f} ({m.total_tps:,.0f})",
        note=f"{m.output_tokens} tokens in {m.wall_s:.2f} s")
    add(name, "TTFT p50 / p99", f"{p(m.ttft_s, 50) * 1e3:,.0f} / {p(m.ttft_s, 99) * 1e3:,.0f} ms",
        note="all requests submitted at once")
    add(name, "ITL p50 / p99", f"{p(m.itl_s, 50) * 1e3:.1f} / {p(m.itl_s, 99) * 1e3:.1f} ms")
    if m.peak_pages is not None:
        add(name, "peak KV pool use", f"{m.peak_pages} of {m.total_pages} pages")


def sec_engine_workloads(source: str, args: argparse.Namespace, subset: list[BenchRequest], shape: GSPShape,
                         budget_end_s: float | None) -> None:
    """gsp (full and the peer's subset), cached-prefix TTFT, host overhead, random: one engine."""
    t0 = time.perf_counter()
    engine = Engine(model=source, load_format="dummy", page_size=16, max_running=args.max_running,
                    max_batch_tokens=args.max_batch_tokens, max_model_len=16384, kv_cache_bytes=args.kv_gb << 30)
    kv_gib = sum(t.numel() * t.element_size() for t in engine.kv_cache.k + engine.kv_cache.v) / 2**30
    add("engine", "llama-1b engine start (dummy weights, graph capture)", f"{time.perf_counter() - t0:.1f} s",
        note=f"CUDA graphs {engine.cuda_graphs}, overlap {engine.overlap}, {_graph_summary(engine._loop.runner)}; "
             f"GPU memory allocated {torch.cuda.memory_allocated() / 2**30:.1f} GiB, of it KV {kv_gib:.1f} GiB")
    runner = engine._loop.runner
    try:
        # Both timed shapes (the subset, the full gsp), 8 output tokens each: prefill chunks of
        # the full gsp pick extend tiles the subset's do not (one compile each, ~1 s of TTFT).
        warm_up(engine, [gsp(GSPShape(groups, 16, shape.prefix_len, shape.question_len, 8), VOCAB_RANGE, seed=99)
                         for groups in (len(subset) // 16 or 1, shape.groups)])
        # ---- the peer's subset, then the full gsp
        sub = run_radixserve(engine, subset, name="gsp-subset")
        engine.wait_idle()
        add("gsp-sub", f"radixserve on the peer's subset ({len(subset)} requests)",
            f"{sub.output_tps:,.0f} out tok/s", note=f"{sub.wall_s:.2f} s")
        if PEER.get("tps"):
            ratio = sub.output_tps / float(PEER["tps"])  # type: ignore[arg-type]
            add("gsp", "out tok/s radixserve / transformers generate_batch, same subset",
                f"{ratio:,.1f}x", ">= 50x", ratio >= 50, ratio=True)
        _flush_tree(engine)
        reqs = gsp(shape, VOCAB_RANGE, seed=1)
        steps0, cascade0, graph0, burst0 = (engine.stats().steps, runner.cascade_steps, runner.graph_steps,
                                            runner.burst_launches)
        m = run_radixserve(engine, reqs, name="gsp")
        engine.wait_idle()
        engine.check_integrity()
        m.optimal_cached_tokens = gsp_optimal_hit_tokens(shape, 16)
        metrics_rows("gsp", m)
        hit, opt = m.hit_rate or 0.0, m.optimal_hit_rate or 1.0
        add("gsp", "cache hit rate / optimal", f"{hit * 100:.1f}% / {opt * 100:.1f}%")
        add("gsp", "hit rate vs optimal", f"{hit / opt:.3f}", ">= 0.98", hit / opt >= 0.98, ratio=True)
        st = engine.stats()
        add("gsp", "engine launches (cascade decode launches, decode bursts, graph replays)",
            f"{st.steps - steps0} ({runner.cascade_steps - cascade0}, {runner.burst_launches - burst0}, "
            f"{runner.graph_steps - graph0})", note=f"bursts of up to {engine.config.decode_burst} decode steps "
            f"at >= {engine.config.decode_burst_min_batch} running")
        if PEER.get("tps"):
            ratio = m.output_tps / float(PEER["tps"])  # type: ignore[arg-type]
            add("gsp", f"out tok/s radixserve full gsp / transformers on the subset", f"{ratio:,.1f}x",
                ">= 50x", ratio >= 50, ratio=True, note="different request counts; the same-subset ratio is above")
        cfg = engine.model_config
        for conc, label in ((shape.groups * shape.prompts_per_group, "all requests decoding together"),
                            (args.max_running, f"max_running {args.max_running}")):
            b = gsp_bound(shape, cfg, conc)
            frac = b["total_s"] / m.wall_s
            add("gsp", f"physical bound ({label})",
                f"{b['total_s']:.2f} s = {b['out_tokens'] / b['total_s']:,.0f} tok/s",
                note=f"prefill {b['flops'] / 1e12:.0f} TFLOP -> {b['prefill_s']:.2f} s, decode "
                     f"{b['decode_bytes'] / 1e12:.2f} TB -> {b['decode_s']:.2f} s")
            add("gsp", f"achieved fraction of the bound ({label})", f"{frac:.2f}", ">= 0.6", frac >= 0.6, ratio=True)

        def wanted(section: str) -> bool:
            return section in args.engine_sections and (budget_end_s is None or elapsed() < budget_end_s)

        if wanted("steps"):
            _flush_tree(engine)
            gsp_step_split(engine, gsp(shape, VOCAB_RANGE, seed=2), "gsp")
            _flush_tree(engine)
            gsp_step_split(engine, subset, "peer's subset")
        if wanted("ttft"):
            sec_ttft(engine)
        if wanted("overhead"):
            sec_overhead(engine, quick=args.quick)
        if args.random_requests and wanted("random"):
            sec_random(engine, args.random_requests)
    finally:
        free_engine(engine)


def _graph_summary(runner) -> str:  # noqa: ANN001 - a ModelRunner
    decode, prefill = runner.graphs, runner.prefill_graphs
    if decode is None:
        return "no graphs"
    out = f"decode: {len(decode.sizes)} batch sizes x (plain, cascade) in {decode.capture_s:.1f} s"
    if prefill is not None:
        out += (f", prefill: {len(prefill.token_buckets)} token x {len(prefill.request_buckets)} request buckets "
                f"in {prefill.capture_s:.1f} s")
    return out


def timed_run(engine: Engine, reqs: list[BenchRequest], name: str, *,
              events: bool = False) -> tuple[RunMetrics, LoopTiming]:
    """Run `reqs` to completion; also return the engine loop's timing over the run (with CUDA
    events around every step when `events`)."""
    loop = engine._loop
    loop.runner.profile = events
    before = engine.call_on_loop(loop.timing.snapshot)
    m = run_radixserve(engine, reqs, name=name)
    engine.wait_idle()
    timing = engine.call_on_loop(loop.timing.snapshot).since(before)
    loop.runner.profile = False
    return m, timing


def gsp_step_split(engine: Engine, reqs: list[BenchRequest], label: str) -> None:
    """A gsp run once more with device events around every step: where its time goes, decode steps
    (graph replays) apart from the steps that prefill (eager). Host = the engine thread's own
    work per step, wait = blocked on a readback, device = the step's span on the GPU."""
    loop = engine._loop
    engine.call_on_loop(lambda: setattr(loop, "trace", []))
    with GCPauses() as gc_pauses:
        m, d = timed_run(engine, reqs, "gsp-profiled", events=True)
    trace = engine.call_on_loop(lambda: loop.trace)
    engine.call_on_loop(lambda: setattr(loop, "trace", None))
    print_idle_gaps(label, trace)
    print(f"   {label}: {gc_pauses}", flush=True)
    n_dec, n_other = d.decode_steps, d.steps - d.decode_steps
    p_dec, p_other = d.profiled_decode_steps, d.profiled_steps - d.profiled_decode_steps
    host_other, dev_other = d.host_s - d.decode_host_s, d.device_s - d.decode_device_s

    def per(x: float, n: int) -> str:
        return f"{x / max(n, 1) * 1e3:.2f}"

    add("gsp-steps", f"{label}: decode launches (a burst is one): count, host / wait / device ms per launch "
        f"({m.wall_s:.2f} s run, events on)",
        f"{n_dec}: {per(d.decode_host_s, n_dec)} / {per(d.decode_wait_s, n_dec)} / {per(d.decode_device_s, p_dec)}",
        note=f"sums: host {d.decode_host_s:.2f} s, wait {d.decode_wait_s:.2f} s, device {d.decode_device_s:.2f} s, "
             f"device idle before them {d.decode_idle_s:.2f} s")
    add("gsp-steps", f"{label}: prefill and mixed steps: count, host / wait / device ms per step",
        f"{n_other}: {per(host_other, n_other)} / {per(d.wait_s - d.decode_wait_s, n_other)} / "
        f"{per(dev_other, p_other)}",
        note=f"sums: host {host_other:.2f} s, device {dev_other:.2f} s, "
             f"device idle before them {d.idle_s - d.decode_idle_s:.2f} s")


class GCPauses:
    """Python's garbage-collector pauses (any thread) while the block runs, by generation."""

    def __enter__(self) -> "GCPauses":
        self.pauses: list[tuple[int, float]] = []
        self._t0 = 0.0
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._t0))

    def __str__(self) -> str:
        parts = []
        for gen in (0, 1, 2):
            xs = [dt for g, dt in self.pauses if g == gen]
            if xs:
                parts.append(f"gen{gen} {len(xs)} x, {sum(xs) * 1e3:.1f} ms, longest {max(xs) * 1e3:.1f} ms")
        return "GC pauses: " + ("; ".join(parts) or "none")


def print_idle_gaps(label: str, trace: list[StepTrace]) -> None:
    """Where the device waited on the host between steps: idle seconds by (step before, step
    after) kind, and the longest gaps."""
    def kind(t: StepTrace) -> str:
        return f"burst {t.burst}" if t.burst > 1 else ("decode" if t.decode else "prefill/mixed")

    by_pair: dict[str, list[float]] = {}
    for before, after in zip(trace, trace[1:]):
        by_pair.setdefault(f"{kind(before)} -> {kind(after)}", []).append(after.idle_s)
    print(f"   {label}: device idle between steps, by kind (count, idle s, longest ms):", flush=True)
    for pair, gaps in sorted(by_pair.items(), key=lambda kv: -sum(kv[1])):
        print(f"     {pair:36s} {len(gaps):4d} {sum(gaps):7.3f} {max(gaps) * 1e3:8.2f}")
    longest = sorted(range(1, len(trace)), key=lambda i: -trace[i].idle_s)[:8]
    print("   longest gaps (step index, ms idle, rows, kind; span ms):", ", ".join(
        f"{i}: {trace[i].idle_s * 1e3:.1f} {trace[i].rows} {kind(trace[i])}; {trace[i].device_s * 1e3:.1f}"
        for i in sorted(longest)), flush=True)


def warm_up(engine: Engine, like: list[list[BenchRequest]]) -> None:
    """Compile what graph capture did not (prefill kernels, one specialization per tile config
    and shape class) before anything is timed: assorted prompts, then each run of `like`
    (requests shaped like the timed ones, on other prompts)."""
    rng = random.Random(1234)
    shared = random_ids(rng, 1024, *VOCAB_RANGE)
    prompts = [random_ids(rng, n, *VOCAB_RANGE) for n in (3000, 700, 90, 5)]
    prompts += [shared + random_ids(rng, 40, *VOCAB_RANGE) for _ in range(3)]
    t0 = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    engine.wait_idle()
    _flush_tree(engine)
    for reqs in like:
        run_radixserve(engine, reqs, name="warm-up")
        engine.wait_idle()
        _flush_tree(engine)
    print(f"   engine warm-up {time.perf_counter() - t0:.1f} s", flush=True)


def _flush_tree(engine: Engine) -> None:
    """Evict every unlocked cached page (the engine is idle): the next run starts cold."""
    def flush() -> None:
        tree = engine.scheduler.tree
        if tree is not None:
            tree.evict(tree.evictable_pages)
    engine.call_on_loop(flush)


def sec_ttft(engine: Engine) -> None:
    """TTFT of an 8k-token cached prefix + 128-token suffix vs the 128-token suffix alone
    (medians of 11 interleaved pairs), with the device time of the request's steps (CUDA
    events) to split device from host time."""
    rng = random.Random(5)
    prefix = random_ids(rng, 8192, *VOCAB_RANGE)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    loop, runner = engine._loop, engine._loop.runner

    def ttft(prompt: list[int]) -> tuple[float, float]:
        before = engine.call_on_loop(loop.timing.snapshot)
        t0 = time.perf_counter()
        engine.generate(prompt, params)
        wall = time.perf_counter() - t0
        engine.wait_idle()
        return wall, engine.call_on_loop(loop.timing.snapshot).since(before).device_s

    runner.profile = True
    try:
        engine.generate(prefix + random_ids(rng, 128, *VOCAB_RANGE), params)  # caches the prefix
        for _ in range(2):  # warm-up of both shapes
            ttft(random_ids(rng, 128, *VOCAB_RANGE))
            ttft(prefix + random_ids(rng, 128, *VOCAB_RANGE))
        # Interleaved pairs, each pair's order alternating, so that drifts of the host's speed
        # (the requests are bound by its kernel launches) weigh on both sides alike.
        cold: list[tuple[float, float]] = []
        warm: list[tuple[float, float]] = []
        sides = [(cold, []), (warm, prefix)]  # (results, the prompt's head)
        for i in range(11):
            for results, head in (sides if i % 2 == 0 else sides[::-1]):
                results.append(ttft(head + random_ids(rng, 128, *VOCAB_RANGE)))
        full = [ttft([rng.randrange(*VOCAB_RANGE)] + prefix[1:] + random_ids(rng, 128, *VOCAB_RANGE))
                for _ in range(3)]
    finally:
        runner.profile = False
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    add("ttft", "TTFT 128-token suffix alone (uncached)", f"{med(cold, 0) * 1e3:.1f} ms",
        note=f"device time of its steps {med(cold, 1) * 1e3:.2f} ms")
    add("ttft", "TTFT 8k cached prefix + 128-token suffix", f"{med(warm, 0) * 1e3:.1f} ms",
        note=f"device time of its steps {med(warm, 1) * 1e3:.2f} ms")
    add("ttft", "TTFT 8k + 128 tokens, nothing cached (for scale)", f"{med(full, 0) * 1e3:.1f} ms",
        note=f"device time of its steps {med(full, 1) * 1e3:.2f} ms")
    ratio = med(warm, 0) / med(cold, 0)
    add("ttft", "cached-prefix TTFT / suffix-only TTFT", f"{ratio:.2f}x", "<= 1.2x", ratio <= 1.2, ratio=True)


def sec_overhead(engine: Engine, quick: bool) -> None:
    """Requests decoding together: host time per decode step vs the step's device time, at batch
    64 (overlapped and synchronous loop) and 256 (overlapped)."""
    loop = engine._loop
    rng = random.Random(9)
    out_len = 128 if quick else 256
    results = {}
    for batch, overlap in ((64, True), (64, False), (256, True)):
        reqs = [BenchRequest(random_ids(rng, 512, *VOCAB_RANGE), out_len) for _ in range(batch)]
        engine.call_on_loop(lambda: setattr(loop, "overlap", overlap))
        m, d = timed_run(engine, reqs, f"overhead-{batch}-{overlap}", events=True)
        engine.call_on_loop(lambda: setattr(loop, "overlap", True))
        _flush_tree(engine)
        n = d.decode_steps
        host = d.decode_host_s / max(n, 1)
        wait = d.decode_wait_s / max(n, 1)
        dev = d.decode_device_s / max(d.profiled_decode_steps, 1)
        wall = host + wait
        results[(batch, overlap)] = (host, wait, dev, wall)
        mode = "overlapped loop" if overlap else "synchronous loop"
        burst = batch >= engine.config.decode_burst_min_batch and engine.config.decode_burst > 1
        unit = f"launch (bursts of up to {engine.config.decode_burst} steps)" if burst else "step"
        add("overhead", f"batch {batch} decode, {mode}: wall / device / host per {unit}",
            f"{wall * 1e3:.2f} / {dev * 1e3:.2f} / {host * 1e3:.2f} ms",
            note=f"{n} decode launches; ITL p50 {(percentile(m.itl_s, 50) or 0) * 1e3:.2f} ms; "
                 f"host {host / batch * 1e6:.1f} us per request per launch")
    host, wait, dev, wall = results[(64, True)]
    exposed = max(0.0, wall - dev)
    add("overhead", "exposed host time per decode step (wall - device) / step, batch 64, overlapped",
        f"{exposed / wall:.3f}", "<= 0.10", exposed / wall <= 0.10, ratio=True,
        note=f"host busy {host / dev:.2f}x of the device time")
    s_host, _, s_dev, s_wall = results[(64, False)]
    add("overhead", "the same, synchronous loop (for scale)", f"{(s_wall - s_dev) / s_wall:.3f}", ratio=True)
    host, wait, dev, wall = results[(256, True)]
    add("overhead", "the same at batch 256, overlapped", f"{max(0.0, wall - dev) / wall:.3f}", ratio=True,
        note=f"host busy {host / dev:.2f}x of the device time")


def sec_random(engine: Engine, count: int) -> None:
    """random: 512 in / 256 out, nothing shared, radix cache on vs off, in six runs of count/6
    requests ordered on, off, off, on, on, off (drift cancels), each on fresh prompts, after an
    untimed run of the same shape. The same engine serves both: the tree is emptied and
    detached (the scheduler then runs exactly as with enable_prefix_cache=False) and attached
    again. Reported: tokens over time summed per mode, and the engine thread's host time per
    decode row (the cache's cost is host work)."""
    rng = random.Random(3)
    per_run = max(1, count // 6)
    tree = engine.scheduler.tree

    def set_tree(value) -> None:  # noqa: ANN001
        s = engine.scheduler
        if s.tree is not None:
            s.tree.evict(s.tree.evictable_pages)
        if s.allocator.num_free != s.allocator.num_pages:
            raise RuntimeError("pages still held: cannot switch the radix cache")
        s.tree = value

    totals = {"on": [0, 0.0, 0.0, 0], "off": [0, 0.0, 0.0, 0]}  # tokens, seconds, decode host s, decode rows
    per_run_tps: dict[str, list[float]] = {"on": [], "off": []}
    # An untimed run of the same shape first: the first timed run took the one-time costs of
    # the shape (kernel compiles, allocator growth) when this section ran early (13k vs 29k tok/s).
    run_radixserve(engine, [BenchRequest(random_ids(rng, 512, *VOCAB_RANGE), 256) for _ in range(per_run)],
                   name="random-warm-up")
    engine.wait_idle()
    for label in ("on", "off", "off", "on", "on", "off"):
        reqs = [BenchRequest(random_ids(rng, 512, *VOCAB_RANGE), 256) for _ in range(per_run)]
        engine.call_on_loop(lambda v=(tree if label == "on" else None): set_tree(v))
        m, d = timed_run(engine, reqs, f"random-{label}-{len(per_run_tps[label])}")
        engine.check_integrity()
        t = totals[label]
        t[0] += m.output_tokens
        t[1] += m.wall_s
        t[2] += d.decode_host_s
        t[3] += d.decode_steps
        per_run_tps[label].append(m.output_tps)
    engine.call_on_loop(lambda: set_tree(tree))
    tps = {k: v[0] / v[1] for k, v in totals.items()}
    host_per_step = {k: v[2] / max(v[3], 1) for k, v in totals.items()}
    for label in ("on", "off"):
        add("random", f"{3 * per_run} requests in 3 runs, radix cache {label}: out tok/s", f"{tps[label]:,.0f}",
            note="runs " + ", ".join(f"{x:,.0f}" for x in per_run_tps[label])
                 + f"; host per decode step {host_per_step[label] * 1e3:.2f} ms")
    cost = 1 - tps["on"] / tps["off"]
    add("random", "throughput cost of the radix cache (1 - on / off)", f"{cost * 100:+.1f}%", "<= 1%",
        cost <= 0.01, ratio=True, note=f"run-to-run spread {_spread(per_run_tps) * 100:.0f}%")


def _spread(runs: dict[str, list[float]]) -> float:
    """Largest relative deviation of a run from its mode's mean."""
    out = 0.0
    for xs in runs.values():
        mean = sum(xs) / len(xs)
        out = max(out, max(abs(x - mean) / mean for x in xs))
    return out


# ------------------------------------------------------------------ logs of the suite's other steps


def fold_logs(tests_log: Path | None, kernels_log: Path | None, results_dir: Path | None) -> None:
    if tests_log is not None and tests_log.is_file():
        text = tests_log.read_text(errors="replace")
        summary = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
        line = summary[-1].strip("= ") if summary else "no summary line"
        ok = "failed" not in line and "error" not in line and "passed" in line
        add("tests", "pytest -m gpu (kernels, model, engine on CUDA)", line, "all pass", ok)
        for ln in text.splitlines():
            if ln.startswith("FAILED") or ln.startswith("ERROR"):
                add("tests", ln[:110], "", ok=False)
    if results_dir is not None and (results_dir / "parity.json").is_file():
        par = json.loads((results_dir / "parity.json").read_text())
        for key, label in (("vs_reference", "Triton (graphs, overlap) vs PyTorch reference ops"),
                           ("graphs_vs_eager", "Triton graphs+overlap vs Triton eager+sync")):
            r = par[key]
            add("parity", f"greedy llama-1b, {label}",
                f"{r['identical']}/{r['prompts']} identical",
                f"else only at top-2 gap < {par['tie_nats']} nats", True,
                note=f"divergences {[(d['step'], round(d['top2_gap'], 3)) for d in r['divergences']]}, "
                     f"max chosen-logprob diff {r['max_logprob_diff']:.3f}")
    if kernels_log is not None and kernels_log.is_file():
        text = kernels_log.read_text(errors="replace")
        if "=" * 150 not in text:
            add("kernels", "bench_kernels.py", "no table", ok=False, note="see kernels log")
            return
        table = text.split("=" * 150)[-1].strip().splitlines()[1:]
        for ln in table:
            parts = re.split(r"\s{2,}", ln.strip(), maxsplit=3)
            if len(parts) >= 3:
                add("kernels", f"{parts[0]} {parts[1]}"[:70], parts[2], note=parts[3] if len(parts) > 3 else "")


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tokenizer-dir", type=Path, default=REPO / "build" / "gpu_assets" / "tokenizer")
    parser.add_argument("--only", default="ceilings,decode,peer,engine")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    parser.add_argument("--groups", type=int, default=64, help="gsp groups (16 prompts each)")
    parser.add_argument("--peer-groups", type=int, default=2, help="gsp groups the transformers peer runs")
    parser.add_argument("--random-requests", type=int, default=3000, help="over six alternating runs")
    parser.add_argument("--max-running", type=int, default=1024)
    parser.add_argument("--max-batch-tokens", type=int, default=16384, help="the engine's per-step token budget")
    parser.add_argument("--engine-sections", default="steps,ttft,overhead,random",
                        help="what the engine section runs after gsp")
    parser.add_argument("--kv-gb", type=int, default=24)
    parser.add_argument("--budget-s", type=float, default=None, help="skip sections that start later")
    parser.add_argument("--tests-log", type=Path, default=None)
    parser.add_argument("--kernels-log", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("radixserve").setLevel(logging.INFO)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    props = torch.cuda.get_device_properties(0)
    import triton
    import transformers

    header = (f"radixserve GPU suite, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {props.name} "
              f"({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
              f"triton {triton.__version__}, transformers {transformers.__version__}"
              f"{', QUICK sizes' if args.quick else ''}")
    print(header, flush=True)
    budget = args.budget_s
    fold_logs(args.tests_log, None, args.out)
    section("ceilings", sec_ceilings, None)
    if "decode" in only:
        section("decode", lambda: sec_decode(args.quick), budget)
    shape = GSPShape(args.groups, 16, 2048, 128, 256) if not args.quick else GSPShape(8, 16, 2048, 128, 64)
    subset_shape = GSPShape(args.peer_groups, 16, shape.prefix_len, shape.question_len, shape.output_len)
    subset = gsp(subset_shape, VOCAB_RANGE, seed=0)
    source = model_source("llama-1b", args.tokenizer_dir)
    if "peer" in only:
        folder = shape_folder("llama-1b", args.tokenizer_dir)
        section("peer", lambda: sec_peer(source, folder, subset), budget)
    if "engine" in only:
        section("engine", lambda: sec_engine_workloads(source, args, subset, shape, budget), budget)
    fold_logs(None, args.kernels_log, None)
    print_table(args.out, header)
    print(f"total {elapsed():.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
