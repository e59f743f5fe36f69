"""A deterministic fake backend for interpreter tests (no model, no engine).

Tokens are characters (`ord`), with ChatML's special markers as single tokens. The "model"
greedily emits characters chosen by a hash of the last few tokens; scoring gives each token a
hash-derived log-probability. A toy prefix cache records every finished sequence, so
`cached_tokens` is the longest prefix a request shares with an earlier one (capped one short of
the prompt: the last prompt token is always computed), like the engine's radix cache with
page size 1. Every request is recorded, and the number in flight at once is tracked so tests
can check that branches really run concurrently.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Sequence

from radixserve.lang.backend import BackendBase, Generation, ModelInfo
from radixserve.runtime.sampling_params import SamplingParams

SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
SPECIAL_BASE = 1_000_000
EOS = SPECIAL_BASE + 1
ALPHABET = "abcdefgh ij.,"


def _h(*xs: int) -> int:
    return zlib.crc32(",".join(map(str, xs)).encode())


class FakeBackend(BackendBase):
    def __init__(
        self, latency_s: float = 0.0, token_latency_s: float = 0.0, chat_template: str | None = SMOL_TEMPLATE
    ) -> None:
        super().__init__()
        self.latency_s = latency_s
        self.token_latency_s = token_latency_s
        self._template = chat_template
        self.lock = threading.Lock()
        self.requests: list[tuple[list[int], SamplingParams]] = []
        self.batches: list[int] = []
        self.sequences: list[tuple[int, ...]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.tokenize_calls = 0

    # ------------------------------------------------------------ tokenizer
    def model_info(self) -> ModelInfo:
        return ModelInfo("fake", 4096, self._template, None, "<|im_end|>", (EOS,))

    def _tokenize(self, text: str) -> list[int]:
        self.tokenize_calls += 1
        out, i = [], 0
        while i < len(text):
            for k, sp in enumerate(SPECIALS):
                if text.startswith(sp, i):
                    out.append(SPECIAL_BASE + k)
                    i += len(sp)
                    break
            else:
                out.append(ord(text[i]))
                i += 1
        return out

    @staticmethod
    def detok(ids: Sequence[int]) -> str:
        return "".join(SPECIALS[t - SPECIAL_BASE] if t >= SPECIAL_BASE else chr(t) for t in ids)

    # ------------------------------------------------------------ model
    @staticmethod
    def next_token(ids: Sequence[int]) -> int:
        h = _h(*ids[-3:], len(ids) % 7)
        if h % 17 == 0:
            return EOS
        return ord(ALPHABET[h % len(ALPHABET)])

    @staticmethod
    def logprob(context: Sequence[int], token: int) -> float:
        return -((_h(*context[-2:], token) % 1000) / 100.0)

    def _cached(self, prompt: list[int]) -> int:
        best = 0
        for seq in self.sequences:
            n = 0
            for a, b in zip(seq, prompt):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return min(best, max(len(prompt) - 1, 0))

    def _run(self, prompt: list[int], params: SamplingParams, on_text=None) -> Generation:
        with self.lock:
            self.requests.append((list(prompt), params))
            cached = self._cached(prompt)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency_s:
                time.sleep(self.latency_s)
            out: list[int] = []
            text = ""
            finish, stop_reason = "length", None
            c = params.constraint
            if c is not None and c.kind == "choice":
                forced = self._tokenize(c.value[-1])
            else:
                forced = None
            while len(out) < params.max_tokens:
                tok = forced[len(out)] if forced is not None and len(out) < len(forced) else (
                    EOS if forced is not None else self.next_token(prompt + out)
                )
                if tok == EOS and params.ignore_eos:
                    tok = ord("a")
                if self.token_latency_s:
                    time.sleep(self.token_latency_s)
                out.append(tok)
                if tok == EOS or tok in params.stop_token_ids:
                    finish, stop_reason = "stop", (None if tok == EOS else tok)
                    break
                piece = self.detok([tok])
                new_text = text + piece
                hit = next((s for s in params.stop if s in new_text), None)
                if hit is not None:
                    text = new_text[: new_text.index(hit)]
                    finish, stop_reason = "stop", hit
                    break
                if on_text is not None:
                    on_text(piece)
                text = new_text
            lps = None
            if params.prompt_logprobs is not None:
                start = params.prompt_logprobs_start
                lps = [self.logprob(prompt[:i], prompt[i]) for i in range(max(start, 1), len(prompt))]
            with self.lock:
                self.sequences.append(tuple(prompt + out))
            return Generation(
                text=text,
                token_ids=out,
                finish_reason=finish,
                stop_reason=stop_reason,
                prompt_tokens=len(prompt),
                cached_tokens=cached,
                completion_tokens=len(out),
                prompt_logprobs=lps,
                prompt_logprob_token_ids=None if lps is None else prompt[len(prompt) - len(lps) :],
            )
        finally:
            with self.lock:
                self.in_flight -= 1

    def generate(self, prompt_ids, params, *, on_text=None) -> Generation:
        return self._run(list(prompt_ids), params, on_text)

    def generate_batch(self, prompts, params) -> list[Generation]:
        with self.lock:
            self.batches.append(len(prompts))
        return [self._run(list(p), sp) for p, sp in zip(prompts, params)]

    def close(self) -> None:
        pass
