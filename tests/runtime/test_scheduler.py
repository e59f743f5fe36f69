"""Scheduler behaviour without a model: a fake step function stands in for the forward pass.

The fake "model" samples a token that depends only on the sequence so far, so outputs must be
identical however requests are batched, chunked, preempted or served from the cache. Page
accounting is checked after every step.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.runtime.config import EngineConfig, default_batch_tokens
from radixserve.runtime.request import Request
from radixserve.runtime.sampling_params import SamplingParams
from radixserve.runtime.scheduler import Scheduler


def fake_token(ids: list[int]) -> int:
    return (sum(ids) * 31 + len(ids)) % 997 + 3


def make_request(rid: str, prompt: list[int], max_tokens: int, **kw) -> Request:
    return Request(rid, 0, list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0), lambda d: None, **kw)


def drive(scheduler: Scheduler, requests: list[Request], max_steps: int = 10_000) -> dict[str, list[int]]:
    """Run until every request finishes; returns outputs and checks integrity every step."""
    for r in requests:
        scheduler.add(r)
    steps = 0
    while scheduler.has_work():
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
        batch = scheduler.schedule()
        scheduler.check_integrity()
        scheduler.postprocess_computed(batch)
        for seq in batch.seqs:
            req = seq.request
            if seq.sample:
                req.output_ids.append(fake_token(req.all_ids))
                if len(req.output_ids) >= req.params.max_tokens:
                    scheduler.finish(req)
        scheduler.check_integrity()
    return {r.request_id: list(r.output_ids) for r in requests}


def assert_no_leak(scheduler: Scheduler) -> None:
    scheduler.check_integrity()
    assert not scheduler.running and not scheduler.waiting
    if scheduler.tree is not None:
        assert scheduler.tree.locked_pages == 0
        scheduler.tree.evict(scheduler.allocator.num_pages)
    assert scheduler.allocator.num_free == scheduler.allocator.num_pages


def gsp_requests(groups: int, per_group: int, prefix: int, question: int, out: int, seed: int = 0):
    rng = random.Random(seed)
    reqs = []
    for g in range(groups):
        system = [rng.randrange(10, 5000) for _ in range(prefix)]
        for i in range(per_group):
            q = [rng.randrange(10, 5000) for _ in range(question)]
            reqs.append(make_request(f"g{g}-{i}", system + q, out))
    rng.shuffle(reqs)
    return reqs


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_shared_prefixes_are_computed_once(page_size: int) -> None:
    prefix, question = 64, 8
    sched = Scheduler(EngineConfig(page_size=page_size, max_batch_tokens=256), num_pages=4096 // page_size)
    reqs = gsp_requests(4, 8, prefix, question, out=4)
    drive(sched, reqs)
    prompt_tokens = sum(len(r.prompt_ids) for r in reqs)
    # Optimal: each group's prefix is computed once (whole pages only are shared).
    shareable = (prefix // page_size) * page_size
    optimal_hits = 4 * 7 * shareable
    assert sched.counters.prompt_tokens == prompt_tokens
    assert sched.counters.cached_tokens == optimal_hits
    assert_no_leak(sched)


def test_outputs_do_not_depend_on_pool_size_and_preemption() -> None:
    reqs_big = gsp_requests(3, 4, 40, 10, out=12, seed=1)
    reqs_small = gsp_requests(3, 4, 40, 10, out=12, seed=1)
    big = Scheduler(EngineConfig(page_size=4, max_batch_tokens=64), num_pages=1000)
    small = Scheduler(EngineConfig(page_size=4, max_batch_tokens=64), num_pages=40)
    out_big = drive(big, reqs_big)
    out_small = drive(small, reqs_small)
    assert out_big == out_small
    assert small.counters.preemptions > 0
    assert_no_leak(big)
    assert_no_leak(small)


def test_waiting_prompts_are_not_matched_while_running_is_full() -> None:
    """Cache-aware ordering matches every waiting prompt against the tree; that is skipped while
    the running set is full, so a long queue behind it costs no per-step matching (the radix
    cache's host cost on a workload that shares nothing; benchmarks/radix_cost.py)."""
    sched = Scheduler(EngineConfig(page_size=4, max_batch_tokens=4096, max_running=4), num_pages=200)
    tree = sched.tree
    calls = [0]
    original = tree.match_prefix

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    tree.match_prefix = counting
    rng = random.Random(3)
    reqs = [make_request(f"r{i}", [rng.randrange(10, 5000) for _ in range(40)], 30) for i in range(40)]
    for r in reqs:
        sched.add(r)
    sched.postprocess_computed(sched.schedule())  # admits 4: the running set is full
    assert len(sched.running) == 4
    before = calls[0]
    for _ in range(5):
        batch = sched.schedule()
        sched.postprocess_computed(batch)
        for seq in batch.seqs:
            if seq.sample:
                seq.request.output_ids.append(fake_token(seq.request.all_ids))
    assert calls[0] == before  # full: the 36 waiting prompts are not matched again


def test_chunked_prefill_respects_budget() -> None:
    sched = Scheduler(EngineConfig(page_size=1, max_batch_tokens=16), num_pages=512)
    req = make_request("long", list(range(10, 110)), 3)
    sched.add(req)
    batch = sched.schedule()
    assert batch.num_tokens == 16 and not batch.seqs[0].sample
    assert batch.seqs[0].logits_from == 16  # a middle chunk needs no logits
    sched.postprocess_computed(batch)
    sched.check_integrity()
    drive(sched, [])
    assert_no_leak(sched)


def test_finished_sequence_is_cached_for_next_turn() -> None:
    sched = Scheduler(EngineConfig(page_size=1), num_pages=512)
    turn1 = make_request("t1", list(range(10, 60)), 8)
    drive(sched, [turn1])
    history = turn1.all_ids + [7, 8, 9]
    turn2 = make_request("t2", history, 4)
    drive(sched, [turn2])
    # Everything of turn 1 whose KV was computed is a hit: all but its last sampled token.
    assert turn2.cached_tokens == len(turn1.all_ids) - 1
    assert_no_leak(sched)


def test_cache_salt_isolates_tenants() -> None:
    sched = Scheduler(EngineConfig(page_size=1), num_pages=512)
    a = make_request("a", list(range(10, 60)), 2, cache_salt="tenant-a")
    drive(sched, [a])
    b = make_request("b", list(range(10, 60)), 2, cache_salt="tenant-b")
    c = make_request("c", list(range(10, 60)), 2, cache_salt="tenant-a")
    drive(sched, [b])
    drive(sched, [c])
    assert b.cached_tokens == 0
    assert c.cached_tokens == 49
    assert_no_leak(sched)


def test_abort_mid_prefill_frees_pages() -> None:
    sched = Scheduler(EngineConfig(page_size=4, max_batch_tokens=8), num_pages=64)
    req = make_request("x", list(range(10, 50)), 5)
    sched.add(req)
    sched.postprocess_computed(sched.schedule())
    sched.finish(req)
    assert_no_leak(sched)


def test_prefix_cache_disabled() -> None:
    sched = Scheduler(EngineConfig(page_size=2, enable_prefix_cache=False), num_pages=256)
    reqs = gsp_requests(2, 3, 20, 5, out=3)
    drive(sched, reqs)
    assert sched.counters.cached_tokens == 0
    assert_no_leak(sched)


@settings(max_examples=60, deadline=None)
@given(
    page_size=st.sampled_from([1, 2, 4, 8]),
    num_pages=st.integers(min_value=24, max_value=200),
    budget=st.integers(min_value=4, max_value=64),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_random_workloads_never_leak(page_size: int, num_pages: int, budget: int, seed: int) -> None:
    rng = random.Random(seed)
    roots = [[rng.randrange(10, 50) for _ in range(rng.randrange(0, 30))] for _ in range(3)]
    reqs = []
    capacity = num_pages * page_size
    for i in range(rng.randrange(1, 12)):
        prompt = rng.choice(roots) + [rng.randrange(10, 50) for _ in range(rng.randrange(1, 20))]
        out = rng.randrange(1, 10)
        if len(prompt) + out + page_size <= capacity // 2:
            reqs.append(make_request(f"r{i}", prompt, out, cache_salt=rng.choice([None, None, "s"])))
    sched = Scheduler(EngineConfig(page_size=page_size, max_batch_tokens=budget), num_pages=num_pages)
    outputs = drive(sched, reqs)
    for r in reqs:  # same outputs as a solo run on a big pool
        solo = Scheduler(EngineConfig(page_size=page_size), num_pages=1024)
        ref = make_request("solo", r.prompt_ids, r.params.max_tokens)
        assert drive(solo, [ref])["solo"] == outputs[r.request_id]
    assert_no_leak(sched)


def test_step_token_budget_defaults_by_device() -> None:
    assert EngineConfig().max_batch_tokens is None  # the engine picks it by device
    assert default_batch_tokens("cpu") == 2048
    assert default_batch_tokens("cuda", 80 << 30) == 16384
    assert default_batch_tokens("cuda", 24 << 30) == 8192
    assert Scheduler(EngineConfig(), num_pages=16).max_batch_tokens == 2048  # a scheduler on its own
    assert Scheduler(EngineConfig(max_batch_tokens=64), num_pages=16).max_batch_tokens == 64
    with pytest.raises(ValueError, match="max_batch_tokens"):
        EngineConfig(max_batch_tokens=0)

