"""oneDNN-packed fp32 linear layers (kernels/cpu_linear.py) against a float64 matmul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radixserve.kernels.cpu_linear import HAS_PACKED_LINEAR, pack_linear_weight, packed_linear

needs_onednn = pytest.mark.skipif(not HAS_PACKED_LINEAR, reason="this torch has no oneDNN linear ops")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 3, 32, 257])
@pytest.mark.parametrize("in_f,out_f", [(64, 96), (576, 1536), (17, 5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_float64(rows, in_f, out_f, with_bias):
    g = torch.Generator().manual_seed(rows * 1000 + in_f + out_f)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    x = torch.randn(rows, in_f, generator=g)
    b = torch.randn(out_f, generator=g) if with_bias else None
    packed = pack_linear_weight(w)
    assert packed is not None
    got = packed_linear(x, packed, b)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == (rows, out_f) and got.dtype == torch.float32
    # fp32 sums of in_f products of unit-scale terms: the same bound F.linear meets.
    fp32 = F.linear(x, w, b)
    tol = 4 * max((fp32.double() - want).abs().max().item(), 1e-6)
    assert (got.double() - want).abs().max().item() <= tol


@needs_onednn
def test_packed_linear_takes_leading_dims_and_strided_rows():
    w = torch.randn(48, 40)
    packed = pack_linear_weight(w)
    x = torch.randn(2, 5, 80)[..., ::2]  # non-contiguous last dim
    got = packed_linear(x, packed)
    assert got.shape == (2, 5, 48)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_no_packing_where_it_does_not_apply():
    assert pack_linear_weight(torch.randn(8, 4, dtype=torch.bfloat16)) is None
    assert pack_linear_weight(torch.randn(8)) is None
    assert pack_linear_weight(torch.randn(2, 8, 4)) is None


@needs_onednn
def test_packed_linear_rejects_other_dtypes():
    packed = pack_linear_weight(torch.randn(8, 4))
    with pytest.raises(ValueError, match="fp32 CPU"):
        packed_linear(torch.randn(3, 4, dtype=torch.bfloat16), packed)
