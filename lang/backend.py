"""The backend protocol: everything the DSL needs from an engine, and nothing more.

A program never touches an engine directly. It talks to a `Backend`, which can be an
in-process engine (`Runtime`, lang/runtime_backend.py) or a radixserve server over HTTP
(`Endpoint`, lang/endpoint.py). The protocol works in token ids: the interpreter keeps each
program's text as a list of token ids, so requests that share a prefix in the program share it
token for token, which is what the engine's radix cache matches on.

Methods:
  * `model_info()`   -> `ModelInfo` (name, context length, chat template, bos/eos tokens)
  * `tokenize(text)` -> token ids, no special tokens added (special-token text such as
                        "<|im_start|>" is still recognised)
  * `generate(prompt_ids, params, on_text=None)` -> one `Generation`; `on_text(delta)` is
                        called with text pieces while it runs (streaming)
  * `generate_batch(prompts, params)` -> `Generation`s, submitted together so the engine
                        batches them and computes a shared prefix once
  * `score(prefix_ids, continuations)` -> `ContinuationScore`s, one batched scoring call
  * `close()`

`BackendBase` implements `score` on top of `generate_batch` (prompt log-probabilities with
`max_tokens=0`), so a backend only has to provide the other methods.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from radixserve.lang.chat import ChatFormat
from radixserve.lang.errors import ChatTemplateError
from radixserve.runtime.sampling_params import SamplingParams


@dataclass(frozen=True)
class ModelInfo:
    """What a program needs to know about the served model. `chat_template` is Jinja text or
    None when the model has none (then role blocks cannot be used)."""

    name: str
    max_model_len: int
    chat_template: str | None
    bos_token: str | None = None
    eos_token: str | None = None
    eos_token_ids: tuple[int, ...] = ()


@dataclass
class Generation:
    """The finished result of one request as the DSL sees it.

    `token_ids` are the generated tokens as the engine returned them (they may include a final
    EOS/stop token and the tokens of a matched stop string, which `text` excludes).
    `prompt_logprobs[i]` is log p(prompt token at position `prompt_logprobs_start + i`); it is
    only set when the request asked for prompt log-probabilities.
    """

    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    prompt_logprobs: list[float] | None = None
    prompt_logprob_token_ids: list[int] | None = None
    error: str | None = None


@dataclass(frozen=True)
class ContinuationScore:
    """Log-probabilities of one continuation's tokens given the prefix, plus the cache usage
    of its scoring request."""

    token_ids: tuple[int, ...]
    token_logprobs: tuple[float, ...]
    prompt_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total(self) -> float:
        return math.fsum(self.token_logprobs)

    @property
    def mean(self) -> float:
        """Token-length-normalized log-probability (the mean over the continuation's tokens)."""
        return self.total / len(self.token_logprobs) if self.token_logprobs else -math.inf


TextCallback = Callable[[str], None]


@runtime_checkable
class Backend(Protocol):
    """What an engine must offer to run DSL programs (see the module docstring)."""

    def model_info(self) -> ModelInfo: ...

    def tokenize(self, text: str) -> list[int]: ...

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, *, on_text: TextCallback | None = None
    ) -> Generation: ...

    def generate_batch(
        self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]
    ) -> list[Generation]: ...

    def score(
        self, prefix_ids: list[int], continuations: Sequence[list[int]]
    ) -> list[ContinuationScore]: ...

    def close(self) -> None: ...


class BackendBase:
    """Shared behaviour: scoring through prompt log-probabilities, a tokenization cache, the
    chat format derived once from the model's template, and context management.

    Subclasses call `super().__init__()` and implement `model_info`, `_tokenize`, `generate`,
    `generate_batch` and `close`.
    """

    _TOKENIZE_CACHE_SIZE = 4096

    def __init__(self) -> None:
        self._cache_lock = threading.Lock()
        self._token_cache: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._chat_format: ChatFormat | None = None

    def _tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added), memoized: programs tokenize the same
        role markers and few-shot headers over and over."""
        with self._cache_lock:
            hit = self._token_cache.get(text)
            if hit is not None:
                self._token_cache.move_to_end(text)
                return list(hit)
        ids = tuple(self._tokenize(text))
        with self._cache_lock:
            self._token_cache[text] = ids
            if len(self._token_cache) > self._TOKENIZE_CACHE_SIZE:
                self._token_cache.popitem(last=False)
        return list(ids)

    def chat_format(self) -> ChatFormat:
        """Role prefixes/suffixes derived from the model's chat template (computed once)."""
        with self._cache_lock:
            if self._chat_format is not None:
                return self._chat_format
        info = self.model_info()
        if not info.chat_template:
            raise ChatTemplateError(
                f"model {info.name!r} has no chat template, so system()/user()/assistant() "
                f"cannot be used; append plain text instead"
            )
        fmt = ChatFormat.from_template(
            info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token
        )
        with self._cache_lock:
            self._chat_format = fmt
        return fmt

    def score(
        self, prefix_ids: list[int], continuations: Sequence[list[int]]
    ) -> list[ContinuationScore]:
        """Score each continuation after `prefix_ids` in ONE batched request.

        Every candidate prompt is `prefix_ids + continuation`, so all of them share the prefix
        token for token: the engine's radix cache and its cache-aware scheduling compute the
        prefix once and only the continuations' tokens are recomputed for their log-probs
        (`prompt_logprobs_start = len(prefix_ids)`; `max_tokens=0` generates nothing).

        Position 0 has no log-probability (nothing precedes it), so with an empty prefix the
        first token of each continuation is left unscored.
        """
        if not continuations:
            return []
        start = max(len(prefix_ids), 1)
        params = SamplingParams(max_tokens=0, prompt_logprobs=0, prompt_logprobs_start=start)
        prompts = [list(prefix_ids) + list(c) for c in continuations]
        results = self.generate_batch(prompts, [params] * len(prompts))
        scores = []
        for cont, prompt, res in zip(continuations, prompts, results):
            scored = len(prompt) - start
            lps = list(res.prompt_logprobs or [])
            ids = res.prompt_logprob_token_ids
            # Engines differ in whether the list starts at `start` or covers the whole prompt;
            # the last `scored` entries are the continuation's either way.
            if len(lps) < scored:
                raise ValueError(
                    f"backend returned {len(lps)} prompt log-probabilities, expected {scored}"
                )
            lps = lps[len(lps) - scored :]
            if ids is not None:
                ids = ids[len(ids) - scored :]
                if list(ids) != prompt[start:]:
                    raise ValueError("backend scored different tokens than were submitted")
            scores.append(
                ContinuationScore(
                    token_ids=tuple(cont),
                    token_logprobs=tuple(float(x) for x in lps),
                    prompt_tokens=res.prompt_tokens,
                    cached_tokens=res.cached_tokens,
                )
            )
        return scores

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
