"""The same program in-process (`Runtime`) and through a live server (`Endpoint` against a
real uvicorn on loopback serving the session engine) gives the same greedy results."""

from __future__ import annotations

import pytest

from radixserve.lang import BackendError, Endpoint, assistant, function, gen, select, system, user

GREEDY = {"temperature": 0}
SCHEMA = {
    "type": "object",
    "properties": {"tool": {"type": "string", "enum": ["hammer", "saw", "drill"]}, "count": {"type": "integer"}},
    "required": ["tool", "count"],
    "additionalProperties": False,
}


@function
def workshop(s, item):
    s += system("You are the inventory assistant of the Birchwood carpentry workshop.")
    s += user(f"Describe the {item} in a few words.")
    s += assistant(gen("desc", max_tokens=8))
    s += user("Is it a power tool? Answer yes or no.")
    s += assistant(select("power", choices=["yes", "no"]))
    s += user("Give the inventory record as JSON.")
    s += assistant(gen("record", json_schema=SCHEMA, max_tokens=20))
    forks = s.fork(2)
    for f, q in zip(forks, ["Who uses it?", "Where is it stored?"]):
        f += user(q) + assistant(gen("ans", max_tokens=5))
    return forks["ans"]


@pytest.fixture(scope="module")
def endpoint(server_url):
    ep = Endpoint(server_url)
    yield ep
    ep.close()


def test_same_program_same_greedy_output_in_process_and_over_http(runtime, endpoint) -> None:
    local = workshop.run(item="drill", backend=runtime, sampling=GREEDY)
    remote = workshop.run(item="drill", backend=endpoint, sampling=GREEDY)
    assert remote.variables() == local.variables()
    assert remote.return_value == local.return_value
    assert remote.text() == local.text()
    assert remote.token_ids() == local.token_ids()
    assert remote.meta("power").scores == pytest.approx(local.meta("power").scores, abs=1e-4)
    # The server saw exactly the in-process token ids, so its cache served the whole run.
    assert remote.meta("desc").cached_tokens == remote.meta("desc").prompt_tokens - 1


def test_endpoint_streams_and_reports_model_info(runtime, endpoint) -> None:
    info = endpoint.model_info()
    assert info.chat_template == runtime.model_info().chat_template
    assert info.eos_token_ids == runtime.model_info().eos_token_ids
    assert endpoint.tokenize("Hello <|im_start|>") == runtime.tokenize("Hello <|im_start|>")

    @function
    def story(s):
        s += "A limerick about a carpenter from Leeds:\n" + gen("poem", max_tokens=8, ignore_eos=True)

    st = story.run(backend=endpoint, sampling=GREEDY, stream=True)
    pieces = list(st.text_iter("poem"))
    assert len(pieces) > 1 and "".join(pieces) == st["poem"]
    assert st["poem"] == story.run(backend=runtime, sampling=GREEDY)["poem"]


def test_endpoint_errors_are_actionable(endpoint) -> None:
    @function
    def too_long(s):
        s += "word " * 10 + gen("x", max_tokens=10**6)

    with pytest.raises(BackendError) as info:
        too_long.run(backend=endpoint)
    assert info.value.status_code == 400 and "/generate" in str(info.value)
