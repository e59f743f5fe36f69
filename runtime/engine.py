"""The engine's public face: load a model, accept requests from any thread, hand back results.

`Engine` validates and tokenizes a request in the caller's thread (so a bad request fails
before it is queued and a slow grammar compile never stalls the model), then passes it to the
engine thread (`EngineLoop`), which owns all scheduling state. Results come back as
`StreamDelta`s through a per-request callback; `generate` collects them synchronously,
`stream` and `generate_async` deliver them to an asyncio loop. See docs/engine_api.md.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import threading
import time
import uuid
from array import array
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable, Sequence, TypeVar, Union

import numpy as np
import torch

from radixserve.runtime.config import EngineConfig, default_batch_tokens
from radixserve.runtime.constraints import ConstraintCompiler
from radixserve.runtime.cpu_malloc import keep_tensor_buffers_in_heap
from radixserve.runtime.detokenizer import IncrementalDetokenizer, StopChecker, TokenPieces
from radixserve.runtime.engine_loop import Abort, AddRequests, BurstPolicy, Call, EngineLoop
from radixserve.runtime.errors import EngineDead, PromptTooLong, QueueFull
from radixserve.runtime.kv_cache import KVCache
from radixserve.runtime.loader import load_model, resolve_model
from radixserve.runtime.model_runner import ModelRunner
from radixserve.runtime.output_processor import OutputLimits
from radixserve.runtime.outputs import CompletionOutput, GenerateResult, StreamDelta
from radixserve.runtime.request import Request
from radixserve.runtime.sampler import make_generator
from radixserve.runtime.sampling_params import InvalidParams, SamplingParams
from radixserve.runtime.scheduler import Scheduler
from radixserve.runtime.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

Prompt = Union[str, Sequence[int]]
T = TypeVar("T")
DEFAULT_CPU_KV_BYTES = 2 << 30
GPU_KV_FRACTION = 0.85
MAX_GRAPH_BATCH = 1024  # largest decode batch captured as a CUDA graph (logits: 1024 x vocab fp32)


@dataclass(frozen=True)
class EngineStats:
    """A consistent-enough snapshot for metrics and health (read without locks)."""

    running: int
    waiting: int
    total_pages: int
    free_pages: int
    cached_pages: int
    evictable_pages: int
    locked_pages: int
    private_pages: int
    page_size: int
    queried_tokens: int
    cached_tokens: int
    prompt_tokens: int
    generation_tokens: int
    preemptions: int
    finished: int
    steps: int
    cascade_steps: int
    last_step_at: float

    @property
    def kv_usage(self) -> float:
        return 1.0 - (self.free_pages + self.evictable_pages) / max(self.total_pages, 1)


class Engine:
    """A loaded model with its KV pool, scheduler and engine thread. Thread-safe."""

    def __init__(self, model: str = "default", **kwargs: object) -> None:
        self._init(EngineConfig(model=model, **kwargs))  # type: ignore[arg-type]

    @classmethod
    def from_config(cls, config: EngineConfig) -> "Engine":
        engine = cls.__new__(cls)
        engine._init(config)
        return engine

    def _init(self, config: EngineConfig) -> None:
        self.device = _pick_device(config.device)
        if config.max_batch_tokens is None:
            config = replace(config, max_batch_tokens=_batch_tokens(self.device))
        self.config = config  # max_batch_tokens resolved: what this engine runs with
        if self.device.type == "cpu":
            keep_tensor_buffers_in_heap()
        dtype = _pick_dtype(config.dtype, self.device)
        resolved = resolve_model(config.model, config.load_format)
        self.model_name = resolved.name
        self.model_path = resolved.path
        self.model_config = resolved.config
        self.tokenizer = load_tokenizer(resolved)
        model = load_model(resolved, self.device, dtype, ops=config.ops)
        num_pages = config.num_pages or KVCache.pages_for_budget(
            resolved.config, config.page_size, _kv_budget(config, self.device), dtype
        )
        # One page more than the allocator manages: the dummy page that padding rows of CUDA-graph
        # batches write to (page index num_pages; the allocator hands out 0 .. num_pages - 1).
        self.kv_cache = KVCache.for_model(resolved.config, num_pages + 1, config.page_size, dtype, self.device)
        positions = resolved.config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > positions:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds what {resolved.name} supports "
                f"({positions} positions)"
            )
        self.max_model_len = min(config.max_model_len or positions, num_pages * config.page_size)
        self.chat_template: str | None = getattr(self.tokenizer, "chat_template", None)
        # Shared by every request's detokenizer (its fast path; filled on the engine thread).
        self._token_pieces = TokenPieces(self.tokenizer)
        self.eos_token_ids = _eos_ids(resolved.config, self.tokenizer)
        self.vocab_size = resolved.config.vocab_size
        self._constraints: ConstraintCompiler | None = None  # built on first use (slow)
        self._constraints_lock = threading.Lock()
        runner = ModelRunner(model, self.kv_cache, config.page_size, self.device, self.vocab_size, config.seed)
        on_cuda = self.device.type == "cuda"
        ops_name = getattr(getattr(model, "ops", None), "name", None)
        cuda_graphs = config.cuda_graphs
        if cuda_graphs is None:
            # The PyTorch reference ops read lengths on the host and gather to max_seq_len:
            # graphs are for the Triton ops only.
            cuda_graphs = on_cuda and ops_name == "triton"
        if cuda_graphs:
            if not on_cuda:
                raise ValueError("cuda_graphs=True needs a CUDA device")
            runner.enable_cuda_graphs(
                max_bs=min(config.max_running, config.max_batch_tokens, MAX_GRAPH_BATCH),
                max_model_len=self.max_model_len, dummy_page=num_pages,
                num_heads=resolved.config.num_heads, num_kv_heads=resolved.config.num_kv_heads,
                max_steps=config.decode_burst,
            )
        self.cuda_graphs = bool(cuda_graphs)
        self.overlap = on_cuda if config.overlap is None else config.overlap
        self.scheduler = Scheduler(config, num_pages, self.max_model_len)
        self._loop = EngineLoop(
            self.scheduler, runner, OutputLimits(frozenset(self.eos_token_ids), self.max_model_len),
            overlap=self.overlap, burst=BurstPolicy(config.decode_burst, config.decode_burst_min_batch),
        )
        self._ids = itertools.count()
        if on_cuda:
            _tune_gc()
        self._thread = threading.Thread(target=self._loop.run_forever, name="radixserve-engine", daemon=True)
        self._thread.start()
        logger.info(
            "engine ready: %s on %s (%s), %d KV pages of %d tokens, context %d, CUDA graphs %s, overlap %s",
            self.model_name, self.device, dtype, num_pages, config.page_size, self.max_model_len,
            "on" if self.cuda_graphs else "off", "on" if self.overlap else "off",
        )

    @property
    def constraints(self) -> ConstraintCompiler:
        """Compiles regex / JSON Schema / grammar constraints against this tokenizer. Built on
        first use: indexing the vocabulary takes a moment that unconstrained serving skips."""
        with self._constraints_lock:
            if self._constraints is None:
                self._constraints = ConstraintCompiler(
                    self.tokenizer, self.vocab_size, self.config.constraints, eos_token_ids=self.eos_token_ids
                )
            return self._constraints

    # ------------------------------------------------------------------ tokenization
    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ submission
    def submit(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        on_delta: Callable[[StreamDelta], None],
        request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> str:
        """Queue one prompt; `on_delta` is called from the engine thread for every delta of
        every continuation. Raises RequestRejected / InvalidParams / ConstraintError before
        anything is queued."""
        requests = self._prepare(prompt, params or SamplingParams(), on_delta, request_id, cache_salt)
        self._enqueue(requests, "n")
        return requests[0].request_id

    def abort(self, request_id: str) -> None:
        self._loop.inbox.put(Abort(request_id))

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        cache_salt: str | None = None,
    ) -> GenerateResult | list[GenerateResult]:
        """Run prompts to completion and return their results (a list for a list of prompts).

        Every prompt is validated before any is queued, and all reach the engine thread in one
        command: the first step sees them all, so how they are batched does not depend on
        thread timing (greedy outputs repeat from run to run)."""
        single = isinstance(prompts, str) or (
            len(prompts) > 0 and isinstance(prompts[0], int)  # type: ignore[index]
        )
        batch = [prompts] if single else list(prompts)  # type: ignore[list-item]
        if params is None or isinstance(params, SamplingParams):
            param_list = [params or SamplingParams()] * len(batch)
        else:
            param_list = list(params)
            if len(param_list) != len(batch):
                raise ValueError(f"{len(batch)} prompts but {len(param_list)} sampling params")
        collectors = [_Collector(p.n) for p in param_list]
        requests: list[Request] = []
        submitted: list[str] = []
        for prompt, p, collector in zip(batch, param_list, collectors):
            continuations = self._prepare(prompt, p, collector.add, None, cache_salt)
            submitted.append(continuations[0].request_id)
            requests.extend(continuations)
        self._enqueue(requests, "prompts")
        try:
            results = [c.wait(rid) for c, rid in zip(collectors, submitted)]
        except BaseException:
            for rid in submitted:
                self.abort(rid)
            raise
        return results[0] if single else results

    async def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[StreamDelta]:
        """Yield deltas as they come; leaving the iterator early aborts the request."""
        params = params or SamplingParams()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamDelta] = asyncio.Queue()

        def on_delta(delta: StreamDelta) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, delta)

        rid = await asyncio.to_thread(
            self.submit, prompt, params, on_delta=on_delta, request_id=request_id, cache_salt=cache_salt
        )
        remaining = params.n
        try:
            while remaining:
                delta = await queue.get()
                if delta.finish_reason is not None:
                    remaining -= 1
                yield delta
        finally:
            if remaining:
                self.abort(rid)

    async def generate_async(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> GenerateResult:
        params = params or SamplingParams()
        collector = _Collector(params.n)
        rid = request_id
        async for delta in self.stream(prompt, params, request_id=request_id, cache_salt=cache_salt):
            rid = delta.request_id
            collector.add(delta)
        return collector.result(rid or "")

    # ------------------------------------------------------------------ status
    def stats(self) -> EngineStats:
        s = self.scheduler
        tree = s.tree
        c = s.counters
        return EngineStats(
            running=len(s.running),
            waiting=len(s.waiting) + self._loop.inbox.pending_requests(),
            total_pages=s.allocator.num_pages,
            free_pages=s.allocator.num_free,
            cached_pages=tree.cached_pages if tree else 0,
            evictable_pages=tree.evictable_pages if tree else 0,
            locked_pages=tree.locked_pages if tree else 0,
            private_pages=s.private_pages(),
            page_size=s.page_size,
            queried_tokens=c.queried_tokens,
            cached_tokens=c.cached_tokens,
            prompt_tokens=c.prompt_tokens,
            generation_tokens=c.generation_tokens,
            preemptions=c.preemptions,
            finished=c.finished,
            steps=c.steps,
            cascade_steps=self._loop.runner.cascade_steps,
            last_step_at=self._loop.last_beat,
        )

    def healthy(self) -> bool:
        """The engine thread is alive and has gone round its loop within the stall limit.
        The loop beats at least every half second when idle, so a long gap means one step
        (or a command applied between steps) is stuck, not that there is nothing to do."""
        if not self._thread.is_alive() or self._loop.failed is not None:
            return False
        return time.monotonic() - self._loop.last_beat < self.config.stall_timeout_s

    def call_on_loop(self, fn: Callable[[], T], timeout: float | None = 60.0) -> T:
        """Run `fn` on the engine thread between two steps and return its result."""
        future: Future = Future()
        self._loop.inbox.put(Call(fn, future))
        return future.result(timeout)

    def check_integrity(self) -> None:
        """Page accounting check, run on the engine thread between steps (tests, benchmarks)."""
        self.call_on_loop(self.scheduler.check_integrity)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Block until no request is queued or running (tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while self.call_on_loop(self.scheduler.has_work, timeout) or self._loop.inbox.pending_requests():
            if time.monotonic() > deadline:
                raise TimeoutError("engine did not become idle")
            time.sleep(0.005)

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self._loop.stop()
        self._thread.join(timeout)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ internals
    def _prepare(
        self,
        prompt: Prompt,
        params: SamplingParams,
        on_delta: Callable[[StreamDelta], None],
        request_id: str | None,
        cache_salt: str | None,
    ) -> list[Request]:
        if not self._thread.is_alive() or self._loop.failed is not None:
            raise EngineDead("the engine is not running")
        if not self.healthy():
            # Queued work would only wait behind the stuck step: refuse it (503) instead.
            raise EngineDead("the engine is not responding (a step is stuck)")
        ids, lowest, highest = _prompt_ids(self.tokenize(prompt) if isinstance(prompt, str) else prompt)
        if not ids:
            raise InvalidParams("prompt", "the prompt is empty")
        if lowest < 0 or highest >= self.vocab_size:
            raise InvalidParams("prompt", f"token ids must be in [0, {self.vocab_size})")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLong(len(ids), params.max_tokens, self.max_model_len)
        matcher = self.constraints.compile(params.constraint) if params.constraint else None
        rid = request_id or f"req-{uuid.uuid4().hex[:16]}"
        requests = []
        for i in range(params.n):
            req = Request(rid, i, ids, params, on_delta, cache_salt)
            req.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens, self._token_pieces)
            req.stop_checker = StopChecker(params.stop, params.include_stop_str_in_output)
            req.matcher = None if matcher is None else (matcher if i == 0 else matcher.copy())
            if params.seed is not None:
                req.generator = make_generator(params.seed + i, self.device)
            req.logprobs = [] if params.logprobs is not None else None
            requests.append(req)
        return requests

    def _enqueue(self, requests: list[Request], param: str) -> None:
        """Hand `requests` to the engine thread in one command, if the queue has room for all
        of them; `param` names what set their number (n, or a generate call's prompts)."""
        count, limit = len(requests), self.config.max_waiting
        if count > limit:
            # Never admissible, however long the client waits: a 400, not a 503 to retry.
            raise InvalidParams(param, f"{count} sequences are over the engine's queue limit of {limit} (max_waiting)")
        waiting = len(self.scheduler.waiting) + self._loop.inbox.pending_requests()
        if waiting + count > limit:
            raise QueueFull(limit)
        self._loop.inbox.put(AddRequests(tuple(requests)))


class _Collector:
    """Gathers the deltas of one prompt's n continuations into a GenerateResult."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.texts: list[list[str]] = [[] for _ in range(n)]
        self.outputs: list[CompletionOutput] = [
            CompletionOutput(index=i, text="", token_ids=[], finish_reason=None) for i in range(n)
        ]
        self.cached_tokens = 0
        self.prompt_logprobs = None
        self.request_id = ""
        self._remaining = n
        self._done = threading.Event()
        self._prompt_ids: list[int] = []

    def add(self, delta: StreamDelta) -> None:
        out = self.outputs[delta.index]
        self.request_id = delta.request_id
        self.texts[delta.index].append(delta.text)
        out.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            out.logprobs = (out.logprobs or []) + list(delta.logprobs)
        if delta.index == 0:
            self.cached_tokens = delta.cached_tokens
        if delta.finish_reason is not None:
            out.finish_reason = delta.finish_reason
            out.stop_reason = delta.stop_reason
            out.error = delta.error
            out.text = "".join(self.texts[delta.index])
            if delta.prompt_logprobs is not None:
                self.prompt_logprobs = delta.prompt_logprobs
            if delta.prompt_token_ids is not None:
                self._prompt_ids = delta.prompt_token_ids
            self._remaining -= 1
            if self._remaining == 0:
                self._done.set()

    def wait(self, request_id: str) -> GenerateResult:
        self._done.wait()
        return self.result(request_id)

    def result(self, request_id: str) -> GenerateResult:
        return GenerateResult(
            request_id=request_id,
            prompt_token_ids=self._prompt_ids,
            outputs=self.outputs,
            cached_tokens=self.cached_tokens,
            prompt_logprobs=self.prompt_logprobs,
        )


# The collector's first-generation threshold while an engine serves on a GPU (CPython's default
# is 700 container allocations).
GC_GEN0_THRESHOLD = 50_000


def _prompt_ids(prompt: Sequence[int]) -> tuple[list[int], int, int]:
    """(ids as a list of ints, smallest, largest) of a token-id prompt, in C loops: `array`
    refuses anything that is not an integer (floats, strings) and takes numpy integers. It is
    on every request's path to its first token: for an 8k-token prompt ~0.4 ms instead of ~0.9
    for `[int(t) for t in prompt]` and min/max (2-core CPU)."""
    try:
        packed = array("q", prompt)
    except (TypeError, OverflowError) as exc:
        raise InvalidParams("prompt", f"token ids must be integers ({exc})") from None
    if not packed:
        return [], 0, 0
    values = np.frombuffer(packed, dtype=np.int64)
    return packed.tolist(), int(values.min()), int(values.max())


def _tune_gc() -> None:
    """Keep Python's garbage collector from stalling the engine thread (and the device with it).

    Everything alive at start-up (model, tokenizer, Triton and torch internals) lives as long
    as the engine: frozen, it is out of every later collection's scan. And serving allocates
    containers at a high rate (requests, deltas, token lists; few of them in cycles), which at
    the default threshold means a young collection every few hundred allocations and, through
    them, full ones. Measured on gsp on the H100 (4.7 s): 241 young, 22 middle and one full
    collection of 342 ms before; the full ones fell to 94 ms with the freeze alone. vLLM
    freezes likewise. Process-wide settings: applied once, when a GPU engine starts."""
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    if 0 < gen0 < GC_GEN0_THRESHOLD:
        gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
        logger.info("garbage collector: start-up objects frozen, young-generation threshold %d -> %d",
                    gen0, GC_GEN0_THRESHOLD)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype must be one of auto, {', '.join(table)}; got {name!r}")
    return table[name]


def _batch_tokens(device: torch.device) -> int:
    """The step token budget of a config that leaves it None, by device and its memory."""
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    return default_batch_tokens(device.type, memory)


def _kv_budget(config: EngineConfig, device: torch.device) -> int:
    if config.kv_cache_bytes is not None:
        return config.kv_cache_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_KV_FRACTION)
    return DEFAULT_CPU_KV_BYTES


def _eos_ids(model_config, tokenizer) -> tuple[int, ...]:
    """EOS ids from the model config (Llama 3 lists several) and the tokenizer."""
    ids = {int(t) for t in model_config.eos_token_ids}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))
