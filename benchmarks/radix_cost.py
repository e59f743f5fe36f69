"""The radix cache's own host cost on the `random` workload (nothing shared), with no GPU.

BENCHMARKS.md's `random` target is "radix cache on costs <= 1% throughput against cache off".
End to end on the H100 the comparison drowns in run-to-run spread (17% between runs of the
same mode, benchmarks/RESULTS.md), because the engine is host-bound there and host jitter
dominates. What the cache adds is host work on the engine thread (matching each prompt,
inserting finished prefill chunks and sequences, evicting to make room, locking nodes), so
this script measures that work directly: an `Engine` on the CPU over the random-weight
`tiny-llama` shape runs the same random requests (no shared prefix) once with the prefix cache
and once without, alternating, with a KV pool small enough that the cache must evict. Every
engine step is timed in the engine thread's own CPU time (`time.thread_time`, which other
processes do not inflate) with the model runner's `launch` (forward and sampling: device work
on a GPU) subtracted, exactly as `benchmarks.host_overhead` does per decode step:

    host us per request = sum over steps (step CPU - launch CPU) / requests

The difference on - off, times the number of requests of a run, over that run's duration on
the H100 (`--gpu-seconds-per-request`, from RESULTS.md's random rows), is the throughput the
cache can cost where the engine thread is the bottleneck (at most that; less where the device
is). Run from the repository root:

    .venv/bin/python -m benchmarks.radix_cost                  # 256 requests x 4 runs per mode
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks.host_overhead import StepInstrument, StepLog, flush_tree, submit_and_wait
from radixserve.runtime import Engine, SamplingParams


def run_once(engine: Engine, inst: StepInstrument, requests: int, prompt_len: int, out_len: int, seed: int) -> float:
    """Submit `requests` random prompts at once; the engine thread's host CPU seconds
    (launch excluded) over every step until all finished."""
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    inst.log = StepLog()
    inst.recording = True
    submit_and_wait(engine, requests, params, prompt_len, seed)
    inst.recording = False
    engine.wait_idle()
    flush_tree(engine)
    return sum(inst.log.cpu) - sum(inst.log.launch_cpu)


def make_engine(cache: bool, args: argparse.Namespace) -> Engine:
    # A pool for about `--pool-requests` whole requests: the cache fills and must evict.
    pages = args.pool_requests * (args.prompt_len + args.out_len + 16) // 16 + 64
    return Engine(model="tiny-llama", load_format="dummy", device="cpu", page_size=16, max_running=args.max_running,
                  max_batch_tokens=4096, num_pages=pages, enable_prefix_cache=cache)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--out-len", type=int, default=256)
    ap.add_argument("--max-running", type=int, default=128)
    ap.add_argument("--pool-requests", type=int, default=160, help="KV pool size, in whole requests")
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--gpu-seconds-per-request", type=float, default=7.6e-3,
                    help="the H100 random run's wall time per request (RESULTS.md: 1500 requests, 256 out, "
                         "~34k out tok/s -> 7.6 ms)")
    args = ap.parse_args()

    engines = {mode: make_engine(mode == "on", args) for mode in ("on", "off")}
    instruments = {mode: StepInstrument(engine, steady_only=False) for mode, engine in engines.items()}
    per_request: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for r in range(args.repeat):
            for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
                seconds = run_once(engines[mode], instruments[mode], args.requests, args.prompt_len, args.out_len,
                                   seed=r)
                per_request[mode].append(seconds / args.requests * 1e6)
                print(f"  run {r} cache {mode:3s}: {per_request[mode][-1]:8.1f} us host CPU per request", flush=True)
    finally:
        for engine in engines.values():
            engine.shutdown()
    on, off = statistics.median(per_request["on"]), statistics.median(per_request["off"])
    delta = on - off
    print(f"random, {args.requests} requests x {args.repeat} runs per mode, {args.prompt_len} in / {args.out_len} out, "
          f"pool for {args.pool_requests} requests (the cache evicts)")
    print(f"  host CPU per request (median): cache on {on:.1f} us, off {off:.1f} us, difference {delta:+.1f} us")
    print(f"  as a share of the H100 random run's {args.gpu_seconds_per_request * 1e3:.1f} ms per request: "
          f"{delta / (args.gpu_seconds_per_request * 1e6):+.2%} (target <= 1%)")


if __name__ == "__main__":
    main()
