"""Model resolution and loading: `resolve_model` (what to load) and `load_model` (build it).

    resolved = resolve_model("default")            # or a named shape, a folder, a .gguf file
    model = load_model(resolved, "cpu", torch.float32)
    tokenizer = load_tokenizer(resolved)           # radixserve.runtime.tokenizer

See resolve.py for the load formats and the cache, weights.py for how weights are filled.
"""

from .resolve import (
    DEFAULT_MODEL,
    LOAD_FORMATS,
    ModelResolveError,
    ResolvedModel,
    default_cache_dir,
    default_gguf_path,
    resolve_model,
)
from .weights import load_model

__all__ = [
    "DEFAULT_MODEL",
    "LOAD_FORMATS",
    "ModelResolveError",
    "ResolvedModel",
    "default_cache_dir",
    "default_gguf_path",
    "load_model",
    "resolve_model",
]
