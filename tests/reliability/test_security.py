"""Security: API keys compared in constant time, loopback by default, tenant isolation of the
prefix cache through `cache_salt`, sandboxed chat templates, and configurable limits.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import pytest

from radixserve.server import middleware
from radixserve.server.app import create_app
from radixserve.server.cli import build_parser, engine_kwargs, main, run_server, settings_from_args
from radixserve.server.settings import ServerSettings

from .conftest import API_KEY, Served

# ---------------------------------------------------------------- API keys


def test_api_key_is_compared_in_constant_time(server, monkeypatch):
    """Every presented key goes through hmac.compare_digest against the configured one,
    whatever its length or prefix: no early-exit comparison on the way."""
    calls: list[tuple[bytes, bytes]] = []
    real = middleware.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(middleware.hmac, "compare_digest", spy)
    expected = API_KEY.encode()
    tries = {
        API_KEY: 200,
        API_KEY[:-1] + "X": 401,  # same length, last byte differs
        API_KEY[:5]: 401,  # a prefix
        API_KEY + "0": 401,  # longer
        "x" * 4096: 401,
    }
    for key, status in tries.items():
        r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == status, (key[:10], r.text)
        if status == 401:
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    r = httpx.get(server.url + "/v1/models", headers={"x-api-key": API_KEY}, timeout=30)
    assert r.status_code == 200
    assert [a for a, _ in calls] == [k.encode() for k in tries] + [expected]
    assert all(b == expected for _, b in calls)
    r = httpx.get(server.url + "/v1/models", timeout=30)
    assert r.status_code == 401 and "Missing API key" in r.json()["error"]["message"]
    # /health and /metrics stay public (probes); generation does not.
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, timeout=30).status_code == 401


# ---------------------------------------------------------------- binding


def test_server_binds_loopback_unless_told_otherwise(monkeypatch):
    assert ServerSettings().host == "127.0.0.1"
    args = build_parser().parse_args(["serve"])
    assert settings_from_args(args).host == "127.0.0.1"
    import uvicorn

    seen: list[str] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: seen.append(self.config.host))
    run_server(object(), ServerSettings())
    run_server(object(), ServerSettings(host="0.0.0.0"))
    assert seen == ["127.0.0.1", "0.0.0.0"]


# ---------------------------------------------------------------- tenant isolation


def _cached(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    body = response.json()
    if "usage" in body and "prompt_tokens_details" in body["usage"]:
        return body["usage"]["prompt_tokens_details"]["cached_tokens"]
    return body["usage"]["cached_tokens"]


def test_cache_salt_keeps_tenants_prefixes_apart(server):
    """Tenant A's cached prefix is invisible to tenant B and to unsalted requests, on every
    endpoint; A itself hits it."""
    tag = secrets.token_hex(8)
    prompt = f"Confidential {tag}: " + " ".join(f"clause {i} of the agreement." for i in range(40))
    a, b = f"tenant-a-{tag}", f"tenant-b-{tag}"
    with server.client() as client:
        def completion(salt: str | None) -> httpx.Response:
            body = {"prompt": prompt, "max_tokens": 1, "temperature": 0}
            if salt is not None:
                body["cache_salt"] = salt
            return client.post("/v1/completions", json=body)

        first = completion(a)
        prompt_tokens = first.json()["usage"]["prompt_tokens"]
        assert prompt_tokens > 100 and _cached(first) == 0
        assert _cached(completion(a)) >= prompt_tokens - 1  # the tenant's own prefix: a hit
        assert _cached(completion(b)) == 0  # another tenant: nothing
        assert _cached(completion(None)) == 0  # no salt: nothing either
        assert _cached(completion(b)) >= prompt_tokens - 1  # b now has its own copy

        messages = [{"role": "user", "content": prompt}]
        chat_a = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1, "cache_salt": a + "-chat"})
        assert _cached(chat_a) == 0
        chat_c = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1, "cache_salt": "c-" + tag})
        assert _cached(chat_c) == 0
        ids = server.engine.tokenize(prompt + " native")
        gen_a = client.post("/generate", json={"input_ids": ids, "sampling_params": {"max_tokens": 1}, "cache_salt": a})
        assert _cached(gen_a) >= prompt_tokens - 2  # a's completion prompt is a prefix of this one
        gen_d = client.post("/generate", json={"input_ids": ids, "sampling_params": {"max_tokens": 1}, "cache_salt": "d-" + tag})
        assert _cached(gen_d) == 0


# ---------------------------------------------------------------- chat templates in a sandbox


class _TemplateOverride:
    """The session engine, seen with another chat template (as a model folder would ship)."""

    def __init__(self, engine, template: str) -> None:
        self._engine = engine
        self.chat_template = template

    def __getattr__(self, name):
        return getattr(self._engine, name)


def _canary(tmp_path: Path) -> Path:
    return tmp_path / "pwned"


MALICIOUS = [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__['os'].system('touch {canary}') }}",
    "{{ strftime_now.__globals__.__builtins__.open('{canary}', 'w').write('x') }}",
    "{{ dict.__call__.__globals__['__builtins__']['__import__']('os').system('touch {canary}') }}",
    "{{ namespace.__init__.__globals__['os'].popen('touch {canary}').read() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch {canary}').read() }}",
    "{{ lipsum.__globals__['os'].system('touch {canary}') }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch {canary}') }}",
    "{% for m in messages %}{{ m.content.__class__.__mro__[-1].__subclasses__() }}{% endfor %}",
    "{% set ns = namespace(__class__=1) %}{{ ns }}",
    "{{ messages.append({'role': 'system'}) }}{{ messages }}",
    "{{ (messages | first).update({'content': 'x'}) }}",
    "{{ ''.format.__self__.__class__ }}",
    "{{ messages[0].content.__len__.__self__.__class__.__subclasses__() }}",
]


@pytest.fixture(scope="module")
def template_servers(engine, tmp_path_factory):
    canary = _canary(tmp_path_factory.mktemp("sandbox"))
    servers = []
    for source in MALICIOUS:
        template = source.replace("{canary}", str(canary))
        settings = ServerSettings(shutdown_engine=False)
        from benchmarks.loadgen import ServerThread

        thread = ServerThread(create_app(_TemplateOverride(engine, template), settings)).start()
        servers.append((template, Served(engine, thread, settings)))
    yield canary, servers
    for _, served in servers:
        served.thread.stop()


LEAKS = ("<class", "<function", "<built-in", "<module", "subprocess", "Traceback")


def test_chat_templates_render_in_a_sandbox(template_servers):
    """Templates that reach for Python internals (__class__, __globals__, __subclasses__,
    mutation of the inputs) run nothing and leak nothing: most fail with a clean 400 naming
    the chat template; the sandbox renders a bare unsafe attribute as empty text, and what is
    left of such a prompt is then either refused (empty prompt, 400) or plain text."""
    canary, servers = template_servers
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    refused = 0
    for template, served in servers:
        with served.client() as client:
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 400, (template, r.status_code, r.text[:300])
            error = r.json()["error"]
            refused += error["code"] == "chat_template_error"
            assert not any(leak in error["message"] for leak in LEAKS + (str(canary),)), (template, error)
            r = client.post("/tokenize", json={"messages": body["messages"]})
            assert r.status_code in (200, 400), (template, r.status_code, r.text[:300])
            if r.status_code == 200:
                text = served.engine.detokenize(r.json()["tokens"])
                assert not any(leak in text for leak in LEAKS), (template, text)
    assert refused >= len(servers) - 2, "most of these templates must be refused by the sandbox"
    assert not canary.exists(), "a chat template ran a command"


def test_message_content_is_data_not_template(server):
    """Template syntax inside a message is text: rendered verbatim, never evaluated."""
    content = "{{ 7 * 7 }} {% for x in range(3) %}{{ x }}{% endfor %} {{ ''.__class__ }}"
    with server.client() as client:
        ids = client.post("/tokenize", json={"messages": [{"role": "user", "content": content}]}).json()["tokens"]
        text = client.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert content in text and "49" not in text


def test_template_kwargs_cannot_smuggle_objects(server):
    """chat_template_kwargs arrive as plain JSON values; names the server sets are reserved."""
    with server.client() as client:
        r = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            "chat_template_kwargs": {"bos_token": "{{ ''.__class__ }}"}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"
        r = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            "chat_template_kwargs": {"extra": {"__class__": "x", "nested": ["{{ 7 * 7 }}"]}}})
        assert r.status_code == 200, r.text


# ---------------------------------------------------------------- configurable limits


def test_limits_are_cli_flags_and_settings():
    args = build_parser().parse_args([
        "serve", "--max-body-size", "1MiB", "--max-prompt-tokens", "3000", "--max-n", "4", "--max-tokens-limit", "512",
        "--max-constraint-size", "64KiB", "--constraint-timeout", "2.5", "--stall-timeout", "30", "--max-waiting", "64",
        "--context-length", "4096",
    ])
    settings = settings_from_args(args)
    assert (settings.max_body_bytes, settings.max_prompt_tokens, settings.max_n, settings.max_tokens_limit) == (
        1 << 20, 3000, 4, 512)
    assert (settings.max_constraint_bytes, settings.constraint_timeout_s) == (64 << 10, 2.5)
    assert engine_kwargs(args) == {"stall_timeout_s": 30.0, "max_waiting": 64, "max_model_len": 4096}
    defaults = settings_from_args(build_parser().parse_args(["serve"]))
    assert (defaults.max_prompt_tokens, defaults.max_n, defaults.max_tokens_limit) == (None, 128, None)
    assert (defaults.max_constraint_bytes, defaults.constraint_timeout_s) == (1 << 20, 10.0)


@pytest.mark.parametrize("argv", [
    ["serve", "--max-n", "0"], ["serve", "--max-n", "129"], ["serve", "--max-prompt-tokens", "0"],
    ["serve", "--max-tokens-limit", "-1"], ["serve", "--constraint-timeout", "0"], ["serve", "--max-constraint-size", "0"],
])
def test_invalid_limits_are_refused_at_start(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_limits_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--max-body-size", "--max-prompt-tokens", "--max-n", "--max-tokens-limit", "--max-constraint-size",
                 "--constraint-timeout", "--stall-timeout", "--context-length", "--max-waiting"):
        assert flag in out, flag
