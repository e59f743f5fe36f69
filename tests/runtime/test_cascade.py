"""The cascade planner: grouping by shared pages, and tensors that make shared-prefix attention
equal plain paged decode attention over each request's whole page table."""

from __future__ import annotations

import random

import pytest
import torch

from radixserve.kernels import decode_attention_reference, shared_prefix_decode_attention_reference
from radixserve.runtime.cascade import (
    MIN_SHARED_TOKENS,
    CascadePlanner,
    _shared_pages,
    build_cascade_info,
    plan_cascade,
)


def make_batch(page_size: int, seed: int):
    rng = random.Random(seed)
    shared_a = [rng.randrange(100, 200) for _ in range(MIN_SHARED_TOKENS // page_size + 3)]
    shared_b = [rng.randrange(200, 300) for _ in range(MIN_SHARED_TOKENS // page_size + 1)]
    pages, seq_lens = [], []
    next_private = 300
    for base in [shared_a] * 3 + [shared_b] * 2 + [[]]:
        own = rng.randrange(1, 4)
        row = list(base) + list(range(next_private, next_private + own))
        next_private += own
        pages.append(row)
        seq_lens.append((len(row) - 1) * page_size + rng.randrange(1, page_size + 1))
    order = list(range(len(pages)))
    rng.shuffle(order)
    return [pages[i] for i in order], [seq_lens[i] for i in order]


def test_plan_groups_by_shared_pages() -> None:
    pages, seq_lens = make_batch(page_size=4, seed=0)
    plan = plan_cascade(pages, seq_lens, 4)
    assert sorted(plan.order) == list(range(len(pages)))
    sizes = sorted(end - start for start, end, shared in plan.groups if shared)
    assert sizes == [2, 3]
    for start, end, shared in plan.groups:
        rows = [pages[plan.order[r]] for r in range(start, end)]
        assert all(r[:shared] == rows[0][:shared] for r in rows)
        if shared:
            assert shared * 4 >= MIN_SHARED_TOKENS


def test_shared_pages_is_the_longest_common_run() -> None:
    # Members whose page lists diverge at different pages (the tree hands out canonical pages:
    # a branch point is where lists start to differ), capped by the shortest member's length.
    rng = random.Random(7)
    for trial in range(300):
        trunk = [rng.randrange(1000) for _ in range(rng.randrange(1, 12))]
        members = []
        for _ in range(rng.randrange(2, 6)):
            cut = rng.randrange(len(trunk) + 1)
            members.append(trunk[:cut] + [rng.randrange(1000, 2000) for _ in range(rng.randrange(1, 5))])
        seq_lens = [(len(p) - 1) * 4 + rng.randrange(1, 5) for p in members]
        limit = min((n - 1) // 4 for n in seq_lens)
        common = 0
        while common < limit and all(p[common] == members[0][common] for p in members):
            common += 1
        shared, capped = _shared_pages(list(range(len(members))), members, seq_lens, 4)
        assert (shared, capped) == (common, common == limit), (trial, members, seq_lens)


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_cascade_equals_plain_decode(page_size: int) -> None:
    pages, seq_lens = make_batch(page_size, seed=page_size)
    plan = plan_cascade(pages, seq_lens, page_size)
    pages = [pages[i] for i in plan.order]
    seq_lens = [seq_lens[i] for i in plan.order]
    num_pages, hkv, hq, d = 400, 2, 6, 16
    k_cache = torch.randn(num_pages, page_size, hkv, d)
    v_cache = torch.randn(num_pages, page_size, hkv, d)
    q = torch.randn(len(pages), hq, d)
    width = max(len(p) for p in pages)
    table = torch.zeros(len(pages), width, dtype=torch.int32)
    for i, p in enumerate(pages):
        table[i, : len(p)] = torch.tensor(p, dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    expected = decode_attention_reference(q, k_cache, v_cache, table, lens, 0.25, max(seq_lens))
    c = build_cascade_info(plan, pages, seq_lens, page_size, torch.device("cpu"))
    got = shared_prefix_decode_attention_reference(
        q, k_cache, v_cache, c.prefix_page_table, c.prefix_lens, c.cu_groups, c.suffix_page_table,
        c.suffix_lens, 0.25, c.max_prefix_len, c.max_suffix_len, c.max_group_size,
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_planner_keeps_a_settled_plan_while_the_requests_grow() -> None:
    """Decode steps of the same requests: the kept plan equals a fresh one at every step; a
    change of batch, an unsettled plan or `forget` makes it plan again."""
    page_size = 4
    pages, seq_lens = make_batch(page_size, seed=3)
    requests = [object() for _ in pages]
    planner = CascadePlanner(page_size)
    rng = random.Random(0)
    next_page = 1000
    for step in range(12):
        plan = planner.plan(requests, pages, seq_lens)
        fresh = plan_cascade(pages, seq_lens, page_size)
        assert (plan.order, plan.groups) == (fresh.order, fresh.groups)
        for i in range(len(pages)):  # every request decodes one token, a new page when full
            if seq_lens[i] % page_size == 0:
                pages[i] = pages[i] + [next_page]
                next_page += 1
            seq_lens[i] += 1
        rng.random()
    assert fresh.settled and planner.reused == 11
    planner.plan(requests[:-1], pages[:-1], seq_lens[:-1])  # one request left the batch
    assert planner.reused == 11
    planner.forget()
    planner.plan(requests[:-1], pages[:-1], seq_lens[:-1])
    assert planner.reused == 11


def test_plan_capped_by_a_short_member_is_not_settled() -> None:
    """Two requests whose common pages run up to the shorter one's last token: the prefix is cut
    by its length and may grow, so the plan is not kept."""
    shared = list(range(MIN_SHARED_TOKENS // 4 + 2))
    pages = [shared + [500, 501], shared + [600, 601]]  # a differing page within both: settled
    seq_lens = [len(shared) * 4 + 5, len(shared) * 4 + 6]
    assert plan_cascade(pages, seq_lens, 4).settled
    pages = [shared, shared + [600]]
    seq_lens = [len(shared) * 4, len(shared) * 4 + 3]
    plan = plan_cascade(pages, seq_lens, 4)
    assert plan.shares and not plan.settled
    planner = CascadePlanner(4)
    reqs = [object(), object()]
    planner.plan(reqs, pages, seq_lens)
    planner.plan(reqs, pages, seq_lens)
    assert planner.reused == 0
