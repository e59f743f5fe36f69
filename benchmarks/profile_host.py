"""Where the engine thread's host time goes on gsp: cProfile of every step, decode apart.

    python benchmarks/profile_host.py                      # llama-1b on CUDA, 8 groups x 16
    python benchmarks/profile_host.py --groups 32 --top 30
    python benchmarks/profile_host.py --groups 2 --prefill-kernels 8   # + kernels of a prefill
    python benchmarks/profile_host.py --model tiny-llama --device cpu --groups 2   # a smoke run

    python benchmarks/profile_host.py --groups 64 --max-running 1024 \
        --engine-arg kv_cache_bytes=25769803776                # the GPU bench's gsp and KV size

Where the engine thread's time goes when it bounds a step (benchmarks/RESULTS.md, `gsp-steps`
rows): this warms up on gsp-shaped requests, then runs gsp with a fresh cProfile around every
engine step (the engine thread held until every request is queued), and prints the functions
with the most own time over the decode steps (every row adds one token: graph replays) and
over the other steps (prefill chunks, alone or mixed with decode rows), each beside the steps'
count and host time per step. cProfile slows Python down (roughly 1.5-2x), so read the shares,
not the absolute times. Python 3.12 profiles every thread, and a garbage-collector pause lands
in whatever function was running: `gpu_bench.py`'s step split reports GC pauses on their own.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gpu_bench import VOCAB_RANGE, model_source, warm_up  # noqa: E402
from benchmarks.harness import run_radixserve, wrapped_methods  # noqa: E402
from benchmarks.workloads import GSPShape, gsp  # noqa: E402
from radixserve.runtime import Engine  # noqa: E402
from radixserve.runtime.engine_loop import Call  # noqa: E402


class StepProfiles:
    """Wraps an engine loop's `step` with a fresh profiler per step, filed by step kind."""

    def __init__(self, loop) -> None:  # noqa: ANN001 - an EngineLoop
        self.loop = loop
        self.decode: list[cProfile.Profile] = []
        self.other: list[cProfile.Profile] = []
        self.decode_s = self.other_s = 0.0
        self._step = loop.step

    def __enter__(self) -> "StepProfiles":
        self.loop.step = self._profiled_step  # the loop calls self.step(): the instance attribute wins
        return self

    def __exit__(self, *exc: object) -> None:
        del self.loop.step

    def _profiled_step(self) -> None:
        before = self.loop.timing.decode_steps
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        try:
            self._step()
        finally:
            prof.disable()
            dt = time.perf_counter() - t0
            if self.loop.timing.decode_steps > before:
                self.decode.append(prof)
                self.decode_s += dt
            else:
                self.other.append(prof)
                self.other_s += dt

    def report(self, top: int) -> str:
        out = io.StringIO()
        for label, profs, total in (("decode steps", self.decode, self.decode_s),
                                    ("prefill and mixed steps", self.other, self.other_s)):
            if not profs:
                continue
            out.write(f"\n== {label}: {len(profs)} steps, {total / len(profs) * 1e3:.2f} ms per step "
                      f"(wall with cProfile on, waits included)\n")
            stats = pstats.Stats(profs[0], stream=out)
            for p in profs[1:]:
                stats.add(p)
            stats.sort_stats("tottime").print_stats(top)
            stats.sort_stats("cumulative").print_stats(top)
        return out.getvalue()


def _release_when_queued(loop, count: int, release: threading.Event) -> None:  # noqa: ANN001
    while loop.inbox.pending_requests() < count:
        time.sleep(0.005)
    release.set()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--prefix", type=int, default=2048)
    ap.add_argument("--question", type=int, default=128)
    ap.add_argument("--out-len", type=int, default=256)
    ap.add_argument("--max-running", type=int, default=512)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--tokenizer-dir", type=Path, default=REPO / "build" / "gpu_assets" / "tokenizer")
    ap.add_argument("--prefill-kernels", type=int, default=0, metavar="GROUPS",
                    help="then profile the kernels of a prefill-only gsp of GROUPS groups (torch.profiler)")
    ap.add_argument("--torch-ops", action="store_true",
                    help="instead of cProfile: torch.profiler (CPU and CUDA) over the run; the ops and CUDA "
                         "runtime calls with the most host time, with the prefill steps' labelled")
    ap.add_argument("--trace", type=Path, default=None,
                    help="with --torch-ops: also write the run's Chrome trace (host ops and kernels) here")
    ap.add_argument("--engine-arg", action="append", default=[], metavar="KEY=INT",
                    help="extra integer Engine arguments, e.g. decode_burst=8")
    args = ap.parse_args()
    extra = {k: int(v) for k, v in (a.split("=", 1) for a in args.engine_arg)}
    cuda = args.device != "cpu" and torch.cuda.is_available()
    settings = dict(page_size=16, max_running=args.max_running, max_batch_tokens=16384,
                    max_model_len=max(4096 if cuda else 0, args.prefix + args.question + args.out_len + 64))
    engine = Engine(model=model_source(args.model, args.tokenizer_dir), load_format="dummy", device=args.device,
                    **(settings | extra))
    shape = GSPShape(args.groups, 16, args.prefix, args.question, args.out_len)
    if cuda:  # compile the Triton kernels that graph capture did not (warm_up sends 3000-token prompts)
        warm_up(engine, [gsp(GSPShape(groups, 16, args.prefix, args.question, 8), VOCAB_RANGE, seed=99)
                         for groups in sorted({min(args.groups, 2), args.groups})])
    reqs = gsp(shape, VOCAB_RANGE, seed=1)
    loop = engine._loop
    if args.torch_ops:
        print(torch_ops(engine, reqs, args.top, args.trace))
    else:
        # cProfile (Python 3.12) sees every thread: hold the engine thread until every request
        # is queued, so the submitting thread's work stays out of the steps' profiles.
        release = threading.Event()
        loop.inbox.put(Call(release.wait, Future()))
        threading.Thread(target=_release_when_queued, args=(loop, len(reqs), release), daemon=True).start()
        with StepProfiles(loop) as profiles:
            m = run_radixserve(engine, reqs, name="gsp-profiled")
            engine.wait_idle()
        print(f"gsp {args.groups} x 16 on {args.model}: {m.wall_s:.2f} s with cProfile on, "
              f"{m.output_tps:,.0f} out tok/s")
        print(profiles.report(args.top))
    if cuda and args.prefill_kernels:
        print(prefill_kernels(engine, GSPShape(args.prefill_kernels, 16, args.prefix, args.question, 1), args.top))
    engine.shutdown()
    return 0


def torch_ops(engine: Engine, reqs: list, top: int, trace: Path | None = None) -> str:  # noqa: ANN001
    """torch.profiler over a gsp run: host time by op and CUDA runtime call (what a step's
    launches cost, without cProfile's per-call overhead), every step in a labelled range."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile as torch_profile

    loop = engine._loop

    def labelled(fn, label: str):  # noqa: ANN001, ANN202
        def wrapped(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            with record_function(label):
                return fn(*a, **kw)

        return wrapped

    parts = ((loop, "step", "#engine-step"), (loop, "_fold", "#fold"), (loop.scheduler, "schedule", "#schedule"),
             (loop.runner, "launch", "#launch"), (loop.runner, "_forward_eager", "#forward-eager"),
             (loop.runner, "_forward_graph", "#forward-graph"), (loop.runner, "_plan_cascade", "#plan-cascade"))
    with wrapped_methods(parts, labelled):
        # The profiler records the thread that starts it: start and stop it on the engine thread.
        prof = torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        engine.call_on_loop(prof.start)
        m = run_radixserve(engine, reqs, name="gsp-torch-ops")
        engine.wait_idle()
        engine.call_on_loop(prof.stop)
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60)
    return f"gsp with torch.profiler on: {m.wall_s:.2f} s, {m.output_tps:,.0f} out tok/s\n{table}"


def prefill_kernels(engine: Engine, shape: GSPShape, top: int) -> str:
    """The kernels of gsp's prefill alone (one output token per request), by device time."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile as torch_profile

    from benchmarks.profile_decode import short

    reqs = gsp(shape, VOCAB_RANGE, seed=7)
    tokens = sum(len(r.prompt_ids) for r in reqs)
    steps0 = engine.stats().steps
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        m = run_radixserve(engine, reqs, name="gsp-prefill")
        engine.wait_idle()
        torch.cuda.synchronize()
    per: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type.name == "CUDA" and ev.device_time_total > 0:
            per[short(ev.name)] += ev.device_time_total
    total = sum(per.values())
    lines = [f"\n== prefill kernels: gsp {shape.groups} x 16, {tokens} prompt tokens ({m.cached_tokens} cached) in "
             f"{engine.stats().steps - steps0} steps, {m.wall_s * 1e3:.0f} ms wall, kernels {total / 1e3:.1f} ms"]
    for name, us in sorted(per.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"   {us / 1e3:9.2f} ms  {us / max(total, 1e-9):5.1%}  {name}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
