"""The "cpu" ops backend: the fast CPU implementations laid over the references.

The `*_reference` functions stay the simple, obviously-correct oracle; these are what the CPU
serves with, same signatures and contracts, same results up to fp32 rounding:

    attention (decode, shared-prefix, extend)   kernels/cpu_attention.py: one plan per step,
                                                shared key runs read in place once per group,
                                                PyTorch's fused CPU flash kernel
    rotary                                      here: q and k rotated together when they are
                                                adjacent slices of the fused QKV output
                                                (2 x 7 ops + 2 cats -> 7 ops), bit-identical
    rms_norm, silu_and_mul (fp32)               here: PyTorch's fused rms_norm (6 ops -> 1);
                                                silu then an in-place multiply (no third buffer)

Each op on 2 cores pays a fixed threading cost (far more than its arithmetic at these sizes
when the cores are shared), so fewer, fused ops are what makes the CPU path fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .activation import _validate as _validate_activation
from .activation import silu_and_mul_reference
from .cpu_attention import (
    HAS_CPU_FLASH,
    decode_attention_cpu,
    extend_attention_cpu,
    shared_prefix_decode_attention_cpu,
)
from .rmsnorm import _validate as _validate_rmsnorm
from .rmsnorm import rms_norm_reference
from .rotary import _validate as _validate_rotary

__all__ = [
    "CPU_OPS",
    "apply_rotary_cpu",
    "rms_norm_cpu",
    "silu_and_mul_cpu",
]

def _adjacent_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q [T, Hq, D] and k [T, Hkv, D] as one [T, Hq + Hkv, D] view when k's heads directly
    follow q's in memory (slices of one fused QKV row), else None."""
    t, hq, d = q.shape
    if (k.dtype != q.dtype or k.stride() != q.stride() or q.stride(2) != 1 or q.stride(1) != d
            or k.untyped_storage().data_ptr() != q.untyped_storage().data_ptr()
            or k.data_ptr() != q.data_ptr() + hq * d * q.element_size()):
        return None
    return q.as_strided((t, hq + k.shape[1], d), q.stride())


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[x1 | x2] -> [x1*cos - x2*sin | x2*cos + x1*sin] into a new tensor, with the reference's
    operations in the reference's order (so results are bit-identical) but no concatenation."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    out = torch.empty(xf.shape)
    tmp = torch.empty(x1.shape)
    torch.mul(x1, cos, out=out[..., :half])
    out[..., :half].sub_(torch.mul(x2, sin, out=tmp))
    torch.mul(x2, cos, out=out[..., half:])
    out[..., half:].add_(torch.mul(x1, sin, out=tmp))
    return out.to(x.dtype)


def apply_rotary_cpu(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU path of `apply_rotary` (bit-identical to the reference). Returns new tensors (q_out,
    k_out), which may be two views of one [T, Hq + Hkv, D] buffer."""
    _validate_rotary(positions, q, k, cos_sin_cache)
    half = q.shape[2] // 2
    cs = cos_sin_cache.index_select(0, positions.long()).float()
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    both = _adjacent_heads(q, k)
    if both is None:
        return _rotate(q, cos, sin), _rotate(k, cos, sin)
    out = _rotate(both, cos, sin)
    return out[:, : q.shape[1]], out[:, q.shape[1] :]


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """CPU path of `rms_norm` (contract: `rms_norm_reference`). fp32: PyTorch's fused kernel,
    equal to the reference up to the order of the mean's sum; other dtypes: the reference,
    whose extra rounding before the weight multiply is what HF does."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return rms_norm_reference(x, weight, eps, residual)
    _validate_rmsnorm(x, weight, eps, residual)
    if residual is None:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    h = x + residual
    return F.rms_norm(h, (h.shape[-1],), weight, eps), h


def silu_and_mul_cpu(x: torch.Tensor) -> torch.Tensor:
    """CPU path of `silu_and_mul` (bit-identical to the reference): the product is written
    into silu's output instead of a third buffer."""
    if x.dtype != torch.float32:
        return silu_and_mul_reference(x)
    _validate_activation(x)
    i = x.shape[1] // 2
    return F.silu(x[:, :i]).mul_(x[:, i:])


# Op name -> CPU implementation; ops not listed here use the reference (see runtime/ops.py).
# A torch without the fused CPU flash kernel serves attention with the references instead.

CPU_OPS = {
    **({
        "decode_attention": decode_attention_cpu,
        "shared_prefix_decode_attention": shared_prefix_decode_attention_cpu,
        "extend_attention": extend_attention_cpu,
    } if HAS_CPU_FLASH else {}),
    "apply_rotary": apply_rotary_cpu,
    "rms_norm": rms_norm_cpu,
    "silu_and_mul": silu_and_mul_cpu,
}
