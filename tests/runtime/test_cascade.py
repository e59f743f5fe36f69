"""The cascade planner: grouping by shared pages, and tensors that make shared-prefix attention
equal plain paged decode attention over each request's whole page table."""

from __future__ import annotations

import random

import pytest
import torch

from radixserve.kernels import decode_attention_reference, shared_prefix_decode_attention_reference
from radixserve.runtime.cascade import MIN_SHARED_TOKENS, build_cascade_info, plan_cascade


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
