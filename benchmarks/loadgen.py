"""Load and fault generation against a radixserve server on loopback, and the checks after it.

Used by the CI form (tests/reliability/test_load_faults.py, seconds) and the long form
(`python -m benchmarks.load_test`, minutes). A phase holds `clients` concurrent clients for
`duration_s`; each client sends one request after another, drawn from a seeded mix:

    endpoint     chat (shared system prompts) | completions (shared documents)
                 | chat + response_format json_schema | chat + regex
    prompt       short | medium (a shared document) | long (two documents + unique filler)
    n            1, or 2..max_n
    stream       SSE (usage included) or one JSON response
    behaviour    complete | disconnect (mid-stream, or while queued) | client-side timeout

Every request ends as one `Outcome` kind. Expected kinds: "ok" (every choice ended with a
finish_reason; constrained outputs that stopped parse / match), "disconnected" and
"client_timeout" (the client left on purpose), "rejected" (503/429 carrying Retry-After: the
queue was full; the client waits that long, capped, before its next request). Anything else is
a failure: a 5xx, an unexpected 4xx, an error event inside a stream, a stream without
[DONE] or without a finish_reason for some choice, a transport error, or a constraint
violation. `/health` is probed throughout and must answer 200.

After a phase, `check_server` waits for the engine to go idle and checks the KV pool is back
to its start (no private or locked pages, free + evictable == total, `check_integrity()`),
and that the server still answers. Loops are bounded: a phase ends at its deadline plus a
grace period, a burst is a fixed number of requests.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

# ---------------------------------------------------------------- outcome kinds

EXPECTED = frozenset({"ok", "disconnected", "client_timeout", "rejected"})
FINISH_REASONS = frozenset({"stop", "length", "tool_calls"})

# ---------------------------------------------------------------- the workload

_WORDS = (
    "cache prefix token page radix tree request batch model server engine stream client latency "
    "throughput memory kernel schedule decode prefill sample grammar schema queue timeout retry "
    "health metric tenant salt document question answer system prompt context window budget "
    "policy eviction lock node split insert match chunk step device host copy graph"
).split()

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}, "confident": {"type": "boolean"}},
    "required": ["answer", "confident"],
    "additionalProperties": False,
}
ANSWER_REGEX = r"(yes|no), [a-z]{1,8}"


def _filler(rng: random.Random, words: int) -> str:
    sentences, current = [], []
    for _ in range(words):
        current.append(rng.choice(_WORDS))
        if len(current) >= rng.randint(6, 14):
            sentences.append(" ".join(current).capitalize() + ".")
            current = []
    if current:
        sentences.append(" ".join(current).capitalize() + ".")
    return " ".join(sentences)


@dataclass(frozen=True)
class Corpus:
    """Shared text: a few system prompts and documents that many requests start with (so the
    radix cache sees real sharing), built from a fixed seed."""

    systems: tuple[str, ...]
    documents: tuple[str, ...]

    @classmethod
    def build(cls, seed: int = 1234, systems: int = 4, documents: int = 8, doc_words: int = 180) -> "Corpus":
        rng = random.Random(seed)
        return cls(
            systems=tuple(f"You are assistant #{i}. " + _filler(rng, 60) for i in range(systems)),
            documents=tuple(f"Document {i}: " + _filler(rng, doc_words) for i in range(documents)),
        )


@dataclass(frozen=True)
class Mix:
    """Shares of each request variant (each a probability in [0, 1])."""

    completion_share: float = 0.2
    json_share: float = 0.12
    regex_share: float = 0.08
    medium_share: float = 0.35
    long_share: float = 0.1
    n_share: float = 0.12
    max_n: int = 3
    stream_share: float = 0.8
    disconnect_share: float = 0.1
    timeout_share: float = 0.05
    timeout_range_s: tuple[float, float] = (0.05, 1.5)
    max_tokens: tuple[int, int] = (2, 12)
    long_filler_words: int = 250


@dataclass(frozen=True)
class RequestSpec:
    """One request to send and how the client behaves while it runs."""

    path: str
    body: dict[str, Any]
    stream: bool
    n: int
    behaviour: str  # "complete" | "disconnect" | "timeout"
    disconnect_after: int = 0  # chunks read before leaving (0: leave before the first one)
    timeout_s: float = 0.0
    check: str | None = None  # "json" | "regex": how to verify a constrained output


def draw_request(rng: random.Random, mix: Mix, corpus: Corpus, serial: int) -> RequestSpec:
    """One request of the mix (deterministic for a given rng state)."""
    u = rng.random()
    kind = "completion" if u < mix.completion_share else "json" if u < mix.completion_share + mix.json_share else (
        "regex" if u < mix.completion_share + mix.json_share + mix.regex_share else "chat"
    )
    v = rng.random()
    length = "long" if v < mix.long_share else "medium" if v < mix.long_share + mix.medium_share else "short"
    n = rng.randint(2, mix.max_n) if mix.max_n >= 2 and rng.random() < mix.n_share else 1
    stream = rng.random() < mix.stream_share
    w = rng.random()
    behaviour = "disconnect" if w < mix.disconnect_share else "timeout" if w < mix.disconnect_share + mix.timeout_share else "complete"
    max_tokens = rng.randint(*mix.max_tokens)
    question = f"Question {serial}: what does {rng.choice(_WORDS)} have to do with {rng.choice(_WORDS)}?"
    context = ""
    if length == "medium":
        context = rng.choice(corpus.documents) + "\n\n"
    elif length == "long":
        first, second = rng.sample(corpus.documents, 2)
        context = f"{first}\n\n{second}\n\nNotes {serial}: {_filler(rng, mix.long_filler_words)}\n\n"
    sampling: dict[str, Any] = {"max_tokens": max_tokens, "n": n, "temperature": rng.choice([0.0, 0.7, 1.0])}
    if sampling["temperature"] > 0:
        sampling["seed"] = rng.randrange(1 << 30)
    check = None
    if kind == "completion":
        body = {"model": "default", "prompt": context + question + "\nAnswer:", **sampling}
        path = "/v1/completions"
    else:
        messages = [
            {"role": "system", "content": rng.choice(corpus.systems)},
            {"role": "user", "content": context + question},
        ]
        body = {"model": "default", "messages": messages, **sampling}
        if kind == "json":
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}
            check = "json"
        elif kind == "regex":
            body["regex"] = ANSWER_REGEX
            check = "regex"
        path = "/v1/chat/completions"
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    disconnect_after = rng.randint(0, 3) if stream else 0
    timeout_s = rng.uniform(*mix.timeout_range_s)
    return RequestSpec(path, body, stream, n, behaviour, disconnect_after, timeout_s, check)


# ---------------------------------------------------------------- outcomes and reports


@dataclass
class Outcome:
    kind: str
    status: int | None = None
    detail: str = ""
    ttft_s: float | None = None
    latency_s: float = 0.0
    completion_tokens: int = 0
    retry_after: float | None = None


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class PhaseReport:
    """What one phase observed from the client side (picklable: the long form runs clients in
    a child process)."""

    name: str
    clients: int
    duration_s: float
    wall_s: float = 0.0
    kinds: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # first few failure details
    ttft_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    health_probes: int = 0
    health_failures: list[str] = field(default_factory=list)
    health_max_s: float = 0.0
    retry_after_values: list[float] = field(default_factory=list)

    MAX_DETAILS = 20

    def add(self, outcome: Outcome) -> None:
        self.kinds[outcome.kind] += 1
        if outcome.kind not in EXPECTED and len(self.failures) < self.MAX_DETAILS:
            self.failures.append(f"{outcome.kind} (HTTP {outcome.status}): {outcome.detail[:300]}")
        if outcome.kind == "ok":
            self.latency_s.append(outcome.latency_s)
            self.completion_tokens += outcome.completion_tokens
            if outcome.ttft_s is not None:
                self.ttft_s.append(outcome.ttft_s)
        if outcome.retry_after is not None:
            self.retry_after_values.append(outcome.retry_after)

    @property
    def requests(self) -> int:
        return sum(self.kinds.values())

    @property
    def served(self) -> int:
        return self.kinds.get("ok", 0)

    @property
    def unexpected(self) -> dict[str, int]:
        return {k: v for k, v in self.kinds.items() if k not in EXPECTED}

    def problems(self) -> list[str]:
        """Client-side failures of this phase (empty when it went as expected)."""
        out = [f"{count} x {kind}" for kind, count in sorted(self.unexpected.items())]
        out += self.failures[:5]
        out += [f"/health: {f}" for f in self.health_failures[:5]]
        return out

    def summary(self) -> dict[str, Any]:
        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000, 1)

        return {
            "phase": self.name,
            "clients": self.clients,
            "wall_s": round(self.wall_s, 1),
            "requests": self.requests,
            "served": self.served,
            "outcomes": dict(sorted(self.kinds.items())),
            "completion_tokens": self.completion_tokens,
            "ttft_p50_ms": ms(percentile(self.ttft_s, 50)),
            "ttft_p99_ms": ms(percentile(self.ttft_s, 99)),
            "latency_p50_ms": ms(percentile(self.latency_s, 50)),
            "latency_p99_ms": ms(percentile(self.latency_s, 99)),
            "health_probes": self.health_probes,
            "health_failures": len(self.health_failures),
            "health_max_ms": ms(self.health_max_s),
        }


# ---------------------------------------------------------------- one request


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _classify_status(response: httpx.Response, body: bytes) -> Outcome:
    status = response.status_code
    retry = _retry_after(response)
    text = body.decode("utf-8", "replace")
    if status in (429, 503):
        if retry is not None and retry > 0:
            return Outcome("rejected", status, text, retry_after=retry)
        return Outcome("http_5xx" if status >= 500 else "http_4xx", status, "no Retry-After: " + text)
    if status >= 500:
        return Outcome("http_5xx", status, text)
    return Outcome("http_4xx", status, text)


def _check_constrained(spec: RequestSpec, texts: dict[int, str], finishes: dict[int, str]) -> str | None:
    """Why a constrained output that stopped does not satisfy its constraint, else None."""
    for index, text in texts.items():
        if finishes.get(index) != "stop":
            continue  # cut off by max_tokens: a prefix of a valid output
        if spec.check == "json":
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                return f"choice {index}: not JSON: {text!r}"
            if not (isinstance(value, dict) and set(value) == {"answer", "confident"}
                    and isinstance(value["answer"], int) and isinstance(value["confident"], bool)):
                return f"choice {index}: does not match the schema: {text!r}"
        elif spec.check == "regex" and re.fullmatch(ANSWER_REGEX, text) is None:
            return f"choice {index}: does not match {ANSWER_REGEX!r}: {text!r}"
    return None


def _finished(spec: RequestSpec, finishes: dict[int, str]) -> str | None:
    missing = [i for i in range(spec.n) if i not in finishes]
    if missing:
        return f"choices {missing} ended without a finish_reason"
    bad = {i: r for i, r in finishes.items() if r not in FINISH_REASONS}
    if bad:
        return f"unexpected finish_reason {bad}"
    return None


async def _read_stream(response: httpx.Response, spec: RequestSpec, start: float) -> Outcome:
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    ttft = None
    tokens = 0
    chunks = 0
    done = False
    chat = spec.path.endswith("chat/completions")
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        chunks += 1
        if spec.behaviour == "disconnect" and chunks > spec.disconnect_after:
            return Outcome("disconnected", 200, latency_s=time.monotonic() - start)
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            return Outcome("protocol", 200, f"not JSON: {data[:200]}")
        if "error" in event:
            return Outcome("stream_error", 200, json.dumps(event["error"])[:300])
        if event.get("usage"):
            tokens = int(event["usage"].get("completion_tokens", 0))
        for choice in event.get("choices", []):
            index = int(choice.get("index", 0))
            piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if piece:
                texts[index] = texts.get(index, "") + piece
            if (piece or choice.get("finish_reason")) and ttft is None:
                ttft = time.monotonic() - start
            if choice.get("finish_reason") is not None:
                finishes[index] = choice["finish_reason"]
    if not done:
        return Outcome("protocol", 200, "the stream ended without [DONE]")
    problem = _finished(spec, finishes)
    if problem:
        return Outcome("protocol", 200, problem)
    if spec.check and (violation := _check_constrained(spec, texts, finishes)):
        return Outcome("constraint_violation", 200, violation)
    return Outcome("ok", 200, ttft_s=ttft, latency_s=time.monotonic() - start, completion_tokens=tokens)


def _read_whole(body: bytes, spec: RequestSpec, start: float) -> Outcome:
    try:
        payload = json.loads(body)
    except json.JSONDecodeError:
        return Outcome("protocol", 200, f"not JSON: {body[:200]!r}")
    chat = spec.path.endswith("chat/completions")
    texts, finishes = {}, {}
    for choice in payload.get("choices", []):
        index = int(choice.get("index", 0))
        texts[index] = ((choice.get("message") or {}).get("content") if chat else choice.get("text")) or ""
        if choice.get("finish_reason") is not None:
            finishes[index] = choice["finish_reason"]
    problem = _finished(spec, finishes)
    if problem:
        return Outcome("protocol", 200, problem)
    if spec.check and (violation := _check_constrained(spec, texts, finishes)):
        return Outcome("constraint_violation", 200, violation)
    tokens = int((payload.get("usage") or {}).get("completion_tokens", 0))
    return Outcome("ok", 200, latency_s=time.monotonic() - start, completion_tokens=tokens)


async def send(client: httpx.AsyncClient, spec: RequestSpec, request_timeout_s: float) -> Outcome:
    """Send one request and classify how it ended."""
    start = time.monotonic()
    timeout = spec.timeout_s if spec.behaviour == "timeout" else request_timeout_s
    try:
        if spec.behaviour == "disconnect" and not spec.stream:
            # Leave a whole-response request while it is queued or generating.
            try:
                await asyncio.wait_for(client.post(spec.path, json=spec.body, timeout=request_timeout_s), spec.timeout_s)
            except asyncio.TimeoutError:
                return Outcome("disconnected", latency_s=time.monotonic() - start)
            return Outcome("ok", 200, latency_s=time.monotonic() - start)  # finished before we left
        if not spec.stream:
            response = await client.post(spec.path, json=spec.body, timeout=timeout)
            if response.status_code != 200:
                return _classify_status(response, response.content)
            return _read_whole(response.content, spec, start)
        async with client.stream("POST", spec.path, json=spec.body, timeout=timeout) as response:
            if response.status_code != 200:
                return _classify_status(response, await response.aread())
            return await _read_stream(response, spec, start)
    except httpx.TimeoutException as exc:
        if spec.behaviour == "timeout":
            return Outcome("client_timeout", latency_s=time.monotonic() - start)
        return Outcome("transport_timeout", detail=f"{type(exc).__name__} after {time.monotonic() - start:.1f}s")
    except httpx.HTTPError as exc:
        return Outcome("transport", detail=f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- phases


@dataclass(frozen=True)
class PhaseConfig:
    name: str
    clients: int
    duration_s: float
    mix: Mix = Mix()
    seed: int = 0
    api_key: str | None = None
    request_timeout_s: float = 120.0
    grace_s: float = 120.0  # how long in-flight requests may finish after the deadline
    retry_after_cap_s: float = 2.0
    health_interval_s: float = 0.5
    health_timeout_s: float = 10.0


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def _probe_health(url: str, report: PhaseReport, stop: asyncio.Event, cfg: PhaseConfig) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=cfg.health_timeout_s) as client:
        while not stop.is_set():
            start = time.monotonic()
            try:
                response = await client.get("/health")
                if response.status_code != 200:
                    report.health_failures.append(f"HTTP {response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as exc:
                report.health_failures.append(f"{type(exc).__name__} after {time.monotonic() - start:.1f}s")
            report.health_probes += 1
            report.health_max_s = max(report.health_max_s, time.monotonic() - start)
            try:
                await asyncio.wait_for(stop.wait(), cfg.health_interval_s)
            except asyncio.TimeoutError:
                pass


async def run_phase(url: str, cfg: PhaseConfig, corpus: Corpus | None = None) -> PhaseReport:
    """Hold `cfg.clients` clients for `cfg.duration_s`, then let in-flight requests finish
    (at most `cfg.grace_s`; any still running then are cancelled and counted as
    "cut_at_phase_end", a failure: an accepted request must end by itself)."""
    corpus = corpus or Corpus.build()
    report = PhaseReport(cfg.name, cfg.clients, cfg.duration_s)
    limits = httpx.Limits(max_connections=cfg.clients + 8, max_keepalive_connections=cfg.clients + 8)
    start = time.monotonic()
    deadline = start + cfg.duration_s
    serial = iter(range(1 << 62))
    stop_health = asyncio.Event()

    async with httpx.AsyncClient(base_url=url, headers=_headers(cfg.api_key), limits=limits) as client:

        async def one_client(index: int) -> None:
            rng = random.Random(cfg.seed * 1_000_003 + index)
            while time.monotonic() < deadline:
                spec = draw_request(rng, cfg.mix, corpus, next(serial))
                outcome = await send(client, spec, cfg.request_timeout_s)
                report.add(outcome)
                if outcome.kind == "rejected":
                    await asyncio.sleep(min(outcome.retry_after or 1.0, cfg.retry_after_cap_s))

        health = asyncio.ensure_future(_probe_health(url, report, stop_health, cfg))
        tasks = [asyncio.ensure_future(one_client(i)) for i in range(cfg.clients)]
        _, pending = await asyncio.wait(tasks, timeout=cfg.duration_s + cfg.grace_s)
        for task in pending:
            task.cancel()
            report.kinds["cut_at_phase_end"] += 1
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        stop_health.set()
        await health
    report.wall_s = time.monotonic() - start
    return report


async def run_burst(url: str, name: str, count: int, body: dict[str, Any], *, api_key: str | None = None,
                    request_timeout_s: float = 120.0) -> PhaseReport:
    """Send `count` copies of a whole-response request at once (to fill the waiting queue past
    its limit) and classify each."""
    report = PhaseReport(name, count, 0.0)
    spec = RequestSpec(body.get("_path", "/v1/completions"), {k: v for k, v in body.items() if k != "_path"},
                       stream=False, n=int(body.get("n", 1)), behaviour="complete")
    limits = httpx.Limits(max_connections=count + 8, max_keepalive_connections=count + 8)
    start = time.monotonic()
    stop_health = asyncio.Event()
    cfg = PhaseConfig(name, count, 0.0)
    async with httpx.AsyncClient(base_url=url, headers=_headers(api_key), limits=limits) as client:
        health = asyncio.ensure_future(_probe_health(url, report, stop_health, cfg))
        outcomes = await asyncio.gather(*(send(client, spec, request_timeout_s) for _ in range(count)))
        stop_health.set()
        await health
    for outcome in outcomes:
        report.add(outcome)
    report.wall_s = time.monotonic() - start
    return report


def run_phase_sync(url: str, cfg: PhaseConfig) -> PhaseReport:
    """`run_phase` on a fresh event loop (a worker thread or a child process)."""
    return asyncio.run(run_phase(url, cfg))


def run_burst_sync(url: str, name: str, count: int, body: dict[str, Any], api_key: str | None = None) -> PhaseReport:
    return asyncio.run(run_burst(url, name, count, body, api_key=api_key))


def overflow_body(n: int, max_tokens: int = 4) -> dict[str, Any]:
    """A request for the overflow burst: n continuations of a short prompt (n counts n times
    against the waiting-queue limit)."""
    return {"_path": "/v1/completions", "model": "default", "prompt": "Count slowly: one, two,", "n": n,
            "max_tokens": max_tokens, "temperature": 0.8, "seed": 7}


def disconnect_mix(mix: Mix) -> Mix:
    """Most clients leave mid-stream or while queued."""
    return replace(mix, stream_share=0.85, disconnect_share=0.7, timeout_share=0.0)


def timeout_mix(mix: Mix) -> Mix:
    """Most clients give up on a short client-side timeout."""
    return replace(mix, disconnect_share=0.0, timeout_share=0.7)


# ---------------------------------------------------------------- server-side checks


@dataclass(frozen=True)
class PoolState:
    total: int
    free: int
    evictable: int
    locked: int
    private: int
    running: int
    waiting: int

    @property
    def leaked(self) -> int:
        """Pages neither free nor evictable while nothing runs: held by nobody."""
        return self.total - self.free - self.evictable

    @property
    def clean(self) -> bool:
        return (self.private, self.locked, self.running, self.waiting, self.leaked) == (0, 0, 0, 0, 0)


def pool_state(engine: Any) -> PoolState:
    s = engine.stats()
    return PoolState(s.total_pages, s.free_pages, s.evictable_pages, s.locked_pages, s.private_pages, s.running, s.waiting)


def check_server(engine: Any, url: str, *, api_key: str | None = None, idle_timeout_s: float = 120.0) -> tuple[list[str], PoolState]:
    """After a phase: the engine goes idle, its KV pool is back to its start, the page
    accounting holds, and the server still answers. Returns (problems, pool state)."""
    problems: list[str] = []
    try:
        engine.wait_idle(idle_timeout_s)
    except TimeoutError:
        problems.append(f"the engine did not go idle within {idle_timeout_s:.0f}s: {engine.stats()}")
    # Aborts of the last disconnects may still be on their way to the engine thread.
    deadline = time.monotonic() + 10
    state = pool_state(engine)
    while not state.clean and time.monotonic() < deadline:
        time.sleep(0.05)
        state = pool_state(engine)
    if not state.clean:
        problems.append(f"KV pool not back to its start: {state}")
    try:
        engine.check_integrity()
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        problems.append(f"check_integrity failed: {type(exc).__name__}: {exc}")
    if not engine.healthy():
        problems.append("engine.healthy() is False")
    with httpx.Client(base_url=url, headers=_headers(api_key), timeout=60) as client:
        try:
            health = client.get("/health")
            if health.status_code != 200:
                problems.append(f"/health answered {health.status_code}")
            r = client.post("/v1/completions", json={"model": "default", "prompt": "Hello", "max_tokens": 2, "temperature": 0})
            if r.status_code != 200 or r.json()["choices"][0]["finish_reason"] not in FINISH_REASONS:
                problems.append(f"a small completion after the phase failed: {r.status_code} {r.text[:200]}")
        except httpx.HTTPError as exc:
            problems.append(f"the server does not answer: {type(exc).__name__}: {exc}")
    return problems, state


# ---------------------------------------------------------------- a server in this process


class ServerThread:
    """uvicorn serving `app` from a thread on a socket bound to 127.0.0.1 before start (no
    free-port race). `stop()` is a graceful shutdown, bounded by `graceful_s`."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, graceful_s: float = 5.0,
                 log_level: str = "warning") -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=graceful_s,
                                backlog=4096)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout_s: float = 60.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
