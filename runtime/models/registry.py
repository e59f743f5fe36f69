"""Architecture name -> model class.

`ModelConfig.architecture` (the Hugging Face class name from config.json) selects the class
that builds the model. The Llama-family architectures share one implementation whose
differences are ModelConfig flags (see llama.py). A new architecture is one entry here plus
one in model_config's spec table, never a branch in the loader.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from torch import nn

from ..model_config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedArchitectureError
from .llama import LlamaForCausalLM

__all__ = ["MODEL_REGISTRY", "get_model_class"]

MODEL_REGISTRY: Mapping[str, type[nn.Module]] = MappingProxyType({
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
})

if set(MODEL_REGISTRY) != set(SUPPORTED_ARCHITECTURES):  # pragma: no cover - a programming error
    raise ImportError("models.registry and model_config disagree on the supported architectures")


def get_model_class(config: ModelConfig) -> type[nn.Module]:
    """The class implementing `config.architecture`."""
    try:
        return MODEL_REGISTRY[config.architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"no model class for architecture {config.architecture!r}; registered: {', '.join(MODEL_REGISTRY)}"
        ) from None
