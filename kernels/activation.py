"""SiLU-and-mul, the gated activation of Llama's MLP: y = silu(x[:, :I]) * x[:, I:].

The input is the fused gate/up projection `[T, 2I]` (gate first, as in HF's
`act_fn(gate_proj(x)) * up_proj(x)`). Arithmetic is fp32 with one rounding to x.dtype at the
end; HF rounds silu's output to the model dtype before the multiply, so bf16 results may
differ from HF by one bf16 ulp, fp32 results match.
"""

from __future__ import annotations

import torch

from ._common import (
    HAS_TRITON,
    check_float_dtype,
    check_last_dim_contiguous,
    check_launch_device,
    check_ndim,
    require_triton,
    tl,
    triton,
)

__all__ = ["silu_and_mul", "silu_and_mul_reference"]


def _validate(x: torch.Tensor) -> None:
    check_ndim("silu_and_mul", "x", x, 2, "[T, 2 * intermediate]")
    if x.shape[1] % 2:
        raise ValueError(f"silu_and_mul: the last dimension must be even (gate | up), got {x.shape[1]}")
    check_float_dtype("silu_and_mul", "x", x)


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """PyTorch path: [T, 2I] -> [T, I]."""
    _validate(x)
    i = x.shape[1] // 2
    xf = x.float()
    return (torch.nn.functional.silu(xf[:, :i]) * xf[:, i:]).to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, y_ptr, stride_x, I, BLOCK: tl.constexpr):
        # Grid: (rows, column blocks). Each program reads BLOCK gate and BLOCK up values.
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < I
        gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + I + offs, mask=mask, other=0.0).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(y_ptr + row * I + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton path: [T, 2I] -> [T, I] (new contiguous tensor)."""
    require_triton("silu_and_mul")
    _validate(x)
    check_launch_device("silu_and_mul", _silu_and_mul_kernel, x=x)
    check_last_dim_contiguous("silu_and_mul", "x", x)
    t, two_i = x.shape
    i = two_i // 2
    y = torch.empty((t, i), dtype=x.dtype, device=x.device)
    if t > 0 and i > 0:
        block = 1024
        _silu_and_mul_kernel[(t, triton.cdiv(i, block))](x, y, x.stride(0), i, BLOCK=block, num_warps=4)
    return y
