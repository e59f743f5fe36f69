"""Tests of the batched sampler: filters, seeding, penalties, grammar masks and logprobs.

Everything runs on CPU at small vocabularies. Statistical tests use a fixed sampler seed and
loose bounds, so they are deterministic and far from flaky thresholds.
"""

from __future__ import annotations

import math

import pytest
import torch

from radixserve.runtime.outputs import TokenLogprob
from radixserve.runtime.sampler import (
    Sampler,
    SamplingBatch,
    make_generator,
    prompt_logprobs,
)
from radixserve.runtime.sampling_params import SamplingParams


def _logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def _sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    *,
    sampler: Sampler | None = None,
    mask: torch.Tensor | None = None,
    **build_kwargs: object,
) -> torch.Tensor:
    batch = SamplingBatch.build(params, **build_kwargs)  # type: ignore[arg-type]
    return (sampler or Sampler(seed=0)).sample(logits, batch, mask).token_ids


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    keep = expected > 0
    return float(((counts.double()[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# -- greedy and filters that degenerate to greedy ---------------------------------------------


def test_greedy_rows_are_argmax() -> None:
    logits = _logits(16, 300)
    tokens = _sample(logits, [SamplingParams(temperature=0.0)] * 16)
    assert torch.equal(tokens, logits.argmax(-1))


def test_greedy_rows_in_mixed_batch_are_argmax() -> None:
    logits = _logits(10, 300)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.3, top_p=0.9) for i in range(10)]
    tokens = _sample(logits, params)
    assert torch.equal(tokens[1::2], logits[1::2].argmax(-1))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.5, top_k=1),
        SamplingParams(temperature=1.5, top_p=1e-6),
        SamplingParams(temperature=1.5, top_k=1, top_p=0.5),
        SamplingParams(temperature=2.0, min_p=1.0),
    ],
    ids=["top_k=1", "top_p=1e-6", "top_k=1+top_p", "min_p=1"],
)
def test_filters_that_keep_one_token_equal_greedy(params: SamplingParams) -> None:
    logits = _logits(64, 500, seed=1)
    # A plain row in the batch makes the filtered rows share a batch with unfiltered ones.
    batch_params = [params] * 64
    batch_params[7] = SamplingParams(temperature=1.0)
    tokens = _sample(logits, batch_params)
    rows = [i for i in range(64) if i != 7]
    assert torch.equal(tokens[rows], logits[rows].argmax(-1))


def test_top_k_larger_than_vocab_and_disabled_rows() -> None:
    logits = _logits(4, 20)
    params = [SamplingParams(top_k=1000), SamplingParams(top_k=-1), SamplingParams(top_k=1),
              SamplingParams(top_k=0)]
    tokens = _sample(logits, params)
    assert tokens[2] == logits[2].argmax()


def test_engine_style_build_positional_histories_device_and_vocab() -> None:
    vocab = 30
    logits = _logits(2, vocab)
    params = [SamplingParams(top_k=vocab, seed=2),
              SamplingParams(temperature=0.0, repetition_penalty=5.0)]
    generators = [make_generator(2, "cpu"), None]
    history = [[1, 2], [int(logits[1].argmax())]]
    batch = SamplingBatch.build(params, generators, history, history, device="cpu",
                                vocab_size=vocab)
    assert not batch.use_top_k  # k >= V keeps every token
    assert batch.penalties is not None and batch.device == torch.device("cpu")
    out = Sampler("cpu", seed=0).sample(logits, batch)
    expected = _reference_penalties(logits, params, history, history)
    assert int(out.token_ids[1]) == int(expected[1].argmax()) != history[1][0]


def test_empty_batch() -> None:
    out = Sampler().sample(torch.zeros(0, 10), SamplingBatch.build([]))
    assert out.token_ids.shape == (0,)
    assert out.to_host().token_ids == []


# -- seeding --------------------------------------------------------------------------------


def _seeded_run(position: int, batch_size: int, seed: int, steps: int = 8) -> list[int]:
    """Tokens of one seeded row over several steps, placed at `position` among other rows."""
    target = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
    generator = make_generator(seed, "cpu")
    sampler = Sampler("cpu")  # unseeded shared generator: other rows are random each run
    tokens = []
    for step in range(steps):
        logits = _logits(batch_size, 200, seed=100 + step + batch_size)
        logits[position] = _logits(1, 200, seed=step)[0]
        params = [SamplingParams(temperature=0.8, seed=9 if i % 2 else None, top_k=5)
                  for i in range(batch_size)]
        params[position] = target
        generators = [make_generator(9, "cpu") if p.seed is not None else None for p in params]
        generators[position] = generator
        batch = SamplingBatch.build(params, generators=generators)
        tokens.append(int(sampler.sample(logits, batch).token_ids[position]))
    return tokens


def test_seeded_rows_are_independent_of_batch_composition() -> None:
    alone = _seeded_run(position=0, batch_size=1, seed=1234)
    assert _seeded_run(position=3, batch_size=6, seed=1234) == alone
    assert _seeded_run(position=8, batch_size=9, seed=1234) == alone
    assert _seeded_run(position=0, batch_size=1, seed=4321) != alone


def test_seeded_row_requires_a_generator() -> None:
    with pytest.raises(ValueError, match="generator"):
        SamplingBatch.build([SamplingParams(seed=3)])
    # Greedy rows draw nothing, so their seed needs no generator.
    SamplingBatch.build([SamplingParams(seed=3, temperature=0.0)])


def test_unseeded_sampler_seed_is_reproducible() -> None:
    logits = _logits(32, 100)
    params = [SamplingParams(temperature=1.0)] * 32
    assert torch.equal(_sample(logits, params, sampler=Sampler(seed=5)),
                       _sample(logits, params, sampler=Sampler(seed=5)))


# -- distributions ----------------------------------------------------------------------------


def _draw_counts(row_logits: torch.Tensor, params: SamplingParams, draws: int) -> torch.Tensor:
    logits = row_logits.expand(draws, -1).contiguous()
    tokens = _sample(logits, [params] * draws, sampler=Sampler(seed=11))
    return torch.bincount(tokens, minlength=row_logits.numel())


def test_temperature_matches_softmax_statistics() -> None:
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.5, 2.0])
    for temperature in (0.5, 1.0, 2.0):
        counts = _draw_counts(row, SamplingParams(temperature=temperature), 20_000)
        probs = torch.softmax(row.double() / temperature, -1)
        # 5 degrees of freedom: P(chi2 > 40) < 1e-6.
        assert _chi_square(counts, probs) < 40.0, temperature


def test_top_k_top_p_renormalize_the_kept_tokens() -> None:
    row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])
    probs = torch.softmax(row.double(), -1)
    # top_k=4 keeps 4 tokens; top_p then keeps the smallest prefix with mass >= 0.7 of those.
    kept = probs[:4] / probs[:4].sum()
    n_keep = int((torch.cumsum(kept, 0) < 0.7).sum()) + 1
    expected = torch.zeros_like(probs)
    expected[:n_keep] = kept[:n_keep] / kept[:n_keep].sum()
    counts = _draw_counts(row, SamplingParams(top_k=4, top_p=0.7), 20_000)
    assert counts[n_keep:].sum() == 0
    assert _chi_square(counts, expected) < 40.0


def test_min_p_keeps_tokens_relative_to_max_prob() -> None:
    row = torch.log(torch.tensor([0.4, 0.3, 0.19, 0.1, 0.01]))
    counts = _draw_counts(row, SamplingParams(min_p=0.4), 20_000)
    # Threshold 0.4 * 0.4 = 0.16 keeps tokens 0, 1, 2, renormalized.
    assert counts[3:].sum() == 0
    expected = torch.tensor([0.4, 0.3, 0.19, 0.0, 0.0], dtype=torch.float64) / 0.89
    assert _chi_square(counts, expected) < 40.0


# -- penalties against float64 references -----------------------------------------------------


def _reference_penalties(
    logits: torch.Tensor,
    params: list[SamplingParams],
    prompts: list[list[int]],
    outputs: list[list[int]],
) -> torch.Tensor:
    out = logits.double().clone()
    for i, p in enumerate(params):
        for token in set(prompts[i]) | set(outputs[i]):
            if p.repetition_penalty != 1.0:
                x = out[i, token]
                out[i, token] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for token in set(outputs[i]):
            count = outputs[i].count(token)
            out[i, token] -= p.frequency_penalty * count + p.presence_penalty
    return out


@pytest.mark.parametrize(
    "penalty",
    [
        {"repetition_penalty": 1.3},
        {"repetition_penalty": 0.7},
        {"frequency_penalty": 0.8},
        {"frequency_penalty": -1.1},
        {"presence_penalty": 1.5},
        {"repetition_penalty": 1.2, "frequency_penalty": 0.5, "presence_penalty": -0.4},
    ],
    ids=["rep>1", "rep<1", "freq", "freq<0", "presence", "all"],
)
def test_penalties_match_reference(penalty: dict[str, float]) -> None:
    vocab = SamplingParams.MAX_TOP_LOGPROBS
    gen = torch.Generator().manual_seed(3)
    logits = _logits(5, vocab, seed=2)
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (7, 0, 3, 12, 5)]
    outputs = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (9, 4, 0, 15, 6)]
    # Row 4 uses no penalty and must be untouched; greedy everywhere, so the logprobs (taken
    # after penalties, before temperature) expose the penalized logits exactly.
    params = [SamplingParams(temperature=0.0, logprobs=vocab, **penalty)] * 4
    params.append(SamplingParams(temperature=0.0, logprobs=vocab))
    expected = _reference_penalties(logits, params, prompts, outputs)

    batch = SamplingBatch.build(params, prompt_token_ids=prompts, output_token_ids=outputs)
    out = Sampler().sample(logits, batch)
    assert torch.equal(out.token_ids, expected.argmax(-1))
    assert out.top_ids is not None and out.top_logprobs is not None
    got = torch.empty(5, vocab, dtype=torch.float64)
    got.scatter_(1, out.top_ids, out.top_logprobs.double())
    torch.testing.assert_close(got, torch.log_softmax(expected, -1), atol=1e-5, rtol=0)


def test_penalties_need_histories() -> None:
    with pytest.raises(ValueError, match="output_token_ids"):
        SamplingBatch.build([SamplingParams(presence_penalty=1.0)])
    with pytest.raises(ValueError, match="prompt_token_ids"):
        SamplingBatch.build([SamplingParams(repetition_penalty=1.2)], output_token_ids=[[1]])
    assert SamplingBatch.build([SamplingParams()]).penalties is None


# -- grammar mask --------------------------------------------------------------------------


def test_allowed_mask_is_never_violated() -> None:
    rows, vocab = 48, 64
    gen = torch.Generator().manual_seed(4)
    flavours = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=5.0, top_k=10),
        SamplingParams(temperature=3.0, top_p=0.9),
        SamplingParams(temperature=2.0, min_p=0.05),
        SamplingParams(temperature=4.0, repetition_penalty=0.5, frequency_penalty=-2.0),
    ]
    params = [flavours[i % len(flavours)] for i in range(rows)]
    sampler = Sampler(seed=0)
    for step in range(20):
        mask = torch.rand(rows, vocab, generator=gen) < 0.1
        mask[torch.arange(rows), torch.randint(0, vocab, (rows,), generator=gen)] = True
        mask[::5] = True  # unconstrained rows
        logits = _logits(rows, vocab, seed=step, scale=5.0)
        # Make disallowed tokens the most attractive ones.
        logits = torch.where(mask, logits, logits + 20.0)
        history = [torch.randint(0, vocab, (6,), generator=gen).tolist() for _ in range(rows)]
        tokens = _sample(logits, params, sampler=sampler, mask=mask,
                         prompt_token_ids=history, output_token_ids=history)
        assert mask[torch.arange(rows), tokens].all()


def test_allowed_mask_shape_is_checked() -> None:
    batch = SamplingBatch.build([SamplingParams()])
    with pytest.raises(ValueError, match="allowed_mask"):
        Sampler().sample(torch.zeros(1, 8), batch, torch.ones(1, 7, dtype=torch.bool))


# -- logprobs -------------------------------------------------------------------------------


def test_logprobs_match_log_softmax_in_float64() -> None:
    rows, vocab = 6, 50
    logits = _logits(rows, vocab, seed=8)
    mask = torch.ones(rows, vocab, dtype=torch.bool)
    mask[2, 10:] = False  # row 2 is constrained to 10 tokens
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.7, logprobs=0),
        SamplingParams(temperature=1.0, top_k=4, logprobs=20),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=2.0, top_p=0.5, logprobs=5),
        SamplingParams(temperature=0.0, logprobs=20),
    ]
    batch = SamplingBatch.build(params)
    out = Sampler(seed=1).sample(logits, batch, mask)
    host = out.to_host()
    reference = torch.log_softmax(logits.double().masked_fill(~mask, -math.inf), -1)

    assert host.token_ids == out.token_ids.tolist()
    assert host.logprobs is not None and host.logprobs[3] is None
    for i, (p, entry) in enumerate(zip(params, host.logprobs)):
        if p.logprobs is None:
            continue
        assert isinstance(entry, TokenLogprob)
        assert entry.token_id == host.token_ids[i]
        assert entry.logprob == pytest.approx(float(reference[i, entry.token_id]), abs=1e-5)
        expected_top = reference[i].topk(p.logprobs)
        finite = [(int(t), float(v)) for v, t in zip(*expected_top) if v != -math.inf]
        assert [t for t, _ in entry.top] == [t for t, _ in finite]
        for (_, got), (_, want) in zip(entry.top, finite):
            assert got == pytest.approx(want, abs=1e-5)
    # Row 2 asked for 20 alternatives but only 10 tokens are allowed: -inf ones are dropped.
    assert len(host.logprobs[2].top) == 10  # type: ignore[union-attr]


def test_no_logprobs_when_none_requested() -> None:
    out = Sampler().sample(_logits(3, 10), SamplingBatch.build([SamplingParams()] * 3))
    assert out.logprobs is None and out.top_ids is None
    host = out.to_host()
    assert host.logprobs is None and len(host.token_ids) == 3


def test_prompt_logprobs_match_reference() -> None:
    # More rows than one chunk, to cover the chunked path.
    n, vocab = 700, 33
    logits = _logits(n, vocab, seed=9)
    targets = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(1))
    reference = torch.log_softmax(logits.double(), -1)
    result = prompt_logprobs(logits, targets, top=4)
    assert len(result) == n
    for i in (0, 1, 511, 512, 699):
        entry = result[i]
        assert entry.token_id == int(targets[i])
        assert entry.logprob == pytest.approx(float(reference[i, targets[i]]), abs=1e-5)
        values, ids = reference[i].topk(4)
        assert [t for t, _ in entry.top] == ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-5)
    assert prompt_logprobs(logits[:3], targets[:3], top=0)[0].top == ()
    assert prompt_logprobs(logits[:0], targets[:0], top=2) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_makes_no_device_sync_on_cuda() -> None:
    device = torch.device("cuda")
    rows, vocab = 8, 1000
    params = [
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=0.9, top_k=20, seed=1),
        SamplingParams(temperature=1.2, top_p=0.8, min_p=0.05),
        SamplingParams(temperature=1.0, repetition_penalty=1.2, frequency_penalty=0.3),
    ] * 2
    history = [[1, 2, 3]] * rows
    generators = [make_generator(1, device) if p.seed is not None else None for p in params]
    batch = SamplingBatch.build(params, prompt_token_ids=history, output_token_ids=history,
                                generators=generators)
    logits = torch.randn(rows, vocab, device=device)
    mask = torch.ones(rows, vocab, dtype=torch.bool, device=device)
    sampler = Sampler(seed=0)
    sampler.sample(logits, batch, mask)  # warm up: lazy CUDA init may synchronize
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler.sample(logits, batch, mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(out.to_host().token_ids) == rows
