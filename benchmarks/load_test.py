"""The long form of the load and fault suite: a real server on loopback, many clients, minutes.

    python -m benchmarks.load_test --clients 256 --duration 300
    python -m benchmarks.load_test --clients 16 --duration 30 --json out.json   # a quick look

One process loads `Engine(model=...)`, serves it with uvicorn on 127.0.0.1 (a thread) and
runs the checks; the clients run in a child process (their own interpreter, so parsing
hundreds of streams does not compete with the server for the GIL). The duration is split
over three phases that hold `--clients` concurrent clients each, then a burst:

    mixed        the full mix (benchmarks/loadgen.py): prompt lengths, shared prefixes,
                 json_schema / regex outputs, n > 1, some disconnects and client timeouts
    disconnects  most clients leave mid-stream or while queued
    timeouts     most clients give up on short client-side timeouts
    overflow     a burst of n > 1 requests past max_running + max_waiting: 503 + Retry-After

After each phase: no unexpected outcome (5xx, unexpected 4xx, broken streams, constraint
violations), /health stayed 200, the engine went idle with its KV pool back to its start
(no private or locked pages, free + evictable == total, check_integrity), and the server
still answers. Exit status 1 when any check failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import secrets
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Any, Callable

from benchmarks.loadgen import (
    Mix,
    PhaseConfig,
    PhaseReport,
    ServerThread,
    check_server,
    disconnect_mix,
    overflow_body,
    percentile,
    pool_state,
    run_burst_sync,
    run_phase_sync,
    timeout_mix,
)

logger = logging.getLogger("benchmarks.load_test")

OVERFLOW_N = 8


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load_test", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=256, help="concurrent clients in each phase")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load, over the three phases")
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-running", type=int, default=256, help="engine: sequences computed concurrently")
    parser.add_argument("--max-waiting", type=int, default=256, help="engine: queued sequences before 503")
    parser.add_argument("--num-pages", type=int, default=None, help="engine: KV pages (default: sized from memory)")
    parser.add_argument("--max-tokens", type=int, nargs=2, default=(2, 12), metavar=("MIN", "MAX"))
    parser.add_argument("--max-n", type=int, default=3, help="largest n in the mix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=600.0, help="client timeout of ordinary requests")
    parser.add_argument("--in-process-clients", action="store_true", help="run the clients in this process")
    parser.add_argument("--json", default=None, help="write the report here as JSON")
    parser.add_argument("--log-level", default="warning")
    return parser


def _phases(args: argparse.Namespace, api_key: str) -> list[PhaseConfig]:
    mix = Mix(max_tokens=tuple(args.max_tokens), max_n=args.max_n)  # type: ignore[arg-type]
    base = PhaseConfig("mixed", args.clients, args.duration * 0.7, mix, args.seed, api_key,
                       request_timeout_s=args.request_timeout, grace_s=args.request_timeout)
    return [
        base,
        replace(base, name="disconnects", duration_s=args.duration * 0.15, mix=disconnect_mix(mix), seed=args.seed + 1),
        replace(base, name="timeouts", duration_s=args.duration * 0.15, mix=timeout_mix(mix), seed=args.seed + 2),
    ]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from radixserve.runtime import Engine
    from radixserve.server.app import create_app
    from radixserve.server.settings import ServerSettings

    kwargs: dict[str, Any] = {"max_running": args.max_running, "max_waiting": args.max_waiting}
    if args.num_pages:
        kwargs["num_pages"] = args.num_pages
    t0 = time.monotonic()
    engine = Engine(model=args.model, **kwargs)
    api_key = secrets.token_hex(16)
    settings = ServerSettings(api_key=api_key, max_n=max(OVERFLOW_N, args.max_n))
    server = ServerThread(create_app(engine, settings)).start()
    print(f"engine {engine.model_name} on {engine.device}, {engine.stats().total_pages} KV pages, "
          f"context {engine.max_model_len}; server {server.url} (started in {time.monotonic() - t0:.1f}s)", flush=True)

    executor = None
    if args.in_process_clients:
        def run(fn: Callable[..., PhaseReport], *a: Any) -> PhaseReport:
            return fn(*a)
    else:
        executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))

        def run(fn: Callable[..., PhaseReport], *a: Any) -> PhaseReport:
            return executor.submit(fn, *a).result()

    start_state = pool_state(engine)
    results: list[dict[str, Any]] = []
    reports: list[PhaseReport] = []
    all_problems: list[str] = []
    try:
        for cfg in _phases(args, api_key):
            print(f"phase {cfg.name}: {cfg.clients} clients for {cfg.duration_s:.0f}s ...", flush=True)
            report = run(run_phase_sync, server.url, cfg)
            reports.append(report)
            results.append(_finish_phase(report, engine, server.url, api_key, all_problems))
        burst = math.ceil(1.5 * (args.max_running + args.max_waiting) / OVERFLOW_N)
        print(f"phase overflow: a burst of {burst} requests with n={OVERFLOW_N} ...", flush=True)
        report = run(run_burst_sync, server.url, "overflow", burst, overflow_body(OVERFLOW_N), api_key)
        reports.append(report)
        if report.kinds.get("rejected", 0) == 0:
            all_problems.append("overflow: no request was rejected with 503 + Retry-After")
        results.append(_finish_phase(report, engine, server.url, api_key, all_problems))
    finally:
        if executor is not None:
            executor.shutdown()
        server.stop()

    ttft = [t for r in reports for t in r.ttft_s]
    totals: dict[str, int] = {}
    for r in reports:
        for kind, count in r.kinds.items():
            totals[kind] = totals.get(kind, 0) + count
    summary = {
        "command": "python -m benchmarks.load_test " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": engine.model_name,
        "device": str(engine.device),
        "clients": args.clients,
        "duration_s": args.duration,
        "requests": sum(totals.values()),
        "served": totals.get("ok", 0),
        "outcomes": dict(sorted(totals.items())),
        "errors": {k: v for k, v in sorted(totals.items()) if k not in ("ok",)},
        "ttft_p50_ms": _ms(percentile(ttft, 50)),
        "ttft_p99_ms": _ms(percentile(ttft, 99)),
        "completion_tokens": sum(r.completion_tokens for r in reports),
        "pages_total": start_state.total,
        "pages_leaked_max": max((res["pages_leaked"] for res in results), default=0),
        "phases": results,
        "problems": all_problems,
        "passed": not all_problems,
    }
    print(json.dumps(summary, indent=2), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return 0 if not all_problems else 1


def _finish_phase(report: PhaseReport, engine: Any, url: str, api_key: str, all_problems: list[str]) -> dict[str, Any]:
    problems = report.problems()
    server_problems, state = check_server(engine, url, api_key=api_key)
    problems += server_problems
    all_problems += [f"{report.name}: {p}" for p in problems]
    result = report.summary() | {"pages_leaked": state.leaked, "pool": state.__dict__, "problems": problems}
    print(json.dumps(result), flush=True)
    return result


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


if __name__ == "__main__":
    sys.exit(main())
