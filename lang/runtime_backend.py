"""`Runtime`: run DSL programs on an in-process radixserve engine.

`Runtime(model="default", **engine_kwargs)` starts an `Engine` (the keyword arguments are the
engine's: page_size, max_running, device, ...) and shuts it down on `close()`.
`Runtime(engine=existing)` wraps an engine owned elsewhere (a server's, a test session's) and
leaves it running on `close()`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

from radixserve.lang.backend import BackendBase, Generation, ModelInfo, TextCallback
from radixserve.lang.errors import BackendError
from radixserve.runtime.sampling_params import SamplingParams


def _logprob_lists(entries) -> tuple[list[float] | None, list[int] | None]:
    if entries is None:
        return None, None
    lps, ids = [], []
    for e in entries:
        if e is None:  # position 0 of a prompt has no log-probability
            lps.append(-math.inf)
            ids.append(-1)
        else:
            lps.append(float(e.logprob))
            ids.append(int(e.token_id))
    return lps, ids


def _from_result(res: Any) -> Generation:
    """An engine `GenerateResult` (one continuation) as a `Generation`."""
    out = res.outputs[0] if res.outputs else None
    lps, lp_ids = _logprob_lists(res.prompt_logprobs)
    return Generation(
        text=out.text if out else "",
        token_ids=list(out.token_ids) if out else [],
        finish_reason=out.finish_reason if out else "length",
        stop_reason=out.stop_reason if out else None,
        prompt_tokens=len(res.prompt_token_ids),
        cached_tokens=int(res.cached_tokens),
        completion_tokens=len(out.token_ids) if out else 0,
        prompt_logprobs=lps,
        prompt_logprob_token_ids=lp_ids,
        error=out.error if out else None,
    )


class Runtime(BackendBase):
    """An in-process engine as a DSL backend (see the module docstring)."""

    def __init__(self, model: str = "default", *, engine: Any = None, **engine_kwargs: Any) -> None:
        super().__init__()
        if engine is None:
            from radixserve.runtime import Engine

            engine = Engine(model=model, **engine_kwargs)
            self._owns_engine = True
        else:
            if engine_kwargs:
                raise TypeError("Runtime(engine=...) takes no engine keyword arguments")
            self._owns_engine = False
        self.engine = engine
        tok = engine.tokenizer
        self._info = ModelInfo(
            name=str(engine.model_name),
            max_model_len=int(engine.max_model_len),
            chat_template=engine.chat_template,
            bos_token=getattr(tok, "bos_token", None),
            eos_token=getattr(tok, "eos_token", None),
            eos_token_ids=tuple(int(t) for t in engine.eos_token_ids),
        )

    def model_info(self) -> ModelInfo:
        return self._info

    def _tokenize(self, text: str) -> list[int]:
        return list(self.engine.tokenize(text))

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, *, on_text: TextCallback | None = None
    ) -> Generation:
        if on_text is None:
            return _from_result(self.engine.generate(list(prompt_ids), params))
        # Streaming: submit with a delta callback (called on the engine thread) and wait.
        done = threading.Event()
        acc: dict[str, Any] = {"text": [], "ids": [], "finish": None, "stop": None,
                               "prompt": len(prompt_ids), "cached": 0, "error": None}

        def on_delta(d: Any) -> None:
            if d.index != 0:
                return
            if d.text:
                acc["text"].append(d.text)
                try:
                    on_text(d.text)
                except Exception:  # a reader's failure must not kill the engine thread
                    pass
            acc["ids"].extend(d.token_ids)
            acc["prompt"] = max(acc["prompt"], d.prompt_tokens)
            acc["cached"] = max(acc["cached"], d.cached_tokens)
            if d.finish_reason is not None:
                acc["finish"], acc["stop"], acc["error"] = d.finish_reason, d.stop_reason, d.error
                done.set()

        request_id = self.engine.submit(list(prompt_ids), params, on_delta=on_delta)
        while not done.wait(1.0):
            if not self.engine.healthy():
                self.engine.abort(request_id)
                raise BackendError(f"the engine stopped while request {request_id} was running")
        return Generation(
            text="".join(acc["text"]),
            token_ids=acc["ids"],
            finish_reason=acc["finish"],
            stop_reason=acc["stop"],
            prompt_tokens=acc["prompt"],
            cached_tokens=acc["cached"],
            completion_tokens=len(acc["ids"]),
            error=acc["error"],
        )

    def generate_batch(
        self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]
    ) -> list[Generation]:
        if not prompts:
            return []
        results = self.engine.generate([list(p) for p in prompts], list(params))
        return [_from_result(r) for r in results]

    def close(self) -> None:
        if self._owns_engine:
            self.engine.shutdown()

    def __repr__(self) -> str:
        return f"Runtime(model={self._info.name!r})"
