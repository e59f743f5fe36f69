"""skinny_linear (Triton, interpreted on the CPU) vs a float64 matmul, and its input checks."""

from __future__ import annotations

import pytest
import torch

from kernel_test_utils import DEVICE, TOL, assert_close, gpu
from radixserve.kernels.skinny_linear import MAX_ROWS, skinny_linear, skinny_linear_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 16, 32), (5, 40, 96), (17, 33, 70), (64, 48, 64)])
def test_skinny_linear_matches_float64(dtype: torch.dtype, m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    w = torch.randn(n, k, generator=gen).to(dtype).to(DEVICE)
    expected = x.double() @ w.double().T
    assert_close(skinny_linear(x, w), expected, TOL[dtype], f"triton {m}x{n}x{k}")
    assert_close(skinny_linear_reference(x, w), expected, TOL[dtype], f"reference {m}x{n}x{k}")


def test_skinny_linear_strided_rows() -> None:
    """Rows of a wider tensor (a view with row stride > K), as the model's split q/k/v are."""
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(9, 80, generator=gen).to(DEVICE)
    x = wide[:, 8:72]
    w = torch.randn(24, 64, generator=gen).to(DEVICE)
    assert_close(skinny_linear(x, w), x.double() @ w.double().T, TOL[torch.float32], "strided")


def test_skinny_linear_rejects_bad_input() -> None:
    x = torch.zeros(4, 32, device=DEVICE)
    with pytest.raises(ValueError, match="features"):
        skinny_linear(x, torch.zeros(16, 31, device=DEVICE))
    with pytest.raises(TypeError, match="bfloat16"):
        skinny_linear(x, torch.zeros(16, 32, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match="rows"):
        skinny_linear(torch.zeros(MAX_ROWS + 1, 32, device=DEVICE), torch.zeros(16, 32, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        skinny_linear(torch.zeros(32, 4, device=DEVICE).T, torch.zeros(16, 32, device=DEVICE))


@pytest.mark.parametrize("m", [1, 8, 32, 64])
@pytest.mark.parametrize("n,k", [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)], ids=str)
def test_skinny_linear_llama_1b_shapes_gpu(m: int, n: int, k: int) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(m + n)
    x = torch.randn(m, k, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEVICE, generator=gen, dtype=torch.bfloat16) / k**0.5
    assert_close(skinny_linear(x, w), x.double() @ w.double().T, TOL[torch.bfloat16], f"{m}x{n}x{k}")


for _mark in gpu:
    test_skinny_linear_llama_1b_shapes_gpu = _mark(test_skinny_linear_llama_1b_shapes_gpu)
