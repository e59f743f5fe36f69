"""Run a workload through radixserve and through transformers `generate`, and measure both.

radixserve gets every request of a workload at once (an unbounded request rate, as SGLang's
benchmarks use), and timestamps each streamed delta on arrival. The transformers peer runs the
same token ids through `model.generate` in left-padded batches of 8, greedy, with
`min_new_tokens == max_new_tokens` so it produces the same number of tokens.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from benchmarks.workloads import AgentShape, BenchRequest
from radixserve.runtime import Engine, SamplingParams, StreamDelta


@dataclass
class RunMetrics:
    system: str
    wall_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    cached_tokens: int = 0
    optimal_cached_tokens: int | None = None
    peak_pages: int | None = None
    total_pages: int | None = None

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def total_tps(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.wall_s

    @property
    def hit_rate(self) -> float | None:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None

    @property
    def optimal_hit_rate(self) -> float | None:
        if self.optimal_cached_tokens is None:
            return None
        return self.optimal_cached_tokens / self.prompt_tokens


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


@contextmanager
def wrapped_methods(parts: Iterable[tuple[object, str, str]],
                    wrap: Callable[[Callable, str], Callable]) -> Iterator[None]:
    """For the block, `obj.attr` is `wrap(original bound method, label)` for each (obj, attr,
    label): an instance attribute over the class's method (the engine's own calls `self.attr()`
    find it), deleted afterwards so the method shows through again. Profilers use it."""
    parts = list(parts)
    for obj, attr, label in parts:
        setattr(obj, attr, wrap(getattr(obj, attr), label))
    try:
        yield
    finally:
        for obj, attr, _ in parts:
            delattr(obj, attr)


class _PoolWatcher:
    """Samples the KV pool's use from a side thread while a run is in progress."""

    def __init__(self, engine: Engine, period_s: float = 0.02) -> None:
        self.engine = engine
        self.period_s = period_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            s = self.engine.stats()
            self.peak = max(self.peak, s.total_pages - s.free_pages)
            time.sleep(self.period_s)

    def __enter__(self) -> "_PoolWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_radixserve(engine: Engine, requests: list[BenchRequest], name: str = "radixserve") -> RunMetrics:
    """Submit all requests at once; measure TTFT and inter-token latency from stream deltas.
    A delta of n tokens (a decode burst, grammar fast-forward) after a gap g counts as n
    inter-token gaps of g / n."""
    done = threading.Event()
    remaining = [len(requests)]
    lock = threading.Lock()
    starts: dict[str, float] = {}
    stamps: dict[str, list[tuple[float, int]]] = {}
    cached: dict[str, int] = {}
    out_tokens = [0]

    def on_delta(delta: StreamDelta) -> None:
        now = time.perf_counter()
        stamps.setdefault(delta.request_id, []).append((now, len(delta.token_ids)))
        with lock:
            out_tokens[0] += len(delta.token_ids)
            if delta.finish_reason is not None:
                cached[delta.request_id] = delta.cached_tokens
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

    stats0 = engine.stats()
    with _PoolWatcher(engine) as watcher:
        t0 = time.perf_counter()
        for i, r in enumerate(requests):
            rid = f"{name}-{i}"
            starts[rid] = time.perf_counter()
            engine.submit(
                r.prompt_ids,
                SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True),
                on_delta=on_delta,
                request_id=rid,
            )
        done.wait()
        wall = time.perf_counter() - t0
    ttft = [stamps[rid][0][0] - starts[rid] for rid in starts]
    itl = [(b - a) / n for rid in starts for (a, _), (b, n) in zip(stamps[rid], stamps[rid][1:]) if n
           for _ in range(n)]
    return RunMetrics(
        system=name,
        wall_s=wall,
        prompt_tokens=sum(len(r.prompt_ids) for r in requests),
        output_tokens=out_tokens[0],
        ttft_s=ttft,
        itl_s=itl,
        cached_tokens=sum(cached.values()),
        peak_pages=watcher.peak - (stats0.total_pages - stats0.free_pages),
        total_pages=stats0.total_pages,
    )


def run_agents_radixserve(engine: Engine, shape: AgentShape, turns_input: list[list[list[int]]]) -> RunMetrics:
    """Each agent sends its whole history plus the new tool result, turn after turn; agents run
    concurrently. The generated tokens of turn k are part of turn k+1's prompt. The optimal
    hit count is everything sent or generated before, in whole pages (only whole pages are
    shared, as for gsp)."""
    page = engine.config.page_size
    ttft: list[float] = []
    prompt_tokens = [0]
    cached = [0]
    optimal = [0]
    out_tokens = [0]

    async def agent(inputs: list[list[int]]) -> None:
        history: list[int] = []
        for turn, new in enumerate(inputs):
            if turn:
                optimal[0] += len(history) // page * page
            history = history + new
            params = SamplingParams(max_tokens=shape.output_len, temperature=0, ignore_eos=True)
            t0 = time.perf_counter()
            first = None
            generated: list[int] = []
            async for delta in engine.stream(history, params):
                if first is None:
                    first = time.perf_counter() - t0
                generated.extend(delta.token_ids)
                if delta.finish_reason is not None:
                    cached[0] += delta.cached_tokens
            ttft.append(first or 0.0)
            prompt_tokens[0] += len(history)
            out_tokens[0] += len(generated)
            history = history + generated

    async def main() -> None:
        await asyncio.gather(*(agent(inputs) for inputs in turns_input))

    t0 = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - t0
    return RunMetrics(
        system="radixserve",
        wall_s=wall,
        prompt_tokens=prompt_tokens[0],
        output_tokens=out_tokens[0],
        ttft_s=ttft,
        cached_tokens=cached[0],
        optimal_cached_tokens=optimal[0],
    )


def cached_ttft(engine: Engine, prefix: list[int], suffixes: list[list[int]]) -> tuple[float, float]:
    """Median TTFT of a request whose prefix is cached vs. one whose prompt is all new.
    Each cold request uses a fresh prefix (first token changed) so nothing is shared."""
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    cold, warm = [], []
    for i, suffix in enumerate(suffixes):
        fresh = [prefix[0] + i + 1] + prefix[1:]
        t0 = time.perf_counter()
        engine.generate(fresh + suffix, params)
        cold.append(time.perf_counter() - t0)
    engine.generate(prefix + suffixes[0], params)  # cache the prefix
    for suffix in suffixes[1:]:
        t0 = time.perf_counter()
        engine.generate(prefix + suffix, params)
        warm.append(time.perf_counter() - t0)
    return statistics.median(cold), statistics.median(warm)


def generate_left_padded(model: torch.nn.Module, prompts: list[list[int]], n: int, pad_id: int) -> list[list[int]]:
    """One greedy `generate` call over left-padded prompts; returns exactly n new ids each."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
            do_sample=False, pad_token_id=pad_id,
        )
    return out[:, width:].tolist()


def run_transformers(model: torch.nn.Module, requests: list[BenchRequest], pad_id: int, batch_size: int = 8) -> RunMetrics:
    """transformers `generate`, greedy, left-padded batches in the workload's order."""
    out_tokens = 0
    t0 = time.perf_counter()
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        outs = generate_left_padded(model, [r.prompt_ids for r in chunk], chunk[0].max_tokens, pad_id)
        out_tokens += sum(len(o) for o in outs)
    return RunMetrics(
        system="transformers generate",
        wall_s=time.perf_counter() - t0,
        prompt_tokens=sum(len(r.prompt_ids) for r in requests),
        output_tokens=out_tokens,
    )


def run_agents_transformers(model: torch.nn.Module, shape: AgentShape, turns_input: list[list[list[int]]], pad_id: int, batch_size: int = 8) -> RunMetrics:
    """The same agent loop through `generate`: each turn, all agents' histories in batches."""
    histories: list[list[int]] = [[] for _ in turns_input]
    prompt_tokens = out_tokens = 0
    t0 = time.perf_counter()
    for turn in range(shape.turns):
        for a, inputs in enumerate(turns_input):
            histories[a] = histories[a] + inputs[turn]
        for start in range(0, len(histories), batch_size):
            chunk = histories[start : start + batch_size]
            outs = generate_left_padded(model, chunk, shape.output_len, pad_id)
            prompt_tokens += sum(len(h) for h in chunk)
            out_tokens += sum(len(o) for o in outs)
            for row, o in enumerate(outs):
                histories[start + row] = histories[start + row] + o
    return RunMetrics(
        system="transformers generate",
        wall_s=time.perf_counter() - t0,
        prompt_tokens=prompt_tokens,
        output_tokens=out_tokens,
    )
