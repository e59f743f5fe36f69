"""The engine thread: drain the inbox, schedule, run the model, fold results back, emit.

    while running:
        commands = inbox.drain()          # new requests, aborts (from any thread)
        batch = scheduler.schedule()      # which tokens to compute this step
        out = runner.run(batch)           # one forward + sampling; one device->host copy
        postprocess(batch, out)           # append tokens, stop checks, finish, emit deltas

With `overlap` (the default on CUDA) the host prepares step t+1 while the device runs step t:

    host:    | sched t+1 | launch t+1 | fold t (wait, tokens, stop checks, emit) | sched t+2 | ...
    device:  |....... step t .........|........ step t+1 ...........................| step t+2

    1. every request that samples in the in-flight step t gets a placeholder token, as if its
       token were known; the scheduler then plans step t+1 as usual (decode rows for them)
    2. step t+1 is launched; rows whose input is a placeholder take the token step t sampled
       from the device (runner `Carry`), so nothing waits for the readback of step t
    3. placeholders are removed; step t is folded: its tokens are read back (the one wait),
       appended, stop-checked and emitted while the device runs step t+1
    4. step t+1's computed counts are advanced (and finished prefill chunks cached) only now,
       after step t's real tokens replaced the placeholders

Decode bursts (runtime/scheduler.py) run k decode steps in one launch where the host, not the
device, bounds a large decode batch: one schedule, one launch and one fold per k tokens of
every request. With overlap a burst in flight leaves k placeholders per request.

A request that step t finishes on a stop token or stop string has a wasted row in step t+1,
whose result is dropped; its pages are released at once, which is safe because any later use
of them is stream-ordered after step t+1. One that step t takes to max_tokens gets no
placeholder and no row (a lone request's last token then comes back without a step t+1).
Requests whose next step depends on the host seeing the token first (grammar masks, penalties
over the output history) make the loop fold step t before scheduling t+1, i.e. run that step
without overlap.

Only this thread touches the scheduler, the tree, the pool and the requests. Other threads talk
to it through `Inbox` and receive `StreamDelta`s through each request's callback. An exception
while processing one request fails that request alone; an exception while launching a step
is narrowed down by relaunching the batch in halves (when no other step is in flight), so it
too fails only the requests at fault; one at the device readback (or in a launch overlapped
with an unfolded step) fails the requests of that batch. Either way the loop goes on serving
the rest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, fields
from concurrent.futures import Future
from itertools import repeat
from typing import TYPE_CHECKING, Any, Callable, Union

from radixserve.runtime.model_runner import Carry, ModelRunner, PendingStep, StepOutput
from radixserve.runtime.output_processor import (
    OutputLimits,
    final_delta,
    process_sampled_burst,
    process_sampled_token,
)
from radixserve.runtime.outputs import FinishReason, StreamDelta
from radixserve.runtime.request import Request, RequestStatus
from radixserve.runtime.scheduler import ScheduledBatch, Scheduler

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AddRequests:
    requests: tuple[Request, ...]


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Call:
    """Run `fn` on the engine thread between steps and resolve `future` with its result: the
    only safe way for another thread to read scheduler state exactly (integrity checks)."""

    fn: Callable[[], Any]
    future: Future


Command = Union[AddRequests, Abort, Call]


class Inbox:
    """A thread-safe queue of commands with a wake-up event for the idle engine thread."""

    def __init__(self) -> None:
        self._items: deque[Command] = deque()
        self._lock = threading.Lock()
        self._event = threading.Event()

    def put(self, command: Command) -> None:
        with self._lock:
            self._items.append(command)
        self._event.set()

    def drain(self) -> list[Command]:
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._event.clear()
        return items

    def wait(self, timeout: float) -> None:
        self._event.wait(timeout)

    def pending_requests(self) -> int:
        with self._lock:
            return sum(len(c.requests) for c in self._items if isinstance(c, AddRequests))


@dataclass
class LoopTiming:
    """Where the engine thread's time goes (seconds, summed over steps; benchmarks read it).

    `host_s` is time spent on the host (scheduling, building and launching batches, folding
    results, emitting) and `wait_s` time blocked on a step's readback; `decode_*` count the
    steps whose launched batch was all decode rows."""

    steps: int = 0
    host_s: float = 0.0
    wait_s: float = 0.0
    decode_steps: int = 0
    decode_host_s: float = 0.0
    decode_wait_s: float = 0.0
    synced_steps: int = 0  # overlapped loop only: steps that had to fold before scheduling
    # With runner.profile on CUDA: device time of the folded steps (events around each step),
    # and the device's idle time between consecutive profiled steps (from one step's end to
    # the next one's start: the host had not begun launching it yet), by the later step's kind.
    device_s: float = 0.0
    decode_device_s: float = 0.0
    idle_s: float = 0.0
    decode_idle_s: float = 0.0
    profiled_steps: int = 0
    profiled_decode_steps: int = 0

    def snapshot(self) -> "LoopTiming":
        return LoopTiming(**{f.name: getattr(self, f.name) for f in fields(self)})

    def since(self, before: "LoopTiming") -> "LoopTiming":
        """What accrued between `before` (an earlier snapshot) and this one."""
        return LoopTiming(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)})


@dataclass(frozen=True)
class StepTrace:
    """One profiled step on the device: the idle gap before it, its span (seconds), its rows."""

    idle_s: float
    device_s: float
    rows: int
    burst: int
    decode: bool


@dataclass(frozen=True)
class BurstPolicy:
    """When decode steps run in bursts: up to `max_steps` per launch, for decode batches of at
    least `min_batch` requests (below that the device, not the host, bounds a step, and a
    burst would only delay the stream), and only where a CUDA graph holds the batch."""

    max_steps: int = 1
    min_batch: int = 1


class EngineLoop:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner, limits: OutputLimits, *,
                 overlap: bool = False, burst: BurstPolicy = BurstPolicy()) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.limits = limits
        self.overlap = overlap
        self.burst = burst
        self.timing = LoopTiming()
        self._inflight: PendingStep | None = None
        self._last_end: torch.cuda.Event | None = None  # the last profiled step's end (LoopTiming)
        # Benchmarks: a list here gets one StepTrace per profiled step.
        self.trace: list[StepTrace] | None = None
        self.inbox = Inbox()
        self.last_beat = time.monotonic()
        self.busy_since: float | None = None
        self.failed: BaseException | None = None
        self._stop = threading.Event()
        self._by_id: dict[str, list[Request]] = {}
        # Live requests (in `_by_id`) whose next step needs their token on the host first
        # (`_needs_host_token`): while there are none, `_can_speculate` need not look.
        self._host_bound = 0

    # ------------------------------------------------------------------ thread body
    def run_forever(self) -> None:
        try:
            while not self._stop.is_set():
                self.last_beat = time.monotonic()
                self._apply(self.inbox.drain())
                if not self.scheduler.has_work() and self._inflight is None:
                    self._last_end = None  # idle with nothing to do: not a gap between steps
                    self.inbox.wait(timeout=0.5)
                    continue
                self.busy_since = time.monotonic()
                self.step()
                self.busy_since = None
        except BaseException as exc:  # noqa: BLE001 - the loop must report any death
            logger.exception("engine loop died")
            self.failed = exc
            self._end_all("error", f"engine failure: {type(exc).__name__}")
            raise
        # Stopped: every request still queued or running gets its final delta, so no caller
        # waits forever on a stream that will never end.
        self._inflight = None  # its requests end below; its device work needs no host
        self._apply(self.inbox.drain())
        self._end_all("abort", None)

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(AddRequests(()))  # wake the loop

    def step(self) -> None:
        t0 = time.perf_counter()
        if self.overlap:
            batch, wait = self._step_overlapped()
        else:
            batch, wait = self._step_sync()
        total = time.perf_counter() - t0
        t = self.timing
        t.steps += 1
        t.host_s += total - wait
        t.wait_s += wait
        if batch is not None and batch.seqs and batch.all_decode:
            t.decode_steps += 1
            t.decode_host_s += total - wait
            t.decode_wait_s += wait

    def _step_sync(self) -> tuple[ScheduledBatch | None, float]:
        """Schedule, launch, wait, fold: the device idles while the host works."""
        batch = self.scheduler.schedule(self._max_burst())
        if not batch.seqs:
            self._idle_wait()
            return None, 0.0
        pending = self._launch(batch, None)
        if pending is None:
            return batch, 0.0
        self.scheduler.postprocess_computed(batch)
        wait = self._fold(pending)
        self._log_step(batch)
        return batch, wait

    def _step_overlapped(self) -> tuple[ScheduledBatch | None, float]:
        """Schedule and launch step t+1 before folding the in-flight step t (module docstring)."""
        prev = self._inflight
        self._inflight = None
        wait = 0.0
        if prev is not None and not self._can_speculate(prev):
            self.timing.synced_steps += 1
            wait += self._fold(prev)
            prev = None
        placeholders = self._add_placeholders(prev) if prev is not None else []
        pending: PendingStep | None = None
        failure: Exception | None = None
        try:
            batch = self.scheduler.schedule(self._max_burst())
            if batch.seqs:
                carry = Carry(prev, frozenset(map(id, placeholders))) if placeholders else None
                try:
                    pending = self.runner.launch(batch, carry)
                except Exception as exc:  # noqa: BLE001 - handled below, once placeholders are gone
                    failure = exc
        finally:
            for req in placeholders:
                del req.output_ids[-req.placeholders :]
                req.placeholders = 0
        if failure is not None:
            if prev is None and len(batch) > 1:
                self._run_in_halves(batch, failure)  # nothing in flight: narrow the failure down
            else:
                self._fail_batch(batch, failure)
        if prev is not None:
            wait += self._fold(prev)
        if pending is not None:
            # Only now: step t's real tokens replaced the placeholders this batch computed.
            self.scheduler.postprocess_computed(batch)
            self._log_step(batch)
            self._inflight = pending
        elif prev is None and not batch.seqs:
            self._idle_wait()
        return batch, wait

    def _can_speculate(self, pending: PendingStep) -> bool:
        """True when the next step can be planned before this one's tokens reach the host:
        no request that samples in it needs its token on the host first (a grammar mask for
        the next step, penalties over its output history)."""
        if not self._host_bound:
            return True
        for seq in pending.batch.seqs:
            req = seq.request
            if seq.sample and not req.is_finished and _needs_host_token(req):
                return False
        return True

    def _max_burst(self) -> int:
        """The longest decode burst this step may run (1: none; see BurstPolicy)."""
        policy, graphs = self.burst, self.runner.graphs
        if policy.max_steps < 2 or graphs is None:
            return 1
        return policy.max_steps if policy.min_batch <= len(self.scheduler.running) <= graphs.max_bs else 1

    @staticmethod
    def _add_placeholders(pending: PendingStep) -> list[Request]:
        """Append stand-ins for the tokens each still-live request samples in `pending`. A
        request whose tokens from `pending` take it to max_tokens gets none: it finishes with
        them whatever they are, so the next step has no row for it."""
        out = []
        n = pending.batch.burst
        stand_ins = [0] * n
        for seq in pending.batch.seqs:
            req = seq.request
            if not seq.sample or req.is_finished or id(req) not in pending.sample_row:
                continue
            if len(req.output_ids) + n < req.params.max_tokens:
                req.output_ids.extend(stand_ins)
                req.placeholders = n
                out.append(req)
        return out

    def _launch(self, batch: ScheduledBatch, carry: Carry | None) -> PendingStep | None:
        """Launch `batch`; None when it failed (then its requests were dealt with here)."""
        try:
            return self.runner.launch(batch, carry)
        except Exception as exc:  # noqa: BLE001 - fail this batch, keep serving others
            if carry is None and len(batch) > 1:
                self._run_in_halves(batch, exc)
            else:
                self._fail_batch(batch, exc)
            return None

    def _run_in_halves(self, batch: ScheduledBatch, exc: Exception) -> None:
        """A launch of several requests failed. The cause is usually one request's own state
        (a grammar matcher that raises while filling its mask, sampling inputs the sampler
        refuses), so rather than fail every request of the batch, run each half on its own,
        recursively: the requests at fault fail alone (about 2 log2(batch) launches), the rest
        of the step completes. Recomputing a half rewrites the same KV pages with the same
        tokens, so the pages of requests that ran before the failure stay consistent."""
        logger.warning("forward pass of %d requests failed (%s: %s); retrying in halves to isolate the failure",
                       len(batch), type(exc).__name__, exc)
        mid = len(batch.seqs) // 2
        for part in (batch.seqs[:mid], batch.seqs[mid:]):
            half = ScheduledBatch(part)
            pending = self._launch(half, None)
            if pending is not None:
                self.scheduler.postprocess_computed(half)
                self._fold(pending)

    def _fail_batch(self, batch: ScheduledBatch, exc: Exception) -> None:
        logger.error("forward pass failed; failing %d requests", len(batch), exc_info=exc)
        for seq in batch.seqs:
            self._end(seq.request, "error", f"internal error in forward pass: {type(exc).__name__}")

    def _fold(self, pending: PendingStep) -> float:
        """Wait for a launched step's tokens and fold them in; returns the seconds waited."""
        try:
            out = pending.result()
        except Exception as exc:  # noqa: BLE001 - a device error surfaces at the readback
            self._fail_batch(pending.batch, exc)
            return pending.wait_s
        self._postprocess(pending.batch, out)
        if pending.device_s is not None:
            self._time_device(pending)
        else:
            self._last_end = None
        return pending.wait_s

    def _time_device(self, pending: PendingStep) -> None:
        """Add a profiled step's device span, and the idle gap before it, to `timing`."""
        t, batch = self.timing, pending.batch
        span = pending.device_s or 0.0
        gap = 0.0
        if self._last_end is not None and pending.start_event is not None:
            gap = max(0.0, self._last_end.elapsed_time(pending.start_event) / 1e3)
        self._last_end = pending.event
        t.device_s += span
        t.idle_s += gap
        t.profiled_steps += 1
        if self.trace is not None:
            self.trace.append(StepTrace(gap, span, len(batch.seqs), batch.burst, batch.all_decode))
        if batch.all_decode:
            t.decode_device_s += span
            t.decode_idle_s += gap
            t.profiled_decode_steps += 1

    def _idle_wait(self) -> None:
        if self.scheduler.has_work() and not self.scheduler.running:
            # Nothing admissible although requests wait: avoid a hot spin.
            self.inbox.wait(timeout=0.01)

    # ------------------------------------------------------------------ commands
    def _apply(self, commands: list[Command]) -> None:
        for command in commands:
            if isinstance(command, AddRequests):
                for req in command.requests:
                    self._by_id.setdefault(req.request_id, []).append(req)
                    self._host_bound += _needs_host_token(req)
                    self.scheduler.add(req)
            elif isinstance(command, Call):
                try:
                    command.future.set_result(command.fn())
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    command.future.set_exception(exc)
            else:
                for req in list(self._by_id.get(command.request_id, ())):
                    self._end(req, "abort")

    # ------------------------------------------------------------------ results
    def _postprocess(self, batch: ScheduledBatch, out: StepOutput) -> None:
        """Fold a step's tokens into its requests and stream the deltas. The step's streams
        all go out first, then the bookkeeping of the requests that finished (caching a
        sequence's pages in the tree takes a while): the last delta of a step where hundreds
        of requests end together does not wait for the others' tree inserts."""
        counters = self.scheduler.counters
        limits = self.limits
        finished = RequestStatus.FINISHED
        ended: list[Request] = []
        bursts = out.bursts if out.bursts is not None else repeat(None)
        for seq, token_id, logprob, prompt_lps, burst in zip(batch.seqs, out.token_ids, out.logprobs,
                                                             out.prompt_logprobs, bursts):
            req = seq.request
            if req.status is finished:
                continue
            try:
                if prompt_lps:
                    self._record_prompt_logprobs(req, seq.start + seq.logits_from, prompt_lps)
                if not seq.sample:
                    continue
                if req.params.max_tokens == 0:
                    self._end(req, "length")
                    continue
                if req.first_token_at is None:
                    req.first_token_at = time.monotonic()
                if burst is None:
                    delta = process_sampled_token(req, token_id, logprob, limits)
                else:
                    delta = process_sampled_burst(req, list(burst), limits)
                counters.generation_tokens += len(delta.token_ids)
                self._emit(req, delta)  # commands the callback queues run after the step
                if delta.finish_reason is not None:
                    ended.append(req)
            except Exception as exc:  # noqa: BLE001 - one request's failure is its own
                logger.exception("request %s failed", req.request_id)
                self._end(req, "error", f"{type(exc).__name__}: {exc}")
        for req in ended:
            try:
                self._release(req)
            except Exception:  # noqa: BLE001 - one request's failure is its own
                logger.exception("releasing request %s failed", req.request_id)

    @staticmethod
    def _record_prompt_logprobs(req: Request, first_row_pos: int, rows: list) -> None:
        """Row j scores the prompt token at position first_row_pos + j + 1. Positions already
        recorded (a recompute after preemption) are skipped."""
        if req.prompt_logprobs is None:
            req.prompt_logprobs = []
        start = max(req.params.prompt_logprobs_start, 1)
        for j, lp in enumerate(rows):
            pos = first_row_pos + j + 1
            if start <= pos < len(req.prompt_ids) and pos == start + len(req.prompt_logprobs):
                req.prompt_logprobs.append(lp)

    def _end(self, req: Request, reason: FinishReason, error: str | None = None) -> None:
        if req.is_finished:
            return
        self._emit(req, final_delta(req, reason, error))  # the stream first, as in _postprocess
        self._release(req)

    def _release(self, req: Request) -> None:
        self.scheduler.finish(req)
        siblings = self._by_id.get(req.request_id)
        if siblings is not None:
            siblings.remove(req)
            self._host_bound -= _needs_host_token(req)
            if not siblings:
                del self._by_id[req.request_id]

    @staticmethod
    def _emit(req: Request, delta: StreamDelta) -> None:
        try:
            req.on_delta(delta)
        except Exception:  # noqa: BLE001 - a consumer's bug must not stop the engine
            logger.exception("delta callback of %s raised", req.request_id)

    def _end_all(self, reason: FinishReason, message: str | None) -> None:
        for reqs in list(self._by_id.values()):
            for req in list(reqs):
                try:
                    self._end(req, reason, message)
                except Exception:  # noqa: BLE001 - best effort while going down
                    logger.exception("could not end %s", req.request_id)

    def _log_step(self, batch: ScheduledBatch) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            s = self.scheduler
            logger.debug(
                "step %d: batch %d seqs / %d tokens, running %d, waiting %d, free pages %d/%d, "
                "cached tokens %d/%d",
                s.counters.steps, len(batch), batch.num_tokens, len(s.running), len(s.waiting),
                s.allocator.num_free, s.allocator.num_pages, s.counters.cached_tokens,
                s.counters.queried_tokens,
            )


def _needs_host_token(req: Request) -> bool:
    """A request whose next step depends on the host having seen its last token: a grammar
    mask, or penalties over its output history. Fixed for the request's lifetime."""
    return req.matcher is not None or req.params.uses_penalties
