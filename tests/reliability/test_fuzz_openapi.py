"""Fuzzing the server through its own OpenAPI document (schemathesis), against the real engine.

schemathesis builds requests from `/openapi.json`: valid ones (positive mode) and ones that
break the schema on purpose (negative mode: wrong types, missing fields, out-of-range
numbers). Every answer must be a documented status with a body of the documented shape, and
never a 5xx; a schema-breaking request must be refused with a 4xx. The server here is an app
over the session's real `Engine(model="default")` whose limits (max_tokens <= 4, n <= 2,
prompts <= 512 tokens) keep each accepted request to a few tokens on a CPU. Examples are
bounded and derandomized, so CI runs the same cases every time.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="needs the test extra (schemathesis)")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from radixserve.server.app import ENDPOINTS  # noqa: E402

GENERATING = ("/v1/chat/completions", "/v1/completions", "/generate")
# RADIXSERVE_FUZZ_EXAMPLES raises the count for a deeper run by hand (CI keeps the default).
SCALE = max(1, int(os.environ.get("RADIXSERVE_FUZZ_EXAMPLES", "25")))
EXAMPLES = {"positive": SCALE, "negative": SCALE}
CHEAP_EXAMPLES = max(8, SCALE // 3)  # endpoints that never reach the engine


def _operations() -> list[tuple[str, str, str]]:
    ops = []
    for ep in ENDPOINTS:
        for mode in ("positive", "negative"):
            if ep.request is None and mode == "negative":
                continue  # nothing to break: no body, no parameters
            ops.append((ep.method, ep.path, mode))
    return ops


@pytest.fixture(scope="module")
def schema(fuzz_server):
    with fuzz_server.client() as client:
        document = client.get("/openapi.json").json()
    return schemathesis.openapi.from_dict(document)


def _check_error_body(response) -> None:
    """A 4xx carries an OpenAI-style error whose message says something."""
    if 400 <= response.status_code < 500 and response.status_code != 405:
        body = json.loads(response.content)
        error = body["error"]
        assert isinstance(error["message"], str) and len(error["message"]) > 10, body
        assert "Traceback" not in error["message"]


@pytest.mark.parametrize("method, path, mode", _operations(), ids=lambda v: str(v).strip("/").replace("/", "_"))
def test_fuzz_operation(schema, fuzz_server, method, path, mode):
    operation = schema[path][method]
    examples = EXAMPLES[mode] if path in GENERATING else CHEAP_EXAMPLES
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    if mode == "negative":
        checks.append(negative_data_rejection)
    headers = {"Authorization": f"Bearer {fuzz_server.api_key}"}
    generation_mode = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=generation_mode))
    def fuzz(case) -> None:
        response = case.call(base_url=fuzz_server.url, headers=headers, timeout=120)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=checks, headers=headers)
        _check_error_body(response)

    statuses: Counter[int] = Counter()
    fuzz()
    print(f"{method} {path} {mode}: statuses {dict(sorted(statuses.items()))}")
    if mode == "positive" and path in GENERATING:
        assert statuses[200] > 0, "no generated request was accepted: the fuzzing never reached the engine"
    fuzz_server.engine.wait_idle(60)
