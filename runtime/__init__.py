"""radixserve.runtime: the engine. Load a model, batch requests continuously over a radix-cached
paged KV pool, sample, detokenize, stream.

    from radixserve.runtime import Engine, SamplingParams
    engine = Engine(model="default")
    print(engine.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0)).text)

Names are imported lazily so that light modules (sampling params, outputs) can be used without
loading torch-heavy parts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from radixserve.runtime.config import EngineConfig
from radixserve.runtime.constraints.spec import ConstraintSpec
from radixserve.runtime.errors import EngineDead, PromptTooLong, QueueFull, RequestRejected
from radixserve.runtime.outputs import CompletionOutput, GenerateResult, StreamDelta, TokenLogprob
from radixserve.runtime.sampling_params import InvalidParams, SamplingParams

if TYPE_CHECKING:
    from radixserve.runtime.engine import Engine, EngineStats

__all__ = [
    "CompletionOutput",
    "ConstraintSpec",
    "Engine",
    "EngineConfig",
    "EngineDead",
    "EngineStats",
    "GenerateResult",
    "InvalidParams",
    "PromptTooLong",
    "QueueFull",
    "RequestRejected",
    "SamplingParams",
    "StreamDelta",
    "TokenLogprob",
]


def __getattr__(name: str) -> Any:
    if name in ("Engine", "EngineStats"):
        from radixserve.runtime import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'radixserve.runtime' has no attribute {name!r}")
