"""Host cost of eager prefill steps on the GPU: how long the host takes to launch them, by op.

    python benchmarks/profile_prefill.py                  # llama-1b: gsp chunk, TTFT shapes
    python benchmarks/profile_prefill.py --top 40 --mm    # + the LM head's matmul variants
    python benchmarks/profile_prefill.py --engine-ttft    # the TTFT pairs through the engine, by phase

A prefill step runs eagerly (no CUDA graph), so the host launches its ~180 kernels one by one;
where the host takes longer to launch a step than the device takes to run it, the device
waits (benchmarks/RESULTS.md: gsp's prefill steps, the cached-prefix TTFT). For each shape
this builds one ForwardBatch (random tokens, random KV already in the pages) and runs the
model on it: host milliseconds per forward (perf_counter around the call, the device idle
before it), device milliseconds (CUDA events), then cProfile over repeated forwards (one
thread: the shares are clean; cProfile slows Python ~1.5-2x, read the shares) and
torch.profiler's tables: host time by op, device time by kernel. Shapes:

  gsp chunk    128 requests x 128 new tokens over 2048 cached each (16k tokens: gsp's steps)
  ttft cold    1 request, 128 new tokens, nothing cached
  ttft warm    1 request, 128 new tokens over 8192 cached

`--engine-ttft` runs those two TTFT shapes through an Engine instead (as gpu_bench's TTFT
section does: interleaved pairs, medians) with a timer around each phase of the engine thread
(schedule, launch, fold, release, ...) and the caller's own preparation of the request, so
that a difference between the two TTFTs can be put on a phase.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from radixserve.runtime.forward_batch import SeqStep, build_forward_batch  # noqa: E402
from radixserve.runtime.kv_cache import KVCache  # noqa: E402
from radixserve.runtime.loader import ResolvedModel, load_model  # noqa: E402
from radixserve.runtime.model_config import NAMED_SHAPES  # noqa: E402

PAGE = 16
SHAPES = {  # name -> (requests, new tokens each, cached tokens each)
    "gsp chunk": (128, 128, 2048),
    "ttft cold": (1, 128, 0),
    "ttft warm": (1, 128, 8192),
}


def make_batch(requests: int, new: int, cached: int, vocab: int, rng: random.Random):  # noqa: ANN201
    pages_each = -(-(new + cached) // PAGE)
    steps = [
        SeqStep(token_ids=[rng.randrange(vocab) for _ in range(new)], start=cached,
                pages=list(range(r * pages_each, (r + 1) * pages_each)), logits_from=new - 1)
        for r in range(requests)
    ]
    return build_forward_batch(steps, PAGE, "cuda")


def host_and_device_ms(fn, reps: int) -> tuple[float, float]:  # noqa: ANN001
    """Median host ms (launching, device idle at the start) and device ms (events) of fn()."""
    host, device = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        host.append((time.perf_counter() - t0) * 1e3)
        end.synchronize()
        device.append(start.elapsed_time(end))
    return statistics.median(host), statistics.median(device)


def back_to_back_host_ms(fn, calls: int = 4) -> list[float]:  # noqa: ANN001
    """Host ms of each of `calls` calls of fn() issued without waiting: does launching block
    once the device is behind (the engine launches step t+1 while the device runs step t)?"""
    torch.cuda.synchronize()
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return out


def cprofile_top(fn, reps: int, top: int) -> str:  # noqa: ANN001
    """cProfile of `reps` calls, each from an idle device (calls queued behind each other
    would block in their launches once the queue fills, and that wait would show as own time)."""
    prof = cProfile.Profile()
    for _ in range(reps):
        torch.cuda.synchronize()
        prof.enable()
        fn()
        prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def torch_ops_top(fn, reps: int, top: int) -> str:  # noqa: ANN001
    """torch.profiler over `reps` calls: ops by host time, then kernels by device time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    ops = prof.key_averages()
    return "\n".join([f"-- by host time ({reps} calls)",
                       ops.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=50),
                       f"-- by device time ({reps} calls)",
                       ops.table(sort_by="self_device_time_total", row_limit=top, max_name_column_width=50)])


def lm_head_variants(hidden: int, vocab: int) -> list[str]:
    """Host and device time of the LM head's matmul ways, at row counts a prefill step has."""
    w = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16)
    lines = []
    for rows in (1, 128, 129, 1024):
        h = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
        ways = {
            "mm out_dtype=fp32": lambda: torch.mm(h, w.t(), out_dtype=torch.float32),
            "linear bf16 then .float()": lambda: torch.nn.functional.linear(h, w).float(),
            "linear bf16": lambda: torch.nn.functional.linear(h, w),
        }
        for name, fn in ways.items():
            with torch.inference_mode():
                fn()
                host, device = host_and_device_ms(fn, 20)
            lines.append(f"   LM head {rows:5d} rows  {name:28s} host {host:7.3f} ms  device {device:7.3f} ms")
    return lines


class PhaseTimers:
    """Wall time of chosen methods while the block runs, summed per label (`take` to read and
    reset)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def wrap(self, fn, label: str):  # noqa: ANN001, ANN202 - for harness.wrapped_methods
        def timed(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.totals[label] = self.totals.get(label, 0.0) + time.perf_counter() - t0

        return timed

    def take(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


def engine_ttft(model: str, cached: int, pairs: int = 15) -> list[str]:
    """Cold (128 tokens) and warm (`cached` + 128) TTFT through the engine, by phase (medians)."""
    from benchmarks.gpu_bench import VOCAB_RANGE, model_source
    from benchmarks.harness import wrapped_methods
    from benchmarks.workloads import random_ids
    from radixserve.runtime import Engine, SamplingParams

    cuda = torch.cuda.is_available()
    engine = Engine(model=model_source(model, REPO / "build" / "gpu_assets" / "tokenizer"), load_format="dummy",
                    page_size=16, max_model_len=cached + 256, kv_cache_bytes=(8 << 30) if cuda else None)
    loop, runner, sched = engine._loop, engine._loop.runner, engine.scheduler
    rng = random.Random(5)
    prefix = random_ids(rng, cached, *VOCAB_RANGE)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    engine.generate(prefix + random_ids(rng, 128, *VOCAB_RANGE), params)
    parts = [(engine, "_prepare", "caller: prepare"), (sched, "schedule", "schedule"),
             (runner, "launch", "launch"), (loop, "_fold", "fold (wait included)"),
             (sched, "postprocess_computed", "postprocess_computed"), (loop, "_release", "release")]
    runner.profile = True
    rows: dict[str, dict[str, list[float]]] = {"cold": {}, "warm": {}}
    timers = PhaseTimers()
    with wrapped_methods(parts, timers.wrap):
        for i in range(pairs + 2):
            for side in (("cold", "warm") if i % 2 == 0 else ("warm", "cold")):
                prompt = (prefix if side == "warm" else []) + random_ids(rng, 128, *VOCAB_RANGE)
                before = engine.call_on_loop(loop.timing.snapshot)
                t0 = time.perf_counter()
                engine.generate(prompt, params)
                wall = time.perf_counter() - t0
                engine.wait_idle()
                device = engine.call_on_loop(loop.timing.snapshot).since(before).device_s
                phases = timers.take() | {"TTFT (generate wall)": wall, "device time of the step": device}
                if i >= 2:  # the first pairs warm up
                    for name, sec in phases.items():
                        rows[side].setdefault(name, []).append(sec)
    engine.shutdown()
    lines = [f"   {'phase':28s} {'cold ms':>9s} {'warm ms':>9s}"]
    for name in rows["warm"]:
        c, w = (statistics.median(rows[s].get(name, [0.0])) * 1e3 for s in ("cold", "warm"))
        lines.append(f"   {name:28s} {c:9.3f} {w:9.3f}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--mm", action="store_true", help="also time the LM head's matmul variants")
    ap.add_argument("--engine-ttft", action="store_true", help="only the TTFT pairs through an engine, by phase")
    args = ap.parse_args()
    if args.engine_ttft:
        cached = 8192 if torch.cuda.is_available() else 1536  # tiny-llama (a CPU smoke run) has 2048 positions
        print("\n".join([f"== engine TTFT by phase (medians), {args.model}"] + engine_ttft(args.model, cached)))
        return 0
    cfg = NAMED_SHAPES[args.model]
    resolved = ResolvedModel(name=args.model, path=None, config=cfg, load_format="dummy", tokenizer_path=None)
    model = load_model(resolved, "cuda", torch.bfloat16, progress=False)
    names = args.shapes.split(",")
    pages = max(r * -(-(n + c) // PAGE) for r, n, c in (SHAPES[s] for s in names))
    kv = KVCache.for_model(cfg, pages + 1, PAGE, torch.bfloat16, "cuda")
    for t in kv.k + kv.v:
        t.normal_(0, 1)
    rng = random.Random(0)
    summary = []
    for name in names:
        batch = make_batch(*SHAPES[name], cfg.vocab_size, rng)

        def forward(batch=batch):  # noqa: ANN001, ANN202
            with torch.inference_mode():
                return model(batch, kv)

        for _ in range(3):
            forward()
        host, device = host_and_device_ms(forward, args.reps)
        behind = back_to_back_host_ms(forward)
        summary.append(f"   {name:10s} host {host:7.2f} ms  device {device:7.2f} ms  "
                       f"({batch.input_ids.shape[0]} tokens); host of back-to-back calls "
                       + ", ".join(f"{x:.2f}" for x in behind) + " ms")
        print(f"\n== {name}: host {host:.2f} ms to launch, device {device:.2f} ms (medians of {args.reps})")
        print(cprofile_top(forward, args.reps, args.top))
        print(torch_ops_top(forward, 5, args.top))
    if args.mm:
        summary += lm_head_variants(cfg.hidden_size, cfg.vocab_size)
    print("\n".join(["\n== summary"] + summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
