"""Model definitions over the paged KV cache, and the architecture registry that picks one."""

from .registry import MODEL_REGISTRY, get_model_class

__all__ = ["MODEL_REGISTRY", "get_model_class"]
