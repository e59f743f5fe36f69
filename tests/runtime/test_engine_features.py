"""Engine behaviour on the default model: sampling options, stops, n > 1, logprobs,
streaming, abort, limits. Page accounting is checked at rest after each test."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from radixserve.runtime import Engine, PromptTooLong, SamplingParams
from radixserve.runtime.sampling_params import InvalidParams

PROMPT = "The history of the Roman Empire begins"


def test_max_tokens_and_length_finish(engine_p1: Engine, pool_at_rest) -> None:
    res = engine_p1.generate(PROMPT, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert len(res.token_ids) == 5 and res.finish_reason == "length"
    assert res.text == engine_p1.tokenizer.decode(res.token_ids, skip_special_tokens=True)
    pool_at_rest(engine_p1)


def test_stop_string_is_cut_and_never_leaks_in_stream(engine_p1: Engine, pool_at_rest) -> None:
    base = engine_p1.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    words = base.text.split()
    assert len(words) > 3
    stop = " " + words[2]
    res = engine_p1.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0, stop=[stop], ignore_eos=True))
    assert res.finish_reason == "stop" and res.outputs[0].stop_reason == stop
    assert res.text == base.text[: base.text.index(stop)]

    async def collect() -> list[str]:
        return [d.text async for d in engine_p1.stream(PROMPT, SamplingParams(max_tokens=24, temperature=0, stop=[stop], ignore_eos=True))]

    pieces = asyncio.run(collect())
    assert "".join(pieces) == res.text
    with_stop = engine_p1.generate(
        PROMPT, SamplingParams(max_tokens=24, temperature=0, stop=[stop], include_stop_str_in_output=True, ignore_eos=True)
    )
    assert with_stop.text == res.text + stop
    pool_at_rest(engine_p1)


def test_stop_token_ids(engine_p1: Engine) -> None:
    base = engine_p1.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    stop_id = base.token_ids[3]
    res = engine_p1.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_id], ignore_eos=True))
    assert res.token_ids == base.token_ids[: base.token_ids.index(stop_id) + 1]
    assert res.finish_reason == "stop" and res.outputs[0].stop_reason == stop_id


def test_seed_reproducible_and_n_siblings_share_prompt(engine_p1: Engine, pool_at_rest) -> None:
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234, n=3, ignore_eos=True)
    prompt = "A long and winding road through the mountains of " + "northern Italy " * 8
    a = engine_p1.generate(prompt, params)
    b = engine_p1.generate(prompt, params)
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1  # siblings sample independently
    # In a batch with other work, the seeded request is unchanged.
    mixed = engine_p1.generate([PROMPT, prompt], [SamplingParams(max_tokens=4, temperature=1.0), params])
    assert [o.token_ids for o in mixed[1].outputs] == [o.token_ids for o in a.outputs]
    pool_at_rest(engine_p1)


def test_n_siblings_compute_prompt_once(engine_p16: Engine) -> None:
    prompt = list(range(2000, 2000 + 100))
    before = engine_p16.stats()
    res = engine_p16.generate(prompt, SamplingParams(max_tokens=4, temperature=0.8, n=4, seed=3, ignore_eos=True))
    after = engine_p16.stats()
    assert len(res.outputs) == 4
    # the 3 later siblings hit the first one's pages (whole pages: 96 of 100 tokens)
    assert after.cached_tokens - before.cached_tokens == 3 * 96


def test_logprobs_match_transformers(engine_p1: Engine, hf_model) -> None:
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True)
    res = engine_p1.generate(PROMPT, params)
    ids = engine_p1.tokenize(PROMPT) + res.token_ids
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids])).logits[0].double()
    ref = torch.log_softmax(logits, dim=-1)
    n = len(engine_p1.tokenize(PROMPT))
    lps = res.outputs[0].logprobs
    assert len(lps) == 6
    for k, lp in enumerate(lps):
        row = ref[n - 1 + k]
        assert lp.token_id == res.token_ids[k]
        assert abs(lp.logprob - row[lp.token_id].item()) < 1e-3
        top_ids = [t for t, _ in lp.top]
        assert top_ids == row.topk(3).indices.tolist()


def test_prompt_logprobs_score_given_tokens(engine_p1: Engine, hf_model) -> None:
    prefix = engine_p1.tokenize("Question: what is two plus two? Answer:")
    answer = engine_p1.tokenize(" four")
    engine_p1.generate(prefix + [11], SamplingParams(max_tokens=1, temperature=0))  # cache the prefix
    params = SamplingParams(max_tokens=0, prompt_logprobs=0, prompt_logprobs_start=len(prefix))
    res = engine_p1.generate(prefix + answer, params)
    assert res.token_ids == [] and len(res.prompt_logprobs) == len(answer)
    with torch.inference_mode():
        logits = hf_model(torch.tensor([prefix + answer])).logits[0].double()
    ref = torch.log_softmax(logits, dim=-1)
    for k, lp in enumerate(res.prompt_logprobs):
        assert lp.token_id == answer[k]
        assert abs(lp.logprob - ref[len(prefix) - 1 + k, answer[k]].item()) < 1e-3


def test_abort_frees_pages(engine_p1: Engine, pool_at_rest) -> None:
    async def run() -> list:
        deltas = []
        async for d in engine_p1.stream(PROMPT, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)):
            deltas.append(d)
            if len(deltas) == 3:
                break  # leaving the iterator aborts the request
        return deltas

    assert len(asyncio.run(run())) == 3
    pool_at_rest(engine_p1)


def test_rejections_are_clear(engine_p1: Engine) -> None:
    with pytest.raises(PromptTooLong, match=str(engine_p1.max_model_len)):
        engine_p1.generate([5] * (engine_p1.max_model_len - 3), SamplingParams(max_tokens=10))
    with pytest.raises(InvalidParams, match="prompt"):
        engine_p1.generate("", SamplingParams())
    with pytest.raises(InvalidParams, match="token ids"):
        engine_p1.generate([10**9], SamplingParams())
    for bad in ([1, 2.5], [1, "2"], [2**70], [-1]):  # not integers, past int64, negative
        with pytest.raises(InvalidParams, match="token ids"):
            engine_p1.generate(bad, SamplingParams(max_tokens=1))
    with pytest.raises(InvalidParams, match="top_p"):
        SamplingParams(top_p=0)


def test_generate_queues_its_prompts_together(engine_p16: Engine, pool_at_rest) -> None:
    """All prompts of one generate call reach the first step together (the batching, and so
    the outputs, do not depend on thread timing); one bad prompt queues none of them."""
    prompts = [f"Prompt number {i} is here." for i in range(6)]
    before = engine_p16.stats().steps
    results = engine_p16.generate(prompts, SamplingParams(max_tokens=1, temperature=0))
    assert all(len(r.outputs[0].token_ids) == 1 for r in results)
    assert engine_p16.stats().steps - before == 1  # one prefill step sampled every first token
    before = engine_p16.stats().steps
    with pytest.raises(InvalidParams, match="prompt"):
        engine_p16.generate(prompts[:3] + [""], SamplingParams(max_tokens=4))
    engine_p16.wait_idle()
    assert engine_p16.stats().steps == before
    pool_at_rest(engine_p16)


def test_multi_turn_reuses_generated_tokens(engine_p1: Engine) -> None:
    tok = engine_p1.tokenizer
    history = [{"role": "user", "content": "Tell me a short fact about the moon."}]
    cached = []
    for turn in range(3):
        prompt = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
        res = engine_p1.generate(prompt, SamplingParams(max_tokens=10, temperature=0))
        cached.append(res.cached_tokens)
        history += [{"role": "assistant", "content": res.text}, {"role": "user", "content": "And another?"}]
    assert cached[1] > cached[0] and cached[2] > cached[1]


def test_engine_resolves_the_step_token_budget() -> None:
    with Engine(model="default", page_size=16, num_pages=64) as engine:
        assert engine.config.max_batch_tokens == 2048  # the CPU's default
        assert engine.scheduler.max_batch_tokens == 2048



def test_a_step_streams_every_final_delta_before_releasing(engine_p16: Engine, pool_at_rest) -> None:  # noqa: ANN001
    """Two continuations that end in the same step: when each final delta goes out, neither has
    been released yet (releasing caches the sequence in the tree, which takes a while; the last
    stream of a step where many requests end together must not wait for the others')."""
    loop = engine_p16._loop
    seen: list[int] = []
    done = threading.Event()

    def on_delta(delta) -> None:  # noqa: ANN001 - a StreamDelta
        if delta.finish_reason is not None:
            seen.append(len(loop._by_id.get(delta.request_id, [])))  # live siblings of this request
            if len(seen) == 2:
                done.set()

    engine_p16.submit("The capital of France is", SamplingParams(n=2, max_tokens=3, temperature=0, ignore_eos=True),
                      on_delta=on_delta)
    assert done.wait(60)
    assert seen == [2, 2]
    pool_at_rest(engine_p16)
