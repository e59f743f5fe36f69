"""Shared plumbing of the kernel modules: a guarded Triton import and input validation.

Triton is optional at import time: `radixserve.kernels` must import (and its PyTorch
references must work) on a machine without Triton. Every Triton kernel is therefore defined
under `if HAS_TRITON:` and every launcher calls `require_triton()` first. Launchers run on CUDA
tensors, or on CPU tensors when the kernel was built by Triton's interpreter
(`TRITON_INTERPRET=1` set before Triton was imported), which is how CI tests them.

Validation raises ValueError (bad shape, device, stride) or TypeError (bad dtype), never
`assert`, so bad input fails the same way under `python -O`. Only metadata is inspected:
nothing here reads tensor values, so validation never synchronizes the device.
"""

from __future__ import annotations

from typing import Any

import torch

try:  # pragma: no cover - exercised by environment, not by tests
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "triton",
    "tl",
    "FLOAT_DTYPES",
    "require_triton",
    "is_interpreted",
    "check_launch_device",
    "check_same_device",
    "check_float_dtype",
    "check_index_dtype",
    "check_ndim",
    "check_last_dim_contiguous",
    "check_contiguous",
    "check_paged_cache",
    "next_power_of_2",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def require_triton(op: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(
            f"{op}: Triton is not installed; use {op}_reference (the PyTorch path) instead"
        )


def is_interpreted(kernel: Any) -> bool:
    """True when `kernel` was built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{op}: all tensors must be on one device, {name} is on {dev}, not {first}")
    return first


def check_launch_device(op: str, kernel: Any, **tensors: torch.Tensor) -> None:
    """Triton launchers need CUDA tensors, or CPU tensors with an interpreted kernel."""
    device = check_same_device(op, **tensors)
    if device.type == "cuda":
        return
    if device.type == "cpu" and is_interpreted(kernel):
        return
    if device.type == "cpu":
        raise ValueError(
            f"{op}: the Triton kernel needs CUDA tensors (got CPU tensors and TRITON_INTERPRET "
            f"was not set when Triton was imported); use {op}_reference on CPU"
        )
    raise ValueError(f"{op}: unsupported device {device}")


def check_float_dtype(op: str, name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name} must have dtype {dtype} (like the other inputs), got {t.dtype}")


def check_index_dtype(op: str, name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{op}: {name} must be {names}, got {t.dtype}")


def check_ndim(op: str, name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(t.shape)}")


def check_last_dim_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must have a contiguous last dimension, got strides {t.stride()}")


def check_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")


def check_paged_cache(op: str, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """Validate a layer's paged KV cache; returns (num_pages, page_size, num_kv_heads, head_dim)."""
    check_ndim(op, "k_cache", k_cache, 4, "[num_pages, page_size, num_kv_heads, head_dim]")
    check_ndim(op, "v_cache", v_cache, 4, "[num_pages, page_size, num_kv_heads, head_dim]")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{op}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    check_float_dtype(op, "k_cache", k_cache)
    check_float_dtype(op, "v_cache", v_cache, k_cache.dtype)
    check_contiguous(op, "k_cache", k_cache)
    check_contiguous(op, "v_cache", v_cache)
    num_pages, page_size, hkv, d = k_cache.shape
    if not 1 <= page_size <= 64:
        raise ValueError(f"{op}: page_size must be in 1..64, got {page_size}")
    return num_pages, page_size, hkv, d


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
