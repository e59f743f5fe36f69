"""One step on the device: build the batch, run the model, apply grammar masks, sample.

    ScheduledBatch --build_forward_batch--> ForwardBatch --model--> logits rows
        rows of each request: new tokens logits_from .. num_new-1 (see ScheduledSeq)
        a decode batch whose requests share cached prefixes is reordered into groups and
        runs shared-prefix (cascade) attention; results are put back in batch order
        a decode batch (one new token and one logits row per request) replays a CUDA graph
        captured at start-up (runtime/cuda_graphs.py) instead of launching kernels; a decode
        burst replays it k times, each step's sampled tokens fed to the next on the device
        a small prefill step (up to 4 requests, 512 new tokens, no prompt log-probabilities)
        replays a prefill graph (runtime/prefill_graphs.py): one logits row per request
        last row of a sampling request -> mask (grammar) -> sampler -> next token
        other rows -> prompt log-probabilities of the tokens they predict

`launch` enqueues a step and returns at once with a `PendingStep`; the sampled tokens and
log-probabilities come back to the host in one transfer per step, which `PendingStep.result`
waits for. Between the two the host is free to prepare the next step (see engine_loop.py).
A step's input tokens may be "carried": tokens the previous step sampled that are still on
the device (the host has not read them yet), gathered into the inputs on the device.

Nothing between `launch` and `result` makes the host wait for the device: host-to-device
copies come from pinned memory, index tensors are never built from Python lists on the device,
and the readback goes to pinned memory behind an event. (Prompt log-probabilities, rare, are
read back at once.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch

from radixserve.runtime.cascade import CascadePlan, CascadePlanner, build_cascade_info
from radixserve.runtime.constraints import allocate_bitmask, apply_bitmask
from radixserve.runtime.cuda_graphs import DecodeGraphs, DecodeRows
from radixserve.runtime.forward_batch import SeqStep, build_forward_batch
from radixserve.runtime.kv_cache import KVCache
from radixserve.runtime.outputs import TokenLogprob
from radixserve.runtime.prefill_graphs import PrefillGraphs
from radixserve.runtime.request import Request
from radixserve.runtime.sampler import SampleOutput, Sampler, SamplingBatch, prompt_logprobs
from radixserve.runtime.scheduler import ScheduledBatch, ScheduledSeq

# Mixed steps with at least this many decode rows replay a graph for them (ModelRunner._split_mixed).
MIN_SPLIT_DECODE_ROWS = 32


def _graph_row(s: ScheduledSeq) -> bool:
    """A row a decode graph can run: one new token, and its logits."""
    return s.num_new == 1 and s.logits_from == 0


@dataclass(frozen=True)
class StepOutput:
    """Per scheduled seq (same order as the batch): the sampled token (None when the seq did
    not sample), its log-probability entry (None unless asked), and prompt log-probabilities
    of the rows before it (empty unless asked). After a decode burst `bursts[i]` holds every
    token the burst sampled for seq i, in order (`token_ids[i]` is the first); else None."""

    token_ids: list[int | None]
    logprobs: list[TokenLogprob | None]
    prompt_logprobs: list[list[TokenLogprob]]
    bursts: list[tuple[int, ...] | None] | None = None


@dataclass(frozen=True)
class Carry:
    """Input tokens still on the device: the request (by `id`) of each key holds, as its last
    token, a placeholder for the token `previous` sampled for it. Rows that compute such a
    last token take it from `previous.device_token_ids` instead of the host value."""

    previous: "PendingStep"
    request_ids: frozenset[int]


@dataclass
class PendingStep:
    """A launched step. `result()` waits for its one readback and returns the StepOutput in
    batch order; it may be called once. `sample_row` maps id(request) to the row of
    `device_token_ids` that holds the token sampled for it (the rows of a carry): after a
    burst, the token its last step sampled; `host` then holds all of them, [burst, rows]."""

    batch: ScheduledBatch
    order: list[int] | None  # run row j is batch index order[j] (cascade plans reorder)
    sample_idx: list[int]  # run rows that sampled, in sample-row order
    device_token_ids: torch.Tensor | None
    host: SampleOutput | None  # pinned host copies (or CPU tensors) of the sample
    event: "torch.cuda.Event | None"
    prompt_lps: list[list[TokenLogprob]]
    sample_row: dict[int, int] = field(default_factory=dict)
    graph: bool = False
    wait_s: float = 0.0  # how long `result` waited for the device
    # With ModelRunner.profile: events around the step's device work, and its device time
    # (known after `result`; includes any gap the host left between the step's kernels).
    start_event: "torch.cuda.Event | None" = None
    device_s: float | None = None
    burst: int = 1

    def result(self) -> StepOutput:
        n = len(self.batch.seqs)
        token_ids: list[int | None] = [None] * n
        logprobs: list[TokenLogprob | None] = [None] * n
        bursts: list[tuple[int, ...] | None] | None = None
        if self.host is not None:
            if self.event is not None:
                t0 = time.perf_counter()
                self.event.synchronize()
                self.wait_s = time.perf_counter() - t0
                if self.start_event is not None:
                    self.device_s = self.start_event.elapsed_time(self.event) / 1e3
            sampled = self.host.to_host()  # host tensors only: no device access
            if self.burst > 1:  # [burst][rows] -> per row; every row of a burst samples
                bursts = list(zip(*sampled.token_ids))
                token_ids = [b[0] for b in bursts]
            else:
                for j, i in enumerate(self.sample_idx):
                    token_ids[i] = sampled.token_ids[j]
                    if sampled.logprobs is not None:
                        logprobs[i] = sampled.logprobs[j]
        prompt_lps = self.prompt_lps
        if self.order is None:
            return StepOutput(token_ids, logprobs, prompt_lps, bursts)
        # Undo the plan's order: run row j belongs to batch index order[j].
        out_t: list[int | None] = [None] * n
        out_l: list[TokenLogprob | None] = [None] * n
        out_p: list[list[TokenLogprob]] = [[] for _ in range(n)]
        out_b: list[tuple[int, ...] | None] | None = None if bursts is None else [None] * n
        for j, i in enumerate(self.order):
            out_t[i], out_l[i], out_p[i] = token_ids[j], logprobs[j], prompt_lps[j]
            if out_b is not None:
                out_b[i] = bursts[j]  # type: ignore[index] - set with out_b
        return StepOutput(out_t, out_l, out_p, out_b)


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        page_size: int,
        device: torch.device,
        vocab_size: int,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.page_size = page_size
        self.device = device
        self.vocab_size = vocab_size
        self.sampler = Sampler(seed=seed)
        self.cascade_steps = 0  # decode steps that ran shared-prefix attention (metrics)
        self.graph_steps = 0  # steps that replayed a CUDA graph (metrics)
        self.burst_launches = 0  # launches that ran a decode burst (metrics)
        self.split_steps = 0  # mixed steps whose decode rows replayed a graph (metrics)
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        # Benchmarks: time each step's device work with CUDA events (PendingStep.device_s).
        self.profile = False
        self._cascade_planner = CascadePlanner(self.page_size)

    def enable_cuda_graphs(self, *, max_bs: int, max_model_len: int, dummy_page: int, num_heads: int,
                           num_kv_heads: int, use_graphs: bool | None = None, max_steps: int = 1,
                           prefill: bool = True) -> DecodeGraphs:
        """Capture decode graphs for batch sizes up to `max_bs` (see runtime/cuda_graphs.py),
        for decode bursts of up to `max_steps`, and with `prefill` graphs for small prefill
        steps (runtime/prefill_graphs.py). `dummy_page` must be a page of the KV pool that the
        allocator never hands out."""
        graphs = DecodeGraphs(
            self.model, self.kv_cache, max_bs=max_bs, max_model_len=max_model_len, dummy_page=dummy_page,
            num_heads=num_heads, num_kv_heads=num_kv_heads, use_graphs=use_graphs, max_steps=max_steps,
        )
        graphs.capture()
        self.graphs = graphs
        if prefill:
            self.prefill_graphs = PrefillGraphs(self.model, self.kv_cache, max_model_len=max_model_len,
                                                dummy_page=dummy_page, use_graphs=use_graphs)
            self.prefill_graphs.capture()
        return graphs

    def run(self, batch: ScheduledBatch) -> StepOutput:
        """One step, synchronously: launch and wait for the result."""
        return self.launch(batch).result()

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, carry: Carry | None = None) -> PendingStep:
        """Enqueue one step (forward, masks, sampling, readback) and return without waiting."""
        seqs = list(batch.seqs)
        split = None if batch.all_decode else self._split_mixed(seqs)
        if split is None:
            plan = self._plan_cascade(seqs)
            order = plan.order if plan is not None else None
            num_graph_rows = 0
        else:
            decode_idx, other_idx = split
            plan = self._plan_cascade([seqs[i] for i in decode_idx])
            order = ([decode_idx[i] for i in plan.order] if plan is not None else decode_idx) + other_idx
            num_graph_rows = len(decode_idx)
            self.split_steps += 1
        if plan is not None:
            self.cascade_steps += 1
        if order is not None:
            seqs = [seqs[i] for i in order]
        pending = self._launch(seqs, plan, carry, batch.burst, num_graph_rows)
        pending.batch = batch
        pending.order = order
        return pending

    def _split_mixed(self, seqs: list[ScheduledSeq]) -> tuple[list[int], list[int]] | None:
        """(decode rows, other rows) of a mixed step whose decode rows should replay a graph
        while the prefill rows run eagerly (None: run it as one). Decode rows inside the extend
        kernel cost one pass over their whole KV per query head, without the decode kernel's
        split-KV or cascade; past MIN_SPLIT_DECODE_ROWS of them a graph replay (one more read
        of the weights) costs less."""
        if self.graphs is None:
            return None
        decode_idx: list[int] = []
        other_idx: list[int] = []
        for i, s in enumerate(seqs):
            (decode_idx if _graph_row(s) else other_idx).append(i)
        if len(decode_idx) < MIN_SPLIT_DECODE_ROWS or self.graphs.bucket(len(decode_idx)) is None:
            return None
        return decode_idx, other_idx

    def _plan_cascade(self, seqs: list[ScheduledSeq]) -> CascadePlan | None:
        """A cascade plan when this is a decode batch whose requests share cached prefixes."""
        decode = len(seqs) >= 2 and all(s.num_new == 1 for s in seqs)
        if not decode or len({s.request.pages[0] for s in seqs}) == len(seqs):
            # Not a decode batch, or no two requests start on the same page (an O(n) check):
            # nothing to plan, and a request that was preempted and prefilled again in a step
            # like this one may hold new pages, so the planner's kept plan goes.
            self._cascade_planner.forget()
            return None
        plan = self._cascade_planner.plan([s.request for s in seqs], [s.request.pages for s in seqs],
                                          [s.end for s in seqs])
        return plan if plan.shares else None

    def _use_graph(self, seqs: list[ScheduledSeq], plan: CascadePlan | None) -> bool:
        """Decode rows only, one logits row each, a captured size that holds them, and cascade
        graphs for a cascade plan."""
        return (
            self.graphs is not None
            and (plan is None or self.graphs.cascade)
            and all(map(_graph_row, seqs))
            and self.graphs.bucket(len(seqs)) is not None
        )

    def _forward(self, seqs: list[ScheduledSeq], plan: CascadePlan | None, carry: Carry | None,
                 burst: int, num_graph_rows: int = 0) -> tuple[torch.Tensor, list[int], bool]:
        """(logits rows, row_start, replayed a graph): seq i owns rows row_start[i]..row_start[i+1]-1.
        With `burst` > 1 the graphs hold the burst's inputs; `graphs.next_step` runs the rest.
        `num_graph_rows` > 0: a split mixed step; its first rows (decode, covered by `plan`)
        replay a graph, the rest run eagerly, and the logits are joined in that order."""
        # Rows whose last new token is a placeholder for a token still on the device.
        carried: list[tuple[int, int]] = []  # (seq index, row of carry.previous.device_token_ids)
        if carry is not None:
            rows_of = carry.previous.sample_row
            for i, s in enumerate(seqs):
                rid = id(s.request)
                if rid in carry.request_ids and s.end == s.request.num_tokens and rid in rows_of:
                    carried.append((i, rows_of[rid]))
        carry_tokens = carry.previous.device_token_ids if carried else None

        if num_graph_rows:
            n = num_graph_rows
            head = self._forward_graph(seqs[:n], plan, [c for c in carried if c[0] < n], carry_tokens, 1)
            rest = seqs[n:]
            tail_carry = self._carry_ids(rest, [(i - n, j) for i, j in carried if i >= n], carry_tokens)
            tail, tail_rows = self._forward_eager(rest, self._seq_steps(rest), None, tail_carry)
            return torch.cat([head, tail]), list(range(n)) + [n + r for r in tail_rows], True
        if self._use_graph(seqs, plan):
            return self._forward_graph(seqs, plan, carried, carry_tokens, burst), list(range(len(seqs) + 1)), True
        if burst > 1:
            raise ValueError(f"a decode burst of {len(seqs)} rows needs a CUDA graph that holds them")
        steps = self._seq_steps(seqs)
        carry_ids = self._carry_ids(seqs, carried, carry_tokens)
        prefill = self.prefill_graphs if plan is None else None
        key = prefill.bucket(steps) if prefill is not None else None
        if prefill is not None and key is not None:
            # One logits row per seq (its last new token): row_start is 0, 1, 2, ...
            return prefill.run(steps, carry_ids, key), list(range(len(seqs) + 1)), True
        logits, row_start = self._forward_eager(seqs, steps, plan, carry_ids)
        return logits, row_start, False

    def _forward_graph(self, seqs: list[ScheduledSeq], plan: CascadePlan | None, carried: list[tuple[int, int]],
                       carry_tokens: torch.Tensor | None, burst: int) -> torch.Tensor:
        """Logits of decode rows, one per seq, by a graph replay (the first of a burst)."""
        assert self.graphs is not None
        rows = DecodeRows(
            token_ids=[s.request.token_at(s.start) for s in seqs],
            seq_lens=[s.end for s in seqs],
            pages=[s.request.pages for s in seqs],
        )
        return self.graphs.run(rows, plan.groups if plan is not None else None, carried, carry_tokens, steps=burst)

    @staticmethod
    def _seq_steps(seqs: list[ScheduledSeq]) -> list[SeqStep]:
        """The scheduler's seqs as the batch builders take them (token ids, pages, logits rows)."""
        return [
            SeqStep(
                token_ids=s.request.tokens(s.start, s.end),
                start=s.start,
                pages=s.request.pages,
                logits_from=s.logits_from if s.logits_from < s.num_new else None,
            )
            for s in seqs
        ]

    def _carry_ids(self, seqs: list[ScheduledSeq], carried: list[tuple[int, int]],
                   carry_tokens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(token indices in the step's flat token order, their ids on the device) of the
        carried rows: the last new token of seq i sits at index cu_extend[i + 1] - 1."""
        if not carried:
            return None
        assert carry_tokens is not None
        ends = np.cumsum([s.num_new for s in seqs])
        dst = self._index([int(ends[i]) - 1 for i, _ in carried])
        return dst, carry_tokens.index_select(0, self._index([j for _, j in carried]))

    def _forward_eager(self, seqs: list[ScheduledSeq], steps: list[SeqStep], plan: CascadePlan | None,
                       carry_ids: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, list[int]]:
        """(logits rows, row_start) of any batch, by launching the model's kernels."""
        forward_batch = build_forward_batch(steps, self.page_size, self.device)
        if plan is not None:
            cascade = build_cascade_info(
                plan, [s.request.pages for s in seqs], [s.end for s in seqs], self.page_size, self.device
            )
            forward_batch = replace(forward_batch, cascade=cascade)
        if carry_ids is not None:
            forward_batch.input_ids.index_copy_(0, *carry_ids)
        logits = self.model(forward_batch, self.kv_cache)
        row_start = [0]
        for s in seqs:
            row_start.append(row_start[-1] + (s.num_new - s.logits_from))
        return logits, row_start

    def _index(self, values: Sequence[int]) -> torch.Tensor:
        """An int64 index tensor on the device without a synchronizing copy."""
        t = torch.tensor(values, dtype=torch.int64)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _launch(self, seqs: list[ScheduledSeq], plan: CascadePlan | None, carry: Carry | None,
                burst: int = 1, num_graph_rows: int = 0) -> PendingStep:
        start_event = None
        if self.profile and self.device.type == "cuda":
            start_event = torch.cuda.Event(enable_timing=True)
            start_event.record()
        logits, row_start, graph = self._forward(seqs, plan, carry, burst, num_graph_rows)
        if graph:
            self.graph_steps += burst
        sample_idx = [i for i, s in enumerate(seqs) if s.sample and s.request.params.max_tokens > 0]
        sample_rows = [row_start[i + 1] - 1 for i in sample_idx]

        device_tokens = host = event = None
        sample_row: dict[int, int] = {}
        if sample_idx:
            reqs = [seqs[i].request for i in sample_idx]
            if sample_rows == list(range(logits.shape[0])):
                sample_logits = logits  # every row samples (decode): no gather, no index upload
            else:
                sample_logits = logits.index_select(0, self._index(sample_rows))
            mask_rows = [j for j, r in enumerate(reqs) if r.matcher is not None]
            if mask_rows:
                bitmask = allocate_bitmask(len(reqs), self.vocab_size)
                for j in mask_rows:
                    reqs[j].matcher.fill_bitmask(bitmask, j)
                apply_bitmask(sample_logits, bitmask, mask_rows)
            draw = self._sampling(reqs)
            out = draw(sample_logits)
            device_tokens = out.token_ids
            if burst > 1:
                self.burst_launches += 1
                if len(reqs) != len(seqs):
                    raise ValueError("every row of a decode burst samples")
                assert self.graphs is not None  # _forward replayed a graph
                tokens = [out.token_ids]
                for _ in range(burst - 1):
                    tokens.append(draw(self.graphs.next_step(tokens[-1])).token_ids)
                device_tokens = tokens[-1]
                out = SampleOutput(torch.stack(tokens))  # [burst, rows]: one readback
            host, event = self._read_back(out, timed=start_event is not None)
            sample_row = {id(r): j for j, r in enumerate(reqs)}

        prompt_lps: list[list[TokenLogprob]] = [[] for _ in seqs]
        for i, s in enumerate(seqs):
            req = s.request
            if req.params.prompt_logprobs is None:
                continue
            first_pos = s.start + s.logits_from
            rows = [
                (row_start[i] + j, first_pos + j + 1)
                for j in range(s.num_new - s.logits_from)
                if first_pos + j + 1 < len(req.prompt_ids)
            ]
            if rows:
                prompt_lps[i] = prompt_logprobs(
                    logits.index_select(0, self._index([r for r, _ in rows])),
                    self._index([req.prompt_ids[p] for _, p in rows]),
                    req.params.prompt_logprobs,
                )
        return PendingStep(ScheduledBatch(()), None, sample_idx, device_tokens, host, event, prompt_lps,
                           sample_row, graph, start_event=start_event if event is not None else None, burst=burst)

    def _sampling(self, reqs: list[Request]) -> Callable[[torch.Tensor], SampleOutput]:
        """The step's sampling, as a function of the logits rows of `reqs` (a burst calls it
        once per step; seeded generators advance one draw per call, as in separate steps)."""
        penalized = any(r.params.uses_penalties for r in reqs)
        if not penalized and all(r.params.greedy and r.params.logprobs is None for r in reqs):
            # Plain greedy rows (the benchmarks' case): what Sampler.sample computes for them,
            # without building and uploading five per-row setting tensors every step.
            no_logprobs = (None,) * len(reqs)
            return lambda logits: SampleOutput(logits.argmax(dim=-1), num_logprobs=no_logprobs)
        sampling = SamplingBatch.build(
            [r.params for r in reqs],
            output_token_ids=[r.output_ids for r in reqs] if penalized else None,
            prompt_token_ids=[r.prompt_ids for r in reqs] if penalized else None,
            generators=[r.generator for r in reqs],
        )
        return lambda logits: self.sampler.sample(logits, sampling)

    def _read_back(self, out: SampleOutput, timed: bool = False) -> tuple[SampleOutput, "torch.cuda.Event | None"]:
        """Start the step's device-to-host copies (into pinned memory) and mark their end."""
        if self.device.type != "cuda":
            return out, None

        def pinned(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
            return h

        host = replace(out, token_ids=pinned(out.token_ids), logprobs=pinned(out.logprobs),
                       top_ids=pinned(out.top_ids), top_logprobs=pinned(out.top_logprobs))
        event = torch.cuda.Event(enable_timing=timed)
        event.record()
        return host, event
