"""Host (CPU) cost of the engine thread per running request per decode step, with no GPU.

On an H100 the engine's host work per decode step (schedule, fold the sampled tokens,
detokenize, stop checks, emit deltas) is what bounds throughput at large batches
(benchmarks/RESULTS.md, "overhead" rows). That work is plain Python, so it can be measured
on the CPU: this script runs an `Engine` on the CPU over the random-weight `tiny-llama` shape
(the default model's tokenizer, so detokenization is real), lets `--batch` requests decode
long outputs together (`ignore_eos`), and times every decode step of the engine thread. The
model runner's `launch` (forward, sampling, batch tensors: device work on a GPU, and not this
script's subject) is timed separately and subtracted (and left out of `--profile`), so

    host per request = (step time - launch time) / running requests

which is the CPU counterpart of RESULTS.md's "host ... us per request" minus the runner's
own host share. Time is the engine thread's own CPU time (`time.thread_time`), which other
processes on a busy machine do not inflate the way they inflate wall time; the wall-time
figure is printed beside it. Greedy (temperature 0) and sampled (temperature 1, top_p 0.9) requests are
measured separately; figures are medians over `--repeat` runs (the machine is noisy).

The model's logits are cut to their first `--logits-width` columns (8192: a top-p sort over
all 49152 costs the CPU ~5 ms per row, which would make a 256-request run take many minutes);
the tokens drawn are then ids below that width, ordinary BPE pieces plus the special tokens.

Run from the repository root:

    .venv/bin/python -m benchmarks.host_overhead                      # 64 and 256 requests
    .venv/bin/python -m benchmarks.host_overhead --batch 256 --profile 25   # + cProfile top 25

`--profile N` profiles the engine thread over the decode steps of the last run of each
setting and prints the N functions with the most own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from radixserve.runtime import Engine, SamplingParams, StreamDelta

# Token ids sampled for prompts: past the tokenizer's special tokens, inside its vocabulary.
PROMPT_ID_RANGE = (100, 49000)


@dataclass
class StepLog:
    """Per decode step of the engine thread: wall and thread-CPU seconds of the step and of
    its `runner.launch` calls, and the number of running requests at its start."""

    wall: list[float] = field(default_factory=list)
    launch: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    launch_cpu: list[float] = field(default_factory=list)
    running: list[int] = field(default_factory=list)

    def per_request_us(self, cpu: bool = True) -> list[float]:
        steps, launches = (self.cpu, self.launch_cpu) if cpu else (self.wall, self.launch)
        return [(s - l) / n * 1e6 for s, l, n in zip(steps, launches, self.running) if n]


class _NarrowLogits(torch.nn.Module):
    """The model, with its logits cut to the first `width` columns (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, width: int) -> None:
        super().__init__()
        self.model = model
        self.width = width

    def forward(self, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
        return self.model(*args, **kwargs)[:, : self.width]


class StepInstrument:
    """Wraps the engine thread's `step` and the runner's `launch` to time each steady decode
    step, or every step (`steady_only=False`), and pauses `profiler` inside `launch`. Installed as instance attributes, so the engine's
    own code is untouched."""

    def __init__(self, engine: Engine, steady_only: bool = True) -> None:
        self.steady_only = steady_only  # False: record every step (admission, prefill, finish)
        self.loop = engine._loop
        self.log = StepLog()
        self.recording = False
        self.profiler: cProfile.Profile | None = None
        self.last_profile: cProfile.Profile | None = None
        self._launch_s = self._launch_cpu = 0.0
        runner = self.loop.runner
        launch, step = runner.launch, self.loop.step

        def timed_launch(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            profiler = self.profiler
            if profiler is not None:
                profiler.disable()
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return launch(*args, **kwargs)
            finally:
                self._launch_s += time.perf_counter() - t0
                self._launch_cpu += time.thread_time() - c0
                if profiler is not None:
                    profiler.enable()

        def timed_step() -> None:
            timing = self.loop.timing
            decode_before, running = timing.decode_steps, len(self.loop.scheduler.running)
            self._launch_s = self._launch_cpu = 0.0
            t0, c0 = time.perf_counter(), time.thread_time()
            step()
            wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            # A decode step whose running set did not change: every row is steady-state decode.
            steady = timing.decode_steps > decode_before and running == len(self.loop.scheduler.running)
            if self.recording and (steady or not self.steady_only):
                log = self.log
                log.wall.append(wall)
                log.launch.append(self._launch_s)
                log.cpu.append(cpu)
                log.launch_cpu.append(self._launch_cpu)
                log.running.append(running)

        runner.launch = timed_launch
        self.loop.step = timed_step

    def start_profile(self) -> None:
        """Run on the engine thread (cProfile hooks the thread that enables it)."""
        self.profiler = cProfile.Profile()
        self.profiler.enable()

    def stop_profile(self) -> None:
        assert self.profiler is not None
        self.profiler.disable()
        self.last_profile, self.profiler = self.profiler, None


def submit_and_wait(engine: Engine, count: int, params: SamplingParams, prompt_len: int, seed: int,
                    on_delta: Callable[[StreamDelta], None] | None = None) -> None:
    """Submit `count` random prompts of `prompt_len` tokens at once and return when all have
    finished (`on_delta`, when given, sees every delta first)."""
    rng = random.Random(seed)
    done = threading.Event()
    remaining = [count]
    lock = threading.Lock()

    def count_finished(delta: StreamDelta) -> None:
        if on_delta is not None:
            on_delta(delta)
        if delta.finish_reason is not None:
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

    for i in range(count):
        prompt = [rng.randrange(*PROMPT_ID_RANGE) for _ in range(prompt_len)]
        engine.submit(prompt, params, on_delta=count_finished, request_id=f"bench-{seed}-{i}")
    done.wait()


def run_once(engine: Engine, inst: StepInstrument, batch: int, params: SamplingParams, prompt_len: int,
             seed: int, profile: bool) -> StepLog:
    """Submit `batch` requests at once and record their steady decode steps."""
    stamps: dict[str, list[float]] = {}

    def consume(delta: StreamDelta) -> None:
        # What a streaming consumer does per delta (as benchmarks/harness.py's collector).
        stamps.setdefault(delta.request_id, []).append(time.perf_counter())

    inst.log = StepLog()
    inst.recording = True
    if profile:
        engine.call_on_loop(inst.start_profile)
    submit_and_wait(engine, batch, params, prompt_len, seed, consume)
    if profile:
        engine.call_on_loop(inst.stop_profile)
    inst.recording = False
    engine.wait_idle()
    flush_tree(engine)
    return inst.log


def flush_tree(engine: Engine) -> None:
    """Evict everything cached, so each run starts from the same empty pool."""
    sched = engine.scheduler
    if sched.tree is not None:
        engine.call_on_loop(lambda: sched.tree.evict(sched.allocator.num_pages))


def _print_profile(profiler: cProfile.Profile, top: int) -> None:
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(top)
    print(buf.getvalue())


#: name -> sampling settings (max_tokens comes from --out-len).
SETTINGS = {
    "greedy": dict(temperature=0.0, ignore_eos=True),
    "top_p": dict(temperature=1.0, top_p=0.9, ignore_eos=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--out-len", type=int, default=96, help="tokens generated per request")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--logits-width", type=int, default=8192, help="logits columns kept (0: all)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--sync", action="store_true", help="synchronous loop instead of the overlapped one")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print cProfile's top N (own time)")
    args = ap.parse_args()

    engine = Engine(model="tiny-llama", load_format="dummy", device="cpu", page_size=16,
                    max_running=max(args.batch), max_batch_tokens=4096, overlap=not args.sync,
                    num_pages=max(args.batch) * (args.prompt_len + args.out_len + 32) // 16 + 64)
    if args.logits_width:
        engine._loop.runner.model = _NarrowLogits(engine._loop.runner.model, args.logits_width)
    inst = StepInstrument(engine)
    try:
        print(f"host per request per decode step (us of engine-thread CPU time; median of {args.repeat} "
              f"runs, each the median of its steady decode steps), {'sync' if args.sync else 'overlapped'} loop")
        for name in args.settings:
            params = SamplingParams(max_tokens=args.out_len, **SETTINGS[name])
            for batch in args.batch:
                medians, walls, launch_ms, steps = [], [], [], 0
                for r in range(args.repeat):
                    log = run_once(engine, inst, batch, params, args.prompt_len, seed=1000 * r + batch,
                                   profile=args.profile > 0 and r == args.repeat - 1)
                    medians.append(statistics.median(log.per_request_us()))
                    walls.append(statistics.median(log.per_request_us(cpu=False)))
                    launch_ms.append(statistics.median(log.launch) * 1e3)
                    steps += len(log.wall)
                print(f"  {name:6s} batch {batch:3d}: {statistics.median(medians):6.2f} us/request CPU "
                      f"(runs {', '.join(f'{m:.2f}' for m in medians)}), wall {statistics.median(walls):.2f}; "
                      f"{steps} steps; launch {statistics.median(launch_ms):.1f} ms/step, subtracted", flush=True)
                if inst.last_profile is not None:
                    _print_profile(inst.last_profile, args.profile)
                    inst.last_profile = None
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
