"""Greedy output of the engine against transformers' `generate` on the same weights.

Both run float32 on the CPU, but with different matmul shapes (batched, paged, chunked), so
rounding differs at about 1e-6 relative. Where the two greedy paths pick different tokens, the
reference's own logits at that step must show a near-tie (top-2 gap under LOGIT_TIE_TOL); after
the first such divergence the sequences legitimately differ, so comparison stops there.
"""

from __future__ import annotations

import pytest
import torch

from radixserve.runtime import Engine, SamplingParams

MAX_NEW = 12
LOGIT_TIE_TOL = 1e-3

RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "import numpy as np\nx = np.",
    "The quick brown fox",
    "In 1969, the first human",
    "To make a cup of tea, first",
    "Photosynthesis is the process by which",
]
CHAT_QUESTIONS = [
    "What is the capital of Italy?",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Give me one tip for better sleep.",
    "What is 12 times 12?",
    "Translate 'good morning' into French.",
    "Name a famous physicist.",
    "What color is the sky on a clear day?",
    "Explain what a CPU does in one sentence.",
    "Suggest a name for a pet cat.",
]


@pytest.fixture(scope="module")
def prompts(engine_p1: Engine) -> list[list[int]]:
    tok = engine_p1.tokenizer
    chat = [
        list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False))
        for q in CHAT_QUESTIONS
    ]
    return [engine_p1.tokenize(p) for p in RAW_PROMPTS] + chat


@pytest.fixture(scope="module")
def reference(hf_model, prompts):
    """transformers greedy continuation and per-step logits for each prompt, run alone."""
    out = []
    for ids in prompts:
        with torch.inference_mode():
            gen = hf_model.generate(
                torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                output_logits=True, return_dict_in_generate=True, pad_token_id=2,
            )
        tokens = gen.sequences[0, len(ids):].tolist()
        out.append((tokens, [l[0].float() for l in gen.logits]))
    return out


def assert_same_greedy(ours: list[int], ref_tokens: list[int], ref_logits: list[torch.Tensor]) -> None:
    for step, (a, b) in enumerate(zip(ours, ref_tokens)):
        if a != b:
            logits = ref_logits[step]
            gap = (logits[b] - logits[a]).abs().item()
            assert gap < LOGIT_TIE_TOL * logits.abs().max().item(), (
                f"step {step}: engine chose {a}, transformers {b}, logit gap {gap:.4g} is no tie"
            )
            return
    assert len(ours) == len(ref_tokens) or ours[: len(ref_tokens)] == ref_tokens


@pytest.mark.parametrize("engine_name", ["engine_p1", "engine_p16"])
def test_batched_cold_then_cached(request, engine_name, prompts, reference, pool_at_rest) -> None:
    engine: Engine = request.getfixturevalue(engine_name)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0)
    for round_ in ("cold", "cached"):
        results = engine.generate(prompts, params)
        for res, (ref_tokens, ref_logits) in zip(results, reference):
            # SmolLM2 stops at EOS; transformers then pads, so compare up to our length.
            assert_same_greedy(res.token_ids, ref_tokens[: len(res.token_ids)], ref_logits)
        if round_ == "cached":
            assert all(r.cached_tokens >= r.prompt_tokens - engine.config.page_size for r in results)
    pool_at_rest(engine)


def test_alone_page16(engine_p16, prompts, reference, pool_at_rest) -> None:
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0)
    for ids, (ref_tokens, ref_logits) in list(zip(prompts, reference))[::4]:
        res = engine_p16.generate(ids, params)
        assert_same_greedy(res.token_ids, ref_tokens[: len(res.token_ids)], ref_logits)
    pool_at_rest(engine_p16)


def test_shared_prefix_batch_uses_cascade_and_matches(engine_p16, hf_model, pool_at_rest) -> None:
    """Prompts sharing a long prefix decode together through shared-prefix attention."""
    tok = engine_p16.tokenizer
    prefix = tok.encode(
        "You are a careful assistant. Answer in one short sentence. The following facts are "
        "known: the sun is a star, water is wet, cats are mammals, Paris is in France, and "
        "the Pacific is the largest ocean on Earth. Mount Everest is the highest mountain, the "
        "Nile and the Amazon are the longest rivers, and light travels faster than sound. "
        "Question:", add_special_tokens=False
    )
    questions = [" What is the sun?", " Where is Paris?", " Are cats mammals?", " Which ocean is largest?"]
    prompts = [prefix + tok.encode(q, add_special_tokens=False) for q in questions]
    assert len(prefix) >= 64
    before = engine_p16.stats().cascade_steps
    results = engine_p16.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0))
    assert engine_p16.stats().cascade_steps > before
    assert sum(r.cached_tokens for r in results) >= 3 * (len(prefix) // 16 * 16)
    for ids, res in zip(prompts, results):
        with torch.inference_mode():
            gen = hf_model.generate(
                torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                output_logits=True, return_dict_in_generate=True, pad_token_id=2,
            )
        ref = gen.sequences[0, len(ids):].tolist()
        assert_same_greedy(res.token_ids, ref[: len(res.token_ids)], [l[0].float() for l in gen.logits])
    pool_at_rest(engine_p16)
