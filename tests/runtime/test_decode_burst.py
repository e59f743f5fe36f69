"""Decode bursts: k decode steps per launch, each fed the token the step before sampled.

A burst must give exactly what k one-token steps give: the same tokens (greedy), the same text
and finish, cut at a stop token, EOS or stop string inside the burst, and no KV page leaked or
wrongly cached (the KV computed past a request's end, or past tokens still on the device when
a request is preempted, never reaches the tree). Checked on the CPU through the graphs' padded
static buffers (`DecodeGraphs(use_graphs=False)`), against the synchronous loop without bursts.
"""

from __future__ import annotations

import pytest

from radixserve.runtime import Engine, SamplingParams
from radixserve.runtime.config import EngineConfig
from radixserve.runtime.cuda_graphs import DecodeRows, build_host_inputs
from radixserve.runtime.detokenizer import IncrementalDetokenizer, StopChecker, TokenPieces
from radixserve.runtime.output_processor import OutputLimits, process_sampled_burst, process_sampled_token
from radixserve.runtime.request import Request
from radixserve.runtime.scheduler import Scheduler

# ------------------------------------------------------------------ host inputs of a burst


def test_burst_host_inputs_hold_every_step() -> None:
    page, dummy_slot, max_bs = 4, 99 * 4, 8
    # Row 0 grows from position 6 into its third page; row 1 from 1 within its first.
    rows = DecodeRows(token_ids=[11, 12], seq_lens=[7, 2], pages=[[7, 3, 50], [9]])
    host = build_host_inputs(rows, None, bucket=4, max_bs=max_bs, page_size=page, dummy_slot=dummy_slot, steps=3)
    assert host.i64.shape == (4 + 3, max_bs) and host.steps == 3
    slots = [host.i64[2], host.i64[5], host.i64[6]]  # steps 0, 1, 2
    assert [s[:2].tolist() for s in slots] == [[3 * 4 + 2, 9 * 4 + 1], [3 * 4 + 3, 9 * 4 + 2], [50 * 4 + 0, 9 * 4 + 3]]
    assert all(s[2:4].tolist() == [dummy_slot, dummy_slot] for s in slots)  # padding stays padding
    assert host.page_table.tolist() == [[7, 3, 50], [9, 0, 0]]  # the pages of the last step too

    # Cascade: the slots come from each row's own pages past the shared prefix.
    rows = DecodeRows(token_ids=[1, 2], seq_lens=[9, 10], pages=[[5, 6, 7, 20], [5, 6, 8, 21]])
    host = build_host_inputs(rows, [(0, 2, 2)], bucket=2, max_bs=max_bs, page_size=page,
                             dummy_slot=dummy_slot, steps=4)
    assert host.suffix_table.tolist() == [[7, 0], [8, 21]]  # row 0 ends at position 11, row 1 at 12
    assert host.i64[2, :2].tolist() == [7 * 4 + 0, 8 * 4 + 1]
    assert host.i64[7, :2].tolist() == [7 * 4 + 3, 21 * 4 + 0]  # step 3: positions 11 and 12
    with pytest.raises(ValueError):  # the row lacks the page its second step writes
        build_host_inputs(DecodeRows([1], [8], [[5, 6]]), None, 1, max_bs, page, dummy_slot, steps=2)


def _scheduler_with_two(max_model_len: int, first_max_tokens: int) -> tuple[Scheduler, Request, Request]:
    """A scheduler (pages of 4 tokens) holding a 3-token prompt with `first_max_tokens` and a
    4-token prompt with max_tokens 100, both added."""
    config = EngineConfig(page_size=4, max_running=4, max_batch_tokens=64, max_model_len=max_model_len)
    scheduler = Scheduler(config, num_pages=32)
    first = Request("first", 0, [5, 6, 7], SamplingParams(max_tokens=first_max_tokens, temperature=0), lambda d: None)
    second = Request("second", 0, [8, 9, 10, 11], SamplingParams(max_tokens=100, temperature=0), lambda d: None)
    for req in (first, second):
        scheduler.add(req)
    return scheduler, first, second


def test_burst_length_stops_at_the_context_limit_not_at_max_tokens() -> None:
    """A request one token from max_tokens does not shorten the batch's burst (the fold cuts
    its tokens past it); one near the context limit does, and the burst's KV pages are
    reserved for every step."""
    scheduler, short, long = _scheduler_with_two(max_model_len=20, first_max_tokens=2)
    batch = scheduler.schedule(max_burst=8)  # the prefill of both: no burst
    assert batch.burst == 1
    scheduler.postprocess_computed(batch)
    for req in (short, long):
        req.output_ids.append(1)
    batch = scheduler.schedule(max_burst=8)
    assert batch.burst == 8 and batch.all_decode
    for seq in batch.seqs:  # pages for the burst's eight tokens
        assert len(seq.request.pages) * 4 >= seq.request.num_computed + 8
    scheduler.postprocess_computed(batch)
    for req in (short, long):
        req.output_ids.extend([1] * 8)
    # long holds 4 + 9 tokens: 7 more reach max_model_len (20). short is past max_tokens.
    assert scheduler.schedule(max_burst=8).burst == 7
    scheduler.check_integrity()


def test_a_request_finishing_in_flight_has_no_row_and_keeps_the_burst() -> None:
    """With the overlapped loop a request that the step in flight takes to max_tokens gets no
    placeholder (engine_loop.py): it is left out of the next step, which may still be a burst."""
    scheduler, done, going = _scheduler_with_two(max_model_len=64, first_max_tokens=1)
    scheduler.postprocess_computed(scheduler.schedule(max_burst=8))  # both prefilled, tokens in flight
    going.output_ids.append(0)  # the placeholder; `done` gets none
    batch = scheduler.schedule(max_burst=8)
    assert [s.request for s in batch.seqs] == [going] and batch.burst == 8


# ------------------------------------------------------------------ folding a burst's tokens


@pytest.fixture(scope="module")
def tokenizer(engine_p1: Engine):
    return engine_p1.tokenizer


def _request(tokenizer, pieces: TokenPieces, params: SamplingParams) -> Request:
    prompt = tokenizer.encode("Once upon a time")
    req = Request("r", 0, prompt, params, lambda d: None)
    req.detokenizer = IncrementalDetokenizer(tokenizer, prompt, params.skip_special_tokens, pieces)
    req.stop_checker = StopChecker(params.stop, params.include_stop_str_in_output)
    return req


def _one_by_one(req: Request, tokens: list[int], limits: OutputLimits) -> tuple:
    text = ""
    for t in tokens:
        delta = process_sampled_token(req, t, None, limits)
        text += delta.text
        if delta.finish_reason is not None:
            break
    return req.output_ids, text, req.finish_reason, req.stop_reason


@pytest.mark.parametrize("case", ["plain", "eos", "ignore_eos", "stop_token", "stop_string", "max_tokens"])
def test_burst_folds_like_one_token_steps(tokenizer, case: str) -> None:
    eos = tokenizer.eos_token_id
    words = tokenizer.encode(" the cat sat on the mat and then it")
    tokens = words[:6]
    params = dict(max_tokens=50, temperature=0)
    if case in ("eos", "ignore_eos"):
        tokens = words[:2] + [eos] + words[2:5]
        params["ignore_eos"] = case == "ignore_eos"
    elif case == "stop_token":
        params["stop_token_ids"] = [words[3]]
    elif case == "stop_string":
        params["stop"] = [" sat on"]
    elif case == "max_tokens":
        params["max_tokens"] = 4
    limits = OutputLimits(frozenset({eos}), 1000)
    pieces = TokenPieces(tokenizer)
    a = _request(tokenizer, pieces, SamplingParams(**params))
    b = _request(tokenizer, pieces, SamplingParams(**params))
    delta = process_sampled_burst(a, list(tokens), limits)
    got = (a.output_ids, delta.text, a.finish_reason, a.stop_reason)
    assert got == _one_by_one(b, tokens, limits)
    assert delta.token_ids == a.output_ids and delta.completion_tokens == len(a.output_ids)
    if case in ("eos", "stop_token", "stop_string", "max_tokens"):
        assert a.finish_reason is not None and len(a.output_ids) < len(tokens)


# ------------------------------------------------------------------ the engine with bursts


def _requests() -> list[tuple[str, SamplingParams]]:
    return [
        ("The capital of France is", SamplingParams(temperature=0, max_tokens=21)),
        ("Once upon a time, in a land far away,", SamplingParams(temperature=0, max_tokens=30, stop=[" the", "."])),
        ("def fibonacci(n):", SamplingParams(temperature=0, max_tokens=9)),
        ("List three colors:", SamplingParams(temperature=0, max_tokens=26, ignore_eos=True)),
        ("Shared system prompt. " * 12 + "Question one?", SamplingParams(temperature=0, max_tokens=17)),
        ("Shared system prompt. " * 12 + "Question two!", SamplingParams(temperature=0, max_tokens=23,
                                                                        ignore_eos=True)),
        ("Shared system prompt. " * 12 + "Question three.", SamplingParams(temperature=0, max_tokens=2)),
        ("1, 2, 3, 4,", SamplingParams(temperature=0.8, seed=3, max_tokens=19)),
    ]


def _run(engine: Engine, pool_at_rest) -> list:  # noqa: ANN001 - the conftest check
    prompts, params = zip(*_requests())
    results = engine.generate(list(prompts), list(params))
    pool_at_rest(engine)
    return [(o.token_ids, o.text, o.finish_reason) for r in results for o in r.outputs]


ENGINE = dict(model="default", page_size=16, max_batch_tokens=512, max_model_len=320)


@pytest.fixture(scope="module")
def unbursted(pool_at_rest) -> list:  # noqa: ANN001
    with Engine(**ENGINE, num_pages=64, overlap=False, decode_burst=1) as engine:
        return _run(engine, pool_at_rest)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("num_pages", [64, 9])  # 9 pages of 16 tokens: preemptions
def test_bursts_give_one_token_steps_outputs(unbursted: list, overlap: bool, num_pages: int, pool_at_rest,  # noqa: ANN001
                                             eager_graphs) -> None:  # noqa: ANN001
    with Engine(**ENGINE, num_pages=num_pages, overlap=overlap, decode_burst=4, decode_burst_min_batch=2) as engine:
        runner = eager_graphs(engine, max_bs=8, max_steps=4)
        got = _run(engine, pool_at_rest)
        assert runner.burst_launches > 0
        if num_pages == 9:
            assert engine.stats().preemptions > 0
    assert got == unbursted
