"""A small stand-in for `radixserve.runtime.Engine` (docs/engine_api.md) for server tests.

It follows the engine's threading model (its own thread, `on_delta` called from it) and
public API, but "generates" a fixed reply one byte-token per step, so tests of error paths,
disconnects, queue limits and shutdown run in milliseconds without torch. Tokens are bytes
(id = byte + 2; 0 is <s>, 1 is </s>). KV pages are counted per token (page size 1): a
running request holds one private page per token, so "no leak" means free == total when
idle. Knobs for tests: `paused` (requests stay queued), `unhealthy`, `step_s`, and the
recorded `submitted` / `aborted` request ids and params.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from radixserve.runtime.constraints.config import ConstraintLimits
from radixserve.runtime.constraints.errors import ConstraintError
from radixserve.runtime.engine import EngineStats
from radixserve.runtime.errors import EngineDead, PromptTooLong, QueueFull
from radixserve.runtime.outputs import StreamDelta, TokenLogprob
from radixserve.runtime.sampling_params import InvalidParams, SamplingParams

BOS, EOS, OFFSET = 0, 1, 2
REPLY = "Hello from the fake engine! "
# A prompt containing CALL_TOOL gets this reply instead (the tool-call format of server/tool_calls.py).
TOOL_REPLY = '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>'

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if tools %}<|tools|>{{ tools | tojson }}\n{% endif %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class FakeTokenizer:
    bos_token = "<s>"
    eos_token = "</s>"
    bos_token_id = BOS
    eos_token_id = EOS
    chat_template = CHAT_TEMPLATE

    def __len__(self) -> int:
        return 256 + OFFSET

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b + OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        out = bytearray()
        for t in ids:
            if t >= OFFSET:
                out.append(t - OFFSET)
            elif not skip_special_tokens:
                out += b"<s>" if t == BOS else b"</s>"
        return out.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class FakeConfig:
    page_size: int = 1
    max_running: int = 64
    max_waiting: int = 256
    constraints: ConstraintLimits = ConstraintLimits()


@dataclass
class _Seq:
    request_id: str
    index: int
    prompt: list[int]
    params: SamplingParams
    on_delta: Callable[[StreamDelta], None]
    cache_salt: str | None
    cached: int = 0
    reply: bytes = REPLY.encode()
    out: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False


class FakeEngine:
    def __init__(self, *, max_model_len: int = 2048, num_pages: int = 4096, step_s: float = 0.002, max_waiting: int = 256) -> None:
        self.config = FakeConfig(max_waiting=max_waiting)
        self.tokenizer = FakeTokenizer()
        self.model_name = "fake-model"
        self.max_model_len = max_model_len
        self.chat_template: str | None = CHAT_TEMPLATE
        self.eos_token_ids = (EOS,)
        self.vocab_size = len(self.tokenizer)
        self.num_pages = num_pages
        self.step_s = step_s
        self.paused = False
        self.unhealthy = False
        self.submitted: list[tuple[str, SamplingParams, str | None]] = []
        self.aborted: list[str] = []
        self.prompts: list[list[int]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._waiting: list[_Seq] = []
        self._running: list[_Seq] = []
        self._aborts: set[str] = set()
        self._history: list[tuple[str | None, tuple[int, ...]]] = []
        self._counters = dict(queried=0, cached=0, prompt=0, generation=0, finished=0, steps=0)
        self._last_beat = time.monotonic()
        self._ids = 0
        self._thread = threading.Thread(target=self._run, name="fake-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def detokenize(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def submit(self, prompt, params=None, *, on_delta, request_id=None, cache_salt=None) -> str:
        params = params or SamplingParams()
        if self._stop or not self._thread.is_alive():
            raise EngineDead("the engine is not running")
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise InvalidParams("prompt", "the prompt is empty")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise InvalidParams("prompt", f"token ids must be in [0, {self.vocab_size})")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLong(len(ids), params.max_tokens, self.max_model_len)
        if params.constraint is not None and params.constraint.kind == "regex" and params.constraint.value == "ENGINE_REJECTS":
            raise ConstraintError("regex", "the engine could not compile this regex")
        with self._lock:
            if len(self._waiting) + params.n > self.config.max_waiting:
                raise QueueFull(self.config.max_waiting)
            self._ids += 1
            rid = request_id or f"fake-{self._ids}"
            self.submitted.append((rid, params, cache_salt))
            self.prompts.append(ids)
            reply = (TOOL_REPLY if b"CALL_TOOL" in bytes(t - OFFSET for t in ids if t >= OFFSET) else REPLY).encode()
            for i in range(params.n):
                self._waiting.append(_Seq(rid, i, ids, params, on_delta, cache_salt, reply=reply))
        self._wake.set()
        return rid

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)
        self._wake.set()

    def stats(self) -> EngineStats:
        with self._lock:
            private = sum(len(s.prompt) + len(s.out) for s in self._running)
            c = self._counters
            return EngineStats(
                running=len(self._running), waiting=len(self._waiting), total_pages=self.num_pages,
                free_pages=self.num_pages - private, cached_pages=0, evictable_pages=0, locked_pages=0,
                private_pages=private, page_size=1, queried_tokens=c["queried"], cached_tokens=c["cached"],
                prompt_tokens=c["prompt"], generation_tokens=c["generation"], preemptions=0,
                finished=c["finished"], steps=c["steps"], cascade_steps=0, last_step_at=self._last_beat,
            )

    def healthy(self) -> bool:
        return not self.unhealthy and self._thread.is_alive() and not self._stop

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    def wait_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._running and not self._waiting:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError("fake engine did not become idle")
            time.sleep(0.005)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        while not self._stop:
            self._last_beat = time.monotonic()
            self._wake.wait(self.step_s)
            self._wake.clear()
            with self._lock:
                self._apply_aborts()
                if not self.paused:
                    self._admit()
                    self._step()
        with self._lock:
            for seq in self._waiting + self._running:
                self._finish(seq, "abort")
            self._waiting, self._running = [], []

    def _apply_aborts(self) -> None:
        if not self._aborts:
            return
        for seq in self._waiting + self._running:
            if seq.request_id in self._aborts:
                self.aborted.append(seq.request_id)
                self._finish(seq, "abort")
        self._waiting = [s for s in self._waiting if not s.done]
        self._running = [s for s in self._running if not s.done]
        self._aborts.clear()

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.config.max_running:
            seq = self._waiting.pop(0)
            best = 0
            for salt, tokens in self._history:
                if salt != seq.cache_salt:
                    continue
                common = 0
                for a, b in zip(tokens, seq.prompt):
                    if a != b:
                        break
                    common += 1
                best = max(best, common)
            seq.cached = min(best, len(seq.prompt) - 1)
            if seq.index == 0:
                self._counters["queried"] += len(seq.prompt)
                self._counters["cached"] += seq.cached
                self._counters["prompt"] += len(seq.prompt)
            self._running.append(seq)

    def _step(self) -> None:
        if not self._running:
            return
        self._counters["steps"] += 1
        for seq in self._running:
            p = seq.params
            if p.max_tokens == 0:
                self._finish(seq, "length")
                continue
            if b"FAIL_ME" in bytes(t - OFFSET for t in seq.prompt if t >= OFFSET):
                self._finish(seq, "error", error="ValueError: secret internal detail")
                continue
            step = len(seq.out)
            if step >= len(seq.reply) and not p.ignore_eos:
                self._finish(seq, "stop")
                continue
            token = seq.reply[step % len(seq.reply)] + OFFSET
            seq.out.append(token)
            self._counters["generation"] += 1
            char = chr(token - OFFSET)
            seq.text += char
            finish, stop_reason, text = None, None, char
            for stop in p.stop:
                if seq.text.endswith(stop):
                    finish, stop_reason = "stop", stop
                    text = "" if not p.include_stop_str_in_output else char
            if finish is None and len(seq.out) >= p.max_tokens:
                finish = "length"
            logprobs = None
            if p.logprobs is not None:
                top = tuple((t, -0.25 - k) for k, t in enumerate([token, token + 1][: p.logprobs]))
                logprobs = [TokenLogprob(token, -0.25, top)]
            delta = StreamDelta(
                seq.request_id, seq.index, text, [token], None, None, logprobs,
                prompt_tokens=len(seq.prompt), cached_tokens=seq.cached if seq.index == 0 else 0,
                completion_tokens=len(seq.out),
            )
            if finish is not None:
                self._finish(seq, finish, stop_reason=stop_reason, last=delta)
            else:
                seq.on_delta(delta)
        self._running = [s for s in self._running if not s.done]

    def _prompt_logprobs(self, seq: _Seq) -> list[TokenLogprob] | None:
        p = seq.params
        if p.prompt_logprobs is None:
            return None
        start = max(p.prompt_logprobs_start, 1)
        return [TokenLogprob(t, -1.0, ((t, -1.0),)[: p.prompt_logprobs]) for t in seq.prompt[start:]]

    def _finish(self, seq: _Seq, reason: str, *, stop_reason=None, error=None, last: StreamDelta | None = None) -> None:
        if seq.done:
            return
        seq.done = True
        self._counters["finished"] += 1
        self._history.append((seq.cache_salt, tuple(seq.prompt + seq.out)))
        base = last or StreamDelta(seq.request_id, seq.index, "", [], prompt_tokens=len(seq.prompt),
                                   cached_tokens=seq.cached if seq.index == 0 else 0, completion_tokens=len(seq.out))
        base.finish_reason = reason
        base.stop_reason = stop_reason
        base.error = error
        base.prompt_logprobs = self._prompt_logprobs(seq)
        base.prompt_token_ids = list(seq.prompt)
        try:
            seq.on_delta(base)
        except Exception:  # noqa: BLE001 - like the engine: a consumer bug must not kill the loop
            pass
