"""The op registry: which implementation of each kernel op a model calls.

`radixserve.kernels` provides every op twice, a PyTorch reference (the CPU path and the test
oracle) and a Triton kernel (the CUDA path), with the same signatures. A model holds one
`Ops` object and calls `ops.rms_norm(...)`, `ops.extend_attention(...)`, ... without knowing
which backend it got. Backends are registered by name:

    "torch"  -> radixserve.kernels.REFERENCE_OPS (the plain references, the test oracle)
    "cpu"    -> the references with radixserve.kernels.CPU_OPS laid over them (fused CPU
                attention and rotary; CPU tensors only)
    "triton" -> radixserve.kernels.TRITON_OPS

`select_ops(device, "auto")` picks "triton" on CUDA when Triton is importable, "cpu" on the
CPU, and "torch" otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Callable, Mapping

import torch

__all__ = ["Ops", "OPS_BACKENDS", "select_ops", "build_ops"]


@dataclass(frozen=True)
class Ops:
    """One implementation of each op the models call (see radixserve.kernels for contracts)."""

    name: str
    store_kv: Callable[..., None]
    extend_attention: Callable[..., torch.Tensor]
    decode_attention: Callable[..., torch.Tensor]
    shared_prefix_decode_attention: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
    apply_rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[..., torch.Tensor]


_OP_NAMES = tuple(f.name for f in fields(Ops) if f.name != "name")


def _reference_table() -> Mapping[str, Callable[..., object]]:
    from radixserve.kernels import REFERENCE_OPS

    return REFERENCE_OPS


def _cpu_table() -> Mapping[str, Callable[..., object]]:
    from radixserve.kernels import CPU_OPS, REFERENCE_OPS

    return {**REFERENCE_OPS, **CPU_OPS}


def _triton_table() -> Mapping[str, Callable[..., object]]:
    from radixserve.kernels import TRITON_OPS
    from radixserve.kernels._common import HAS_TRITON

    if not HAS_TRITON:
        raise RuntimeError("ops backend 'triton' needs Triton, which is not installed; use 'torch'")
    return TRITON_OPS


# Name -> loader of that backend's op table. Loaders import lazily so that importing this
# module (and therefore the runtime) does not import Triton.
OPS_BACKENDS: Mapping[str, Callable[[], Mapping[str, Callable[..., object]]]] = MappingProxyType({
    "torch": _reference_table,
    "cpu": _cpu_table,
    "triton": _triton_table,
})


def build_ops(name: str) -> Ops:
    """The Ops of backend `name`; ValueError naming the registered backends otherwise."""
    if name not in OPS_BACKENDS:
        raise ValueError(f"unknown ops backend {name!r}; registered: {', '.join(OPS_BACKENDS)}")
    table = OPS_BACKENDS[name]()
    missing = [op for op in _OP_NAMES if op not in table]
    if missing:
        raise RuntimeError(f"ops backend {name!r} lacks {', '.join(missing)}")
    return Ops(name=name, **{op: table[op] for op in _OP_NAMES})


def _triton_available() -> bool:
    try:
        from radixserve.kernels._common import HAS_TRITON
    except ImportError:
        return False
    return HAS_TRITON


def select_ops(device: torch.device | str, name: str = "auto") -> Ops:
    """Ops for `device`: "auto" means Triton on CUDA (when installed), the fast CPU ops on the
    CPU, the PyTorch references otherwise.

    An explicit name is honored as given (e.g. "torch" on CUDA to compare against the reference).
    """
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda" and _triton_available():
            name = "triton"
        else:
            name = "cpu" if device.type == "cpu" else "torch"
    return build_ops(name)
