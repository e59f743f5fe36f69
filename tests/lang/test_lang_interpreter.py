"""Interpreter semantics on a deterministic fake backend: text and token bookkeeping, errors a
program author sees, roles, fork, run_batch, streaming and async. No model is loaded."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest
from lang_fake_backend import EOS, SMOL_TEMPLATE, FakeBackend

from radixserve.lang import (
    BackendUnreachable,
    EmptyChoices,
    Endpoint,
    GrammarSyntaxError,
    VariableNotFound,
    assistant,
    function,
    gen,
    select,
    system,
    user,
)
from radixserve.lang.chat import ChatFormat, render_chat

GREEDY = {"temperature": 0}


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend()


def test_text_then_gen_commits_pending_text_once(fake: FakeBackend) -> None:
    @function
    def prog(s, topic):
        s += "Topic: "
        s += topic
        s += "\n" + gen("body", max_tokens=6)

    st = prog.run(topic="cats", backend=fake, sampling=GREEDY)
    prompt, params = fake.requests[0]
    assert prompt == fake._tokenize("Topic: cats\n")  # appended pieces tokenized together
    assert params.max_tokens == 6 and params.temperature == 0
    assert st.text() == "Topic: cats\n" + st["body"]
    assert st.meta("body").prompt_token_ids == prompt
    # The state's ids are the prompt plus the generated ids (no re-tokenization), minus a
    # final EOS.
    gen_ids = [t for t in st.meta("body").token_ids if t != EOS]
    assert st.token_ids() == prompt + gen_ids
    assert fake.detok(st.token_ids()) == st.text()


def test_missing_variable_names_it_and_lists_existing(fake: FakeBackend) -> None:
    @function
    def prog(s):
        s += "Q: hi\nA:" + gen("answer", max_tokens=3)
        s += select("mood", choices=[" good", " bad"])
        return s["anwser"]

    with pytest.raises(VariableNotFound) as info:
        prog.run(backend=fake)
    msg = str(info.value)
    assert "'anwser'" in msg and "'answer'" in msg and "'mood'" in msg
    assert isinstance(info.value, KeyError)


def test_missing_variable_with_nothing_generated(fake: FakeBackend) -> None:
    st = function(lambda s: None).run(backend=fake)
    with pytest.raises(VariableNotFound, match="none yet"):
        st["x"]


def test_empty_choices_rejected_at_construction() -> None:
    with pytest.raises(EmptyChoices, match="empty"):
        select("x", choices=[])
    with pytest.raises(EmptyChoices):
        gen("x", choices=[])
    with pytest.raises(EmptyChoices, match="empty string"):
        select("x", choices=["a", ""])
    with pytest.raises(TypeError):
        select("x", choices="abc")


@pytest.mark.parametrize(
    "grammar, line, column",
    [
        ('start: "a" b\n', 1, 12),  # undefined rule, located at its use
        ('start: item+\nitem: "x" | \nother: (', 3, 9),
        ('start: a\na: "x" "y\n', 2, 8),
        ('start: a\na: "x"\na: "y"\n', 3, 1),  # defined twice: the second definition
        ('a: "x"\n', 1, 1),  # no start rule
    ],
)
def test_malformed_grammar_reports_line_and_column(grammar: str, line: int, column: int) -> None:
    with pytest.raises(GrammarSyntaxError) as info:
        gen("g", grammar=grammar)
    assert (info.value.line, info.value.column) == (line, column)
    assert f"line {line}, column {column}" in str(info.value)


def test_valid_grammar_parses_and_becomes_a_constraint() -> None:
    g = gen("g", grammar='start: "yes" | "no"\n')
    assert g.constraint.kind == "grammar"
    assert g.grammar_parser.parse("yes")


def test_constraints_are_exclusive_and_params_validated() -> None:
    with pytest.raises(ValueError, match="at most one constraint"):
        gen("x", regex="a+", choices=["a"])
    with pytest.raises(ValueError, match="temperature"):
        gen("x", temperature=-1)
    spec = gen("x", json_schema={"type": "object"}).constraint
    assert spec.kind == "json_schema" and spec.value == '{"type": "object"}'


def test_unreachable_endpoint_names_url() -> None:
    with pytest.raises(BackendUnreachable, match=r"http://127\.0\.0\.1:9/"[:-1]):
        Endpoint("http://127.0.0.1:9")


def test_no_backend_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="backend="):
        function(lambda s: None).run()


# ------------------------------------------------------------------ chat roles

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.mark.parametrize("template, bos", [(SMOL_TEMPLATE, None), (LLAMA3_TEMPLATE, "<|begin_of_text|>")])
@pytest.mark.parametrize("with_system", [True, False])
def test_role_pieces_reproduce_the_template(template: str, bos: str | None, with_system: bool) -> None:
    fmt = ChatFormat.from_template(template, bos_token=bos, eos_token="<|im_end|>")
    msgs = [("user", "Hi there"), ("assistant", "Hello!"), ("user", "2+2?"), ("assistant", "4")]
    if with_system:
        msgs.insert(0, ("system", "Be brief."))
    pieces = ""
    for i, (role, content) in enumerate(msgs):
        pieces += fmt.role_prefix(role, is_first=i == 0) + content + fmt.role_suffix(role)
    as_dicts = [{"role": r, "content": c} for r, c in msgs]
    expected = render_chat(template, as_dicts, add_generation_prompt=False, bos_token=bos, eos_token=None)
    assert pieces == expected
    with_prompt = render_chat(template, as_dicts, add_generation_prompt=True, bos_token=bos, eos_token=None)
    assert pieces + fmt.role_prefix("assistant", is_first=False) == with_prompt


def test_roles_in_a_program_match_the_chat_template(fake: FakeBackend) -> None:
    @function
    def chat(s):
        s += system("Be brief.")
        s += user("Name a color.")
        s += assistant(gen("c1", max_tokens=5))
        with s.user():
            s += "Another one."
        s += assistant(gen("c2", max_tokens=5))

    st = chat.run(backend=fake, sampling=GREEDY)
    msgs = st.messages()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == st["c1"] and msgs[4]["content"] == st["c2"]
    assert st.text() == render_chat(SMOL_TEMPLATE, msgs, add_generation_prompt=False, bos_token=None, eos_token=None)
    # The second request's prompt is the template's rendering with add_generation_prompt.
    prompt2 = fake.requests[1][0]
    expected = render_chat(SMOL_TEMPLATE, msgs[:4], add_generation_prompt=True, bos_token=None, eos_token=None)
    assert fake.detok(prompt2) == expected
    # EOS ids are not kept in the program's tokens (the role suffix closes the turn).
    assert fake.detok(st.token_ids()) == st.text()


def test_nested_role_blocks_rejected() -> None:
    with pytest.raises(ValueError, match="cannot contain another role"):
        user("x", assistant("y"))


# ------------------------------------------------------------------ select

def test_select_scores_in_one_batch_and_picks_best_mean(fake: FakeBackend) -> None:
    choices = [" red", " green", " blue sky"]

    @function
    def prog(s):
        s += "My favourite color is"
        s += select("color", choices=choices)

    st = prog.run(backend=fake)
    assert fake.batches == [3]  # one batched call with every choice
    prefix = fake._tokenize("My favourite color is")
    means = {}
    for c in choices:
        ids = fake._tokenize(c)
        lps = [fake.logprob(prefix + ids[:i], ids[i]) for i in range(len(ids))]
        means[c] = sum(lps) / len(lps)
    assert st["color"] == max(choices, key=lambda c: means[c])
    for c in choices:
        assert math.isclose(st.meta("color").scores[c], means[c])
    for prompt, params in fake.requests:
        assert prompt[: len(prefix)] == prefix
        assert params.max_tokens == 0 and params.prompt_logprobs == 0
        assert params.prompt_logprobs_start == len(prefix)
    assert st.text() == "My favourite color is" + st["color"]


# ------------------------------------------------------------------ fork

def test_fork_branches_run_concurrently_and_share_the_prefix() -> None:
    fake = FakeBackend(latency_s=0.2)

    @function
    def tot(s):
        s += "Problem: count the legs of two cats.\n"
        forks = s.fork(3)
        for i, f in enumerate(forks):
            f += f"Idea {i}:" + gen("idea", max_tokens=4)
        forks.join()
        s += "Ideas: " + " | ".join(forks["idea"])
        return forks

    st = tot.run(backend=fake, sampling=GREEDY)
    forks = st.return_value
    prefix = fake._tokenize("Problem: count the legs of two cats.\n")
    assert fake.requests[0][0] == prefix and fake.requests[0][1].max_tokens == 0  # the prefill
    assert fake.max_in_flight == 3
    for i, f in enumerate(forks):
        meta = f.meta("idea")
        assert meta.prompt_token_ids[: len(prefix)] == prefix
        assert meta.cached_tokens == len(prefix)
    assert st.text().startswith("Problem:") and "Ideas: " in st.text()


def test_error_in_a_branch_surfaces_on_join(fake: FakeBackend) -> None:
    @function
    def prog(s):
        forks = s.fork(2)
        forks[1] += gen("x", max_tokens=2)
        forks[0] += gen("y", max_tokens=2)
        forks.join()
        return forks[0]["nope"]

    with pytest.raises(VariableNotFound, match="'y'"):
        prog.run(backend=fake)


# ------------------------------------------------------------------ run_batch / streaming / async

def test_run_batch_gates_on_the_first_and_reports_shared_prefix() -> None:
    fake = FakeBackend(latency_s=0.05)
    doc = "Shared document text that every program reads first.\n"

    @function
    def qa(s, q):
        s += doc + "Q: " + q + "\nA:" + gen("a", max_tokens=3)

    questions = ["Who?", "Apples?", "Cats?", "Dogs?", "Eggs?"]  # distinct first tokens
    states = qa.run_batch([{"q": q} for q in questions], backend=fake, max_concurrency=4, progress_bar=False)
    assert [st.meta("a").prompt_token_ids for st in states] == [
        fake._tokenize(doc + "Q: " + q + "\nA:") for q in questions
    ]
    assert fake.requests[0][0] == states[0].meta("a").prompt_token_ids  # the first ran alone
    assert states[0].meta("a").cached_tokens == 0
    shared = len(fake._tokenize(doc + "Q: "))
    for st in states[1:]:
        assert st.meta("a").cached_tokens == shared


def test_run_batch_errors(fake: FakeBackend) -> None:
    @function
    def prog(s, x):
        s += "x" + gen("a", max_tokens=1)
        if x == 2:
            s["missing"]

    with pytest.raises(VariableNotFound):
        prog.run_batch([{"x": i} for i in range(4)], backend=fake, progress_bar=False)
    states = prog.run_batch([{"x": i} for i in range(4)], backend=fake, progress_bar=False, return_exceptions=True)
    assert [st.error is not None for st in states] == [False, False, True, False]
    assert prog.run_batch([], backend=fake) == []


def test_streaming_text_iter() -> None:
    fake = FakeBackend(token_latency_s=0.01)
    release = threading.Event()

    @function
    def prog(s):
        s += "Once upon a time"
        release.wait(5)
        s += gen("story", max_tokens=12, ignore_eos=True)
        s += "The end."

    st = prog.run(backend=fake, stream=True, sampling=GREEDY)
    it = st.text_iter("story")
    release.set()
    pieces = list(it)
    assert len(pieces) > 1
    assert "".join(pieces) == st["story"]
    assert "".join(st.text_iter()) == st.text()


def test_streaming_missing_variable_raises(fake: FakeBackend) -> None:
    @function
    def prog(s):
        s += "x" + gen("a", max_tokens=2)

    st = prog.run(backend=fake, stream=True)
    with pytest.raises(VariableNotFound, match="'b'"):
        list(st.text_iter("b"))


def test_run_async_runs_programs_concurrently() -> None:
    fake = FakeBackend(latency_s=0.2)

    @function
    def prog(s, i):
        s += f"Item {i}:" + gen("a", max_tokens=2)

    async def main():
        return await asyncio.gather(*(prog.run_async(i=i, backend=fake) for i in range(4)))

    states = asyncio.run(main())
    assert [len(st.meta("a").prompt_token_ids) for st in states] == [len(fake._tokenize("Item 0:"))] * 4
    assert fake.max_in_flight == 4


def test_stop_string_output_is_retokenized(fake: FakeBackend) -> None:
    @function
    def prog(s):
        s += "abc" + gen("a", max_tokens=30, stop=[" "], ignore_eos=True)

    st = prog.run(backend=fake, sampling=GREEDY)
    assert " " not in st["a"]
    assert fake.detok(st.token_ids()) == st.text()


def test_concatenation_and_gen_without_name(fake: FakeBackend) -> None:
    @function
    def prog(s):
        s += "a" + gen(max_tokens=2) + "b" + gen("x", max_tokens=2)

    st = prog.run(backend=fake)
    assert list(st.variables()) == ["x"]
    assert len(fake.requests) == 2


def test_sampling_defaults_are_validated_before_running(fake: FakeBackend) -> None:
    prog = function(lambda s: None)
    with pytest.raises(TypeError, match="max_new_tokens"):
        prog.run(backend=fake, sampling={"max_new_tokens": 3})
    with pytest.raises(ValueError, match="top_p"):
        prog.run(backend=fake, sampling={"top_p": 0})
    assert fake.requests == []


def test_async_streaming_and_batch(fake: FakeBackend) -> None:
    @function
    def prog(s, i):
        s += f"n{i}:" + gen("a", max_tokens=5, ignore_eos=True)

    async def main():
        st = prog.run(i=1, backend=fake, stream=True)
        pieces = [p async for p in st.text_iter_async("a")]
        states = await prog.run_batch_async([{"i": 2}, {"i": 3}], backend=fake, progress_bar=False)
        return st, pieces, states

    st, pieces, states = asyncio.run(main())
    assert "".join(pieces) == st["a"] and len(st["a"]) == 5
    assert [len(s["a"]) for s in states] == [5, 5]


def test_fork_after_the_run_runs_inline(fake: FakeBackend) -> None:
    st = function(lambda s: s.__iadd__("Start.")).run(backend=fake)
    forks = st.fork(2)
    forks += gen("x", max_tokens=2)
    assert len(forks["x"]) == 2
    assert all(b._queue is None for b in forks)
