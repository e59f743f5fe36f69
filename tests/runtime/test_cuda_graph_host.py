"""CUDA-graph decode batches, small prefill steps and the overlapped engine loop, on the CPU.

Graph capture itself needs CUDA (tests/runtime/test_gpu_engine.py); everything around it does
not: the capture sizes and buckets, the padding of a batch into the static buffers (padding
rows read nothing and write only the dummy page), cascade groups cut to the graph's cap, and
carried input tokens. `DecodeGraphs(use_graphs=False)` runs the model eagerly on exactly the
padded static buffers a replay would read, so its logits must equal an unpadded forward; so
does `PrefillGraphs(use_graphs=False)` for prefill steps padded to a (tokens, requests) bucket.
The overlapped engine loop must produce exactly what the synchronous loop produces.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from radixserve.runtime import Engine, SamplingParams
from radixserve.runtime.cascade import build_cascade_info, plan_cascade
from radixserve.runtime.cuda_graphs import (
    DecodeGraphs,
    DecodeRows,
    bucket_for,
    build_host_inputs,
    capture_batch_sizes,
    group_cap,
    split_groups,
)
from radixserve.runtime.forward_batch import SeqStep, build_forward_batch
from radixserve.runtime.kv_cache import KVCache
from radixserve.runtime.prefill_graphs import PrefillGraphs
from radixserve.runtime.loader import ResolvedModel, load_model
from radixserve.runtime.model_config import NAMED_SHAPES


def test_capture_sizes_and_buckets() -> None:
    assert capture_batch_sizes(256) == (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)
    assert capture_batch_sizes(1) == (1,)
    assert capture_batch_sizes(100)[-2:] == (96, 100)
    assert capture_batch_sizes(1024)[-9:] == (512, 576, 640, 704, 768, 832, 896, 960, 1024)
    sizes = capture_batch_sizes(256)
    assert [bucket_for(b, sizes) for b in (1, 3, 8, 9, 33, 129, 256)] == [1, 4, 8, 16, 48, 160, 256]
    assert bucket_for(257, sizes) is None and bucket_for(0, sizes) is None
    with pytest.raises(ValueError):
        capture_batch_sizes(0)


def test_group_cap_and_split() -> None:
    assert group_cap(32, 8) == 16 and group_cap(4, 2) == 32 and group_cap(128, 1) == 1
    groups = [(0, 40, 3), (40, 42, 0), (42, 43, 5)]
    assert split_groups(groups, 16) == [(0, 16, 3), (16, 32, 3), (32, 40, 3), (40, 41, 0), (41, 42, 0), (42, 43, 5)]


def test_host_inputs_padding_rules() -> None:
    page, dummy_slot, max_bs = 4, 99 * 4, 8
    rows = DecodeRows(token_ids=[11, 12, 13], seq_lens=[5, 1, 9], pages=[[7, 3, 50], [9], [1, 2, 6, 8]])
    host = build_host_inputs(rows, None, bucket=4, max_bs=max_bs, page_size=page, dummy_slot=dummy_slot,
                             carry=[(2, 5)])
    ids, pos, slots, cdst, csrc = host.i64
    assert ids[:4].tolist() == [11, 12, 13, 0] and pos[:4].tolist() == [4, 0, 8, 0]
    # slot of position p = pages[p // P] * P + p % P; the padding row writes the dummy slot
    assert slots[:4].tolist() == [3 * 4 + 0, 9 * 4 + 0, 6 * 4 + 0, dummy_slot]
    assert host.i32[:4].tolist() == [5, 1, 9, 0]  # padding rows: seq_len 0, nothing read
    assert host.page_table.tolist() == [[7, 3, 0], [9, 0, 0], [1, 2, 6]]  # only the pages in use
    assert host.num_carry == 1 and (cdst[0], csrc[0]) == (2, 5)

    # Cascade: rows 0 and 1 share 2 prefix pages; row 2 is alone (a group without prefix).
    rows = DecodeRows(token_ids=[1, 2, 3], seq_lens=[10, 12, 3], pages=[[5, 6, 7], [5, 6, 8], [9]])
    host = build_host_inputs(rows, [(0, 2, 2), (2, 3, 0)], bucket=4, max_bs=max_bs, page_size=page,
                             dummy_slot=dummy_slot)
    prefix_lens, suffix_lens, cu = host.i32[8:16], host.i32[16:24], host.i32[24:33]
    assert prefix_lens[:4].tolist() == [8, 0, 0, 0]
    assert suffix_lens[:4].tolist() == [2, 4, 3, 0]
    assert cu[:5].tolist() == [0, 2, 3, 4, 4]  # the padding row is a group of one; the last slot is empty
    assert host.prefix_table.tolist() == [[5, 6], [0, 0]]
    assert host.suffix_table.tolist() == [[7], [8], [9]]
    with pytest.raises(ValueError):
        build_host_inputs(rows, [(0, 2, 3), (2, 3, 0)], 4, max_bs, page, dummy_slot)  # suffix would be empty
    with pytest.raises(ValueError):
        build_host_inputs(rows, None, 2, max_bs, page, dummy_slot)  # does not fit the bucket


# ------------------------------------------------------------------ padded replay on the CPU


def _tiny_model():
    config = NAMED_SHAPES["tiny-llama"]
    resolved = ResolvedModel(name="tiny-llama", path=None, config=config, load_format="dummy", tokenizer_path=None)
    return config, load_model(resolved, "cpu", torch.float32, ops="torch", progress=False, seed=1)


def _random_kv(config, num_pages: int, page_size: int) -> KVCache:
    kv = KVCache.for_model(config, num_pages, page_size, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    for t in kv.k + kv.v:
        t.copy_(torch.randn(t.shape, generator=g))
    return kv


def _clone(kv: KVCache) -> KVCache:
    out = KVCache(kv.num_layers, kv.num_pages, kv.page_size, kv.num_kv_heads, kv.head_dim, kv.dtype, "cpu")
    for a, b in zip(out.k + out.v, kv.k + kv.v):
        a.copy_(b)
    return out


@pytest.mark.parametrize("shared", [False, True])
def test_padded_decode_equals_unpadded_forward(shared: bool) -> None:
    """5 decode rows padded to the bucket of 8: same logits as an unpadded forward, same KV
    writes, and the padding rows touch only the dummy page."""
    config, model = _tiny_model()
    page, num_pages, max_len = 4, 128, 128
    dummy = num_pages - 1
    rng = random.Random(3)
    prefix = rng.sample(range(dummy), 18) if shared else []  # 72 tokens: worth a cascade
    free = [p for p in range(dummy) if p not in prefix]
    rng.shuffle(free)
    pages, seq_lens = [], []
    for i in range(5):
        n = rng.randrange(2, 40)
        base = prefix if (shared and i != 3) else []
        seq_len = len(base) * page + n
        own = [free.pop() for _ in range(-(-seq_len // page) - len(base))]
        pages.append(base + own)
        seq_lens.append(seq_len)
    token_ids = [rng.randrange(0, config.vocab_size) for _ in pages]
    plan = plan_cascade(pages, seq_lens, page)
    assert plan.shares == shared
    order = plan.order if shared else list(range(5))
    pages, seq_lens, token_ids = ([x[i] for i in order] for x in (pages, seq_lens, token_ids))

    kv_ref = _random_kv(config, num_pages, page)
    kv_pad = _clone(kv_ref)
    steps = [SeqStep([t], n - 1, p) for t, n, p in zip(token_ids, seq_lens, pages)]
    batch = build_forward_batch(steps, page, "cpu")
    if shared:
        from dataclasses import replace

        batch = replace(batch, cascade=build_cascade_info(plan, pages, seq_lens, page, torch.device("cpu")))
    with torch.inference_mode():
        expected = model(batch, kv_ref)
        graphs = DecodeGraphs(model, kv_pad, max_bs=8, max_model_len=max_len, dummy_page=dummy,
                              num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, use_graphs=False)
        got = graphs.run(DecodeRows(token_ids, seq_lens, pages), plan.groups if shared else None)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    written = {p[(n - 1) // page] * page + (n - 1) % page for p, n in zip(pages, seq_lens)}
    untouched = torch.ones(num_pages * page, dtype=torch.bool)
    untouched[sorted(written)] = False
    untouched[dummy * page :] = False
    for a, b in zip(kv_pad.k + kv_pad.v, kv_ref.k + kv_ref.v):
        a, b = a.flatten(0, 1), b.flatten(0, 1)  # [slots, Hkv, D]
        assert torch.equal(a[untouched], b[untouched])  # nothing else of the real pages changed
        # the new tokens' K/V (later layers differ in rounding only: padded matmuls block differently)
        torch.testing.assert_close(a[sorted(written)], b[sorted(written)], rtol=1e-4, atol=1e-4)
        assert not torch.equal(a[dummy * page], b[dummy * page])  # padding rows wrote the dummy slot


def test_carried_tokens_are_gathered_on_device() -> None:
    config, model = _tiny_model()
    kv = _random_kv(config, 32, 4)
    rows = DecodeRows(token_ids=[0, 5, 0], seq_lens=[3, 7, 2], pages=[[1], [2, 3], [4]])
    previous = torch.tensor([111, 222, 333, 444])
    expected_rows = DecodeRows(token_ids=[444, 5, 222], seq_lens=[3, 7, 2], pages=[[1], [2, 3], [4]])
    with torch.inference_mode():
        g1 = DecodeGraphs(model, _clone(kv), max_bs=4, max_model_len=32, dummy_page=31,
                          num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, use_graphs=False)
        got = g1.run(rows, None, carry=[(0, 3), (2, 1)], carry_tokens=previous).clone()
        assert g1.i64[0, :3].tolist() == [444, 5, 222]
        g2 = DecodeGraphs(model, _clone(kv), max_bs=4, max_model_len=32, dummy_page=31,
                          num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, use_graphs=False)
        expected = g2.run(expected_rows, None)
    torch.testing.assert_close(got, expected)


def _prefill_graphs(model, kv: KVCache, max_len: int) -> PrefillGraphs:  # noqa: ANN001
    return PrefillGraphs(model, kv, max_model_len=max_len, dummy_page=kv.num_pages - 1, token_buckets=(16, 64),
                         request_buckets=(1, 4), use_graphs=False)


def test_prefill_bucket_and_padding_rules() -> None:
    config, model = _tiny_model()
    kv = _random_kv(config, 32, 4)
    graphs = _prefill_graphs(model, kv, max_len=40)
    a = SeqStep([5, 6, 7], start=6, pages=[3, 9, 4])  # 3 new tokens over 6 cached
    b = SeqStep([8, 9], start=0, pages=[7], logits_from=None)  # a middle chunk: no logits wanted
    assert graphs.bucket([a]) == (16, 1) and graphs.bucket([a, b]) == (16, 4)
    assert graphs.bucket([SeqStep(list(range(17)), 0, list(range(5)))]) == (64, 1)
    assert graphs.bucket([a] * 5) is None  # more requests than the largest bucket
    assert graphs.bucket([SeqStep(list(range(65)), 0, list(range(17)))]) is None  # more tokens
    assert graphs.bucket([SeqStep([1, 2], 0, [1], logits_from=0)]) is None  # prompt log-probabilities
    assert graphs.bucket([SeqStep([1], 40, list(range(11)))]) is None  # past max_model_len

    i64, i32, rows, table = graphs.host_inputs([a, b], 16)
    ids, pos, slots = i64[:, :16]
    assert ids[:5].tolist() == [5, 6, 7, 8, 9] and pos[:5].tolist() == [6, 7, 8, 0, 1]
    # slot = pages[p // P] * P + p % P; padding tokens write the dummy slot (page 31)
    assert slots[:5].tolist() == [9 * 4 + 2, 9 * 4 + 3, 4 * 4 + 0, 7 * 4 + 0, 7 * 4 + 1]
    assert (slots[5:] == 31 * 4).all() and (ids[5:] == 0).all()
    seq_lens, ext, cu = i32[:4], i32[4:8], i32[8:13]
    assert seq_lens.tolist() == [9, 2, 0, 0] and ext.tolist() == [3, 2, 0, 0]
    assert cu.tolist() == [0, 3, 5, 5, 5]  # padding requests own no token
    assert rows.tolist() == [2, 4, 0, 0]  # each request's last new token
    assert table.tolist() == [[3, 9, 4], [7, 0, 0]]
    with pytest.raises(ValueError):
        graphs.run([a] * 5)


def test_padded_prefill_equals_unpadded_forward() -> None:
    """A new turn over a cached prefix, a fresh prompt and a middle chunk, padded to the
    (64, 4) bucket: the same logits rows as an unpadded forward, the same KV writes, a carried
    token gathered on the device, and the padding tokens write only the dummy page."""
    config, model = _tiny_model()
    page, num_pages, max_len = 4, 64, 128
    rng = random.Random(5)
    free = rng.sample(range(num_pages - 1), num_pages - 1)
    shapes = [(37, 9), (0, 21), (4, 6)]  # (cached, new) per request
    steps = []
    for i, (cached, new) in enumerate(shapes):
        pages = [free.pop() for _ in range(-(-(cached + new) // page))]
        tokens = [rng.randrange(config.vocab_size) for _ in range(new)]
        steps.append(SeqStep(tokens, cached, pages, logits_from=None if i == 2 else -1))
    previous = torch.tensor([111, 222, 333])
    carried_ids = [steps[0].token_ids[:-1] + [333]] + [s.token_ids for s in steps[1:]]
    unpadded = [SeqStep(t, s.start, s.pages, logits_from=-1) for t, s in zip(carried_ids, steps)]

    kv_ref = _random_kv(config, num_pages, page)
    kv_pad = _clone(kv_ref)
    with torch.inference_mode():
        expected = model(build_forward_batch(unpadded, page, "cpu"), kv_ref)
        graphs = _prefill_graphs(model, kv_pad, max_len)
        carry = (torch.tensor([shapes[0][1] - 1]), previous.index_select(0, torch.tensor([2])))
        got = graphs.run(steps, carry)
    assert graphs.bucket(steps) == (64, 4) and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    written = sorted(p[pos // page] * page + pos % page for s in steps for p in [s.pages]
                     for pos in range(s.start, s.seq_len))
    untouched = torch.ones(num_pages * page, dtype=torch.bool)
    untouched[written] = False
    untouched[(num_pages - 1) * page :] = False
    for a, b in zip(kv_pad.k + kv_pad.v, kv_ref.k + kv_ref.v):
        a, b = a.flatten(0, 1), b.flatten(0, 1)  # [slots, Hkv, D]
        assert torch.equal(a[untouched], b[untouched])
        torch.testing.assert_close(a[written], b[written], rtol=1e-4, atol=1e-4)
        assert not torch.equal(a[(num_pages - 1) * page], b[(num_pages - 1) * page])


# ------------------------------------------------------------------ the engine: overlap, graph inputs


def _requests() -> list[tuple[str, SamplingParams]]:
    greedy = dict(temperature=0, max_tokens=20)
    return [
        ("The capital of France is", SamplingParams(**greedy)),
        ("Once upon a time, in a land far away,", SamplingParams(**greedy, stop=[" the", "."])),
        ("def fibonacci(n):", SamplingParams(temperature=0, max_tokens=1)),
        ("1, 2, 3, 4,", SamplingParams(temperature=0.9, seed=7, n=2, max_tokens=12, logprobs=2)),
        ("Shared system prompt. " * 30 + "Question one?", SamplingParams(**greedy)),
        ("Shared system prompt. " * 30 + "Question two!", SamplingParams(**greedy, repetition_penalty=1.3)),
        ("Shared system prompt. " * 30 + "Question three.", SamplingParams(temperature=0, max_tokens=9,
                                                                           logprobs=1, prompt_logprobs=1)),
    ]


def _run(engine: Engine, pool_at_rest) -> list:  # noqa: ANN001 - the conftest check
    prompts, params = zip(*_requests())
    results = engine.generate(list(prompts), list(params))
    pool_at_rest(engine)
    out = []
    for r in results:
        for o in r.outputs:
            lps = [(lp.token_id, round(lp.logprob, 3)) for lp in o.logprobs] if o.logprobs else None
            out.append((o.token_ids, o.text, o.finish_reason, lps))
        if r.prompt_logprobs:
            out.append([(lp.token_id, round(lp.logprob, 3)) for lp in r.prompt_logprobs])
    return out


@pytest.fixture(scope="module")
def sync_outputs(pool_at_rest) -> list:  # noqa: ANN001
    # A small pool (12 pages of 16 tokens) so that requests get preempted and recomputed.
    with Engine(model="default", page_size=16, num_pages=12, max_batch_tokens=256, max_model_len=320,
                overlap=False) as engine:
        return _run(engine, pool_at_rest)


def test_overlapped_loop_matches_sync_loop(sync_outputs: list, pool_at_rest) -> None:  # noqa: ANN001
    with Engine(model="default", page_size=16, num_pages=12, max_batch_tokens=256, max_model_len=320,
                overlap=True) as engine:
        got = _run(engine, pool_at_rest)
        timing = engine._loop.timing
        assert timing.synced_steps > 0  # the penalized request made some steps fold first
        assert engine.stats().preemptions > 0
    assert got == sync_outputs


@pytest.mark.parametrize("max_tokens", [1, 3])
def test_overlapped_loop_launches_no_step_past_max_tokens(max_tokens: int, pool_at_rest) -> None:  # noqa: ANN001
    """A lone request's step that reaches max_tokens is not followed by a step of its own."""
    with Engine(model="default", page_size=16, num_pages=12, max_batch_tokens=256, max_model_len=320,
                overlap=True) as engine:
        out = engine.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=max_tokens))
        engine.wait_idle()
        assert len(out.outputs[0].token_ids) == max_tokens
        assert engine._loop.timing.decode_steps == max_tokens - 1  # one decode step per token after the first
        pool_at_rest(engine)


def test_graph_input_path_with_overlap_matches_sync_loop(sync_outputs: list, pool_at_rest, eager_graphs) -> None:  # noqa: ANN001
    """Decode batches and small prefill steps go through the padded static buffers of their
    graphs (eager on the CPU), with carried tokens and cascade groups, and still give the
    synchronous loop's outputs."""
    with Engine(model="default", page_size=16, num_pages=12, max_batch_tokens=256, max_model_len=320,
                overlap=True) as engine:
        runner = eager_graphs(engine, max_bs=8)
        got = _run(engine, pool_at_rest)
        assert runner.graphs is not None and runner.prefill_graphs is not None
        assert runner.graphs.replays > 0 and runner.prefill_graphs.replays > 0
        assert runner.graphs.replays + runner.prefill_graphs.replays == runner.graph_steps
    assert got == sync_outputs


def test_split_mixed_steps_match_sync_loop(sync_outputs: list, pool_at_rest, eager_graphs,  # noqa: ANN001
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Mixed steps whose decode rows replay a graph (the static buffers, eager on the CPU) while
    the prefill rows run as one eager forward give the synchronous loop's outputs."""
    from radixserve.runtime import model_runner

    monkeypatch.setattr(model_runner, "MIN_SPLIT_DECODE_ROWS", 2)
    with Engine(model="default", page_size=16, num_pages=12, max_batch_tokens=256, max_model_len=320,
                overlap=True) as engine:
        runner = eager_graphs(engine, max_bs=8)
        got = _run(engine, pool_at_rest)
        assert runner.split_steps > 0
    assert got == sync_outputs


def test_fill_rows_matches_python() -> None:
    from radixserve.runtime.cuda_graphs import fill_rows

    rows = [[3, 4, 5], [], [7], [1, 2, 3, 4]]
    lengths = np.array([2, 0, 1, 4])
    assert fill_rows(rows, lengths, 4).tolist() == [[3, 4, 0, 0], [0, 0, 0, 0], [7, 0, 0, 0], [1, 2, 3, 4]]
