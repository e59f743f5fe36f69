"""`Endpoint`: run DSL programs against a radixserve server over HTTP.

Talks to the server's native API with httpx: `GET /model_info` (once, at construction: an
unreachable server fails right there, naming its URL), `POST /tokenize`, and `POST /generate`
with `input_ids` (the program's token ids, so the server's radix cache sees exactly the ids an
in-process run would send and greedy results match), `sampling_params` (every SamplingParams
field plus the constraint fields) and `stream` (server-sent events) when a program streams.

`generate_batch` (used by `select` scoring) sends its requests concurrently over one
connection pool, so they reach the engine together and are batched there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from radixserve.lang.backend import BackendBase, Generation, ModelInfo, TextCallback
from radixserve.lang.errors import BackendError, BackendUnreachable
from radixserve.runtime.sampling_params import SamplingParams


def params_to_json(params: SamplingParams) -> dict[str, Any]:
    """SamplingParams -> the native endpoint's `sampling_params` object."""
    out: dict[str, Any] = {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "min_p": params.min_p,
        "repetition_penalty": params.repetition_penalty,
        "frequency_penalty": params.frequency_penalty,
        "presence_penalty": params.presence_penalty,
        "n": params.n,
        "ignore_eos": params.ignore_eos,
        "include_stop_str_in_output": params.include_stop_str_in_output,
        "skip_special_tokens": params.skip_special_tokens,
        "prompt_logprobs_start": params.prompt_logprobs_start,
    }
    if params.seed is not None:
        out["seed"] = params.seed
    if params.stop:
        out["stop"] = list(params.stop)
    if params.stop_token_ids:
        out["stop_token_ids"] = list(params.stop_token_ids)
    if params.logprobs is not None:
        out["logprobs"] = params.logprobs
    if params.prompt_logprobs is not None:
        out["prompt_logprobs"] = params.prompt_logprobs
    c = params.constraint
    if c is not None:
        if c.kind == "regex":
            out["regex"] = c.value
        elif c.kind == "choice":
            out["choice"] = list(c.value)
        elif c.kind == "json_schema":
            out["json_schema"] = json.loads(c.value) if isinstance(c.value, str) else c.value
        elif c.kind == "grammar":
            out["grammar"] = c.value
        elif c.kind == "json_object":
            out["json_object"] = True
        else:
            raise ValueError(f"unknown constraint kind {c.kind!r}")
    return out


def _prompt_logprobs(body: dict[str, Any]) -> tuple[list[float] | None, list[int] | None]:
    entries = body.get("prompt_logprobs")
    if entries is None:
        return None, None
    lps, ids = [], []
    for e in entries:
        if e is None or e.get("logprob") is None:
            lps.append(-math.inf)
            ids.append(int(e["token_id"]) if e else -1)
        else:
            lps.append(float(e["logprob"]))
            ids.append(int(e["token_id"]))
    return lps, ids


class Endpoint(BackendBase):
    """A radixserve server as a DSL backend. `api_key` is sent as a bearer token."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 600.0) -> None:
        super().__init__()
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )
        try:
            body = self._request("GET", "/model_info")
        except BaseException:
            self._client.close()
            raise
        self._info = ModelInfo(
            name=str(body.get("model") or body.get("engine_model_name") or "unknown"),
            max_model_len=int(body.get("max_model_len") or 0),
            chat_template=body.get("chat_template"),
            bos_token=body.get("bos_token"),
            eos_token=body.get("eos_token"),
            eos_token_ids=tuple(int(t) for t in body.get("eos_token_ids") or ()),
        )

    # ---------------------------------------------------------------- HTTP

    def _raise_for(self, resp: httpx.Response, path: str) -> None:
        if resp.status_code < 400:
            return
        try:
            detail = resp.json()["error"]["message"]
        except Exception:  # noqa: BLE001 - not our error format
            detail = resp.text[:500]
        raise BackendError(f"{self.url}{path} answered {resp.status_code}: {detail}", resp.status_code)

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            resp = self._client.request(method, path, json=payload)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise BackendUnreachable(self.url, str(e) or type(e).__name__) from e
        except httpx.TransportError as e:
            raise BackendUnreachable(self.url, f"{type(e).__name__}: {e}") from e
        self._raise_for(resp, path)
        return resp.json()

    # ---------------------------------------------------------------- protocol

    def model_info(self) -> ModelInfo:
        return self._info

    def _tokenize(self, text: str) -> list[int]:
        if not text:
            return []
        return [int(t) for t in self._request("POST", "/tokenize", {"prompt": text})["tokens"]]

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, *, on_text: TextCallback | None = None
    ) -> Generation:
        payload = {"input_ids": list(prompt_ids), "sampling_params": params_to_json(params)}
        if on_text is None:
            return self._from_body(self._request("POST", "/generate", payload))
        payload["stream"] = True
        return self._stream(payload, on_text)

    def _from_body(self, body: dict[str, Any]) -> Generation:
        usage = body.get("usage") or {}
        lps, lp_ids = _prompt_logprobs(body)
        return Generation(
            text=body.get("text", ""),
            token_ids=[int(t) for t in body.get("token_ids", [])],
            finish_reason=body.get("finish_reason"),
            stop_reason=body.get("stop_reason"),
            prompt_tokens=int(usage.get("prompt_tokens", len(body.get("prompt_token_ids", [])))),
            cached_tokens=int(usage.get("cached_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            prompt_logprobs=lps,
            prompt_logprob_token_ids=lp_ids,
        )

    def _stream(self, payload: dict[str, Any], on_text: TextCallback) -> Generation:
        text: list[str] = []
        ids: list[int] = []
        last: dict[str, Any] = {}
        try:
            with self._client.stream("POST", "/generate", json=payload) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._raise_for(resp, "/generate")
                for line in resp.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event and "index" not in event:
                        raise BackendError(f"{self.url}/generate failed while streaming: {event['error']}")
                    if event.get("index", 0) != 0:
                        continue
                    if event.get("text"):
                        text.append(event["text"])
                        on_text(event["text"])
                    ids.extend(int(t) for t in event.get("token_ids", []))
                    if event.get("finish_reason") is not None:
                        last = event
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise BackendUnreachable(self.url, str(e) or type(e).__name__) from e
        usage = last.get("usage") or {}
        return Generation(
            text="".join(text),
            token_ids=ids,
            finish_reason=last.get("finish_reason"),
            stop_reason=last.get("stop_reason"),
            prompt_tokens=int(usage.get("prompt_tokens", len(payload["input_ids"]))),
            cached_tokens=int(usage.get("cached_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", len(ids))),
        )

    def generate_batch(
        self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]
    ) -> list[Generation]:
        if len(prompts) <= 1:
            return [self.generate(p, sp) for p, sp in zip(prompts, params)]
        with ThreadPoolExecutor(max_workers=min(len(prompts), 64)) as pool:
            return list(pool.map(lambda ps: self.generate(ps[0], ps[1]), zip(prompts, params)))

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"Endpoint({self.url!r})"
