"""RMSNorm with an optional fused residual add, numerically matching HF Llama's LlamaRMSNorm.

    without residual:  y = weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype)
    with residual:     h = x + residual            (in x.dtype, as the model adds it)
                       y = weight * (h_fp32 * rsqrt(mean(h_fp32^2) + eps)).to(x.dtype)
                       returns (y, h)

The statistics are always fp32; the normalized value is rounded to x.dtype before the weight
multiply (that rounding is what HF does, and matching it keeps greedy outputs identical to the
transformers peer). The output dtype is x.dtype. `x` and `residual` may have a strided row
axis (last dimension contiguous); outputs are new contiguous tensors.
"""

from __future__ import annotations

import torch

from ._common import (
    HAS_TRITON,
    check_float_dtype,
    check_last_dim_contiguous,
    check_launch_device,
    check_ndim,
    next_power_of_2,
    require_triton,
    tl,
    triton,
)

__all__ = ["rms_norm", "rms_norm_reference"]


def _validate(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None) -> None:
    op = "rms_norm"
    check_ndim(op, "x", x, 2, "[T, H]")
    check_ndim(op, "weight", weight, 1, "[H]")
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"{op}: weight has {weight.shape[0]} entries for hidden size {x.shape[1]}")
    check_float_dtype(op, "x", x)
    check_float_dtype(op, "weight", weight)
    if residual is not None:
        check_ndim(op, "residual", residual, 2, "[T, H]")
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual {tuple(residual.shape)} and x {tuple(x.shape)} differ in shape")
        check_float_dtype(op, "residual", residual, x.dtype)
    if not isinstance(eps, (float, int)) or eps < 0:
        raise ValueError(f"{op}: eps must be a non-negative float, got {eps!r}")


def _norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    hf = h.float()
    variance = hf.pow(2).mean(-1, keepdim=True)
    normed = (hf * torch.rsqrt(variance + eps)).to(h.dtype)
    return (weight * normed).to(h.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """PyTorch path. Returns y, or (y, h) with h = x + residual when `residual` is given."""
    _validate(x, weight, eps, residual)
    if residual is None:
        return _norm(x, weight, eps)
    h = x + residual
    return _norm(h, weight, eps), h


if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, y_ptr, h_ptr,
        stride_x, stride_r, eps, H,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # One program per row; the whole row is one tile (H <= 65536 is enforced by the launcher).
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < H
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
            # Round the sum to the activation dtype exactly like `x + residual` in PyTorch.
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(h_ptr + row * H + offs, x, mask=mask)
        hf = x.to(tl.float32)
        var = tl.sum(hf * hf, axis=0) / H
        rstd = tl.rsqrt(var + eps)
        normed = (hf * rstd).to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * H + offs, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton path, same contract as `rms_norm_reference`."""
    require_triton("rms_norm")
    _validate(x, weight, eps, residual)
    tensors = {"x": x, "weight": weight} | ({"residual": residual} if residual is not None else {})
    check_launch_device("rms_norm", _rms_norm_kernel, **tensors)
    check_last_dim_contiguous("rms_norm", "x", x)
    check_last_dim_contiguous("rms_norm", "weight", weight)
    if residual is not None:
        check_last_dim_contiguous("rms_norm", "residual", residual)
    t, hidden = x.shape
    if hidden > 65536:
        raise ValueError(f"rms_norm: hidden size {hidden} > 65536 is not supported by the Triton kernel")
    y = torch.empty((t, hidden), dtype=x.dtype, device=x.device)
    h = torch.empty_like(y) if residual is not None else y
    if t > 0:
        block = next_power_of_2(hidden)
        num_warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
        _rms_norm_kernel[(t,)](
            x, residual if residual is not None else x, weight, y, h,
            x.stride(0), residual.stride(0) if residual is not None else 0, float(eps), hidden,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
        )
    return (y, h) if residual is not None else y
