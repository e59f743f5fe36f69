"""fp32 linear layers on the CPU through oneDNN, with each weight reordered once at load.

`F.linear` on the CPU calls MKL's sgemm, which re-packs the weight into its blocked layout on
every call. At serving shapes that is most of the work: a decode step multiplies 32 rows by
each weight, and the LM head's weight (49152 x 576 for the default model) is re-packed 32
steps in a row. oneDNN can take the weight already in its blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, the packing torch.compile's CPU "freezing" uses),
so the runtime packs every projection once after loading. Measured on the 2-core CI machine
(fp32, 2 threads, median of 20):

    rows x (in -> out)            F.linear          packed
    32 x (576 -> 3072)            1.36 ms  83 GF    0.95 ms 119 GF
    32 x (576 -> 49152) LM head  43.7 ms   41 GF   17.8 ms  102 GF
    2048 x (576 -> 3072)         50.0 ms  145 GF   53.4 ms  136 GF   (large M: a wash)

Results equal `F.linear` up to fp32 summation order. The ops are private (present since
torch 2.1 in builds with oneDNN); where they are missing, `pack_linear_weight` returns None and
the layer keeps `F.linear`.
"""

from __future__ import annotations

import torch

__all__ = ["HAS_PACKED_LINEAR", "pack_linear_weight", "packed_linear"]

HAS_PACKED_LINEAR = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)

# The row count oneDNN tunes the layout for; any row count works with it (measured: 1..2048
# rows within 10% of a layout tuned for exactly that count).
_ROWS_HINT = 32


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """An opaque oneDNN copy of `weight` [out, in] for `packed_linear`, or None where packing
    does not apply (not an fp32 CPU matrix, or a torch without oneDNN's linear ops)."""
    if not HAS_PACKED_LINEAR or weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _ROWS_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for the weight `packed` came from; x [..., in] fp32 on the CPU."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"packed_linear takes fp32 CPU inputs, got {x.dtype} on {x.device}")
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
