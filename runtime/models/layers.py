"""Linear and embedding layers written for tensor parallelism, used today with tp_size=1.

Each layer owns the shard of the full weight that its rank computes with and a
`weight_loader(param, loaded, shard_id)` that copies the matching slice of a checkpoint
tensor into it, so the model code and the loader do not change when tp_size > 1:

    ColumnParallelLinear    W [out, in] split along `out`: each rank computes a slice of the
                            outputs; no communication (the next layer consumes the shard).
    RowParallelLinear       W [out, in] split along `in`: each rank holds a slice of the inputs;
                            partial sums are all-reduced (a no-op at tp_size=1).
    MergedColumnParallelLinear / QKVParallelLinear
                            several column-parallel projections fused into one matmul
                            (gate|up, q|k|v); checkpoints store them separately, so the loader
                            passes a shard id saying which block a tensor fills.
    VocabParallelEmbedding / ParallelLMHead
                            the vocabulary split into contiguous ranges, one per rank.

Parameters are allocated uninitialized (`torch.empty`) on the target device and dtype: the
loader fills every one, and nothing is materialized twice. On the CPU, `pack_linear_weights`
then gives every projection a oneDNN-packed copy of its weight (kernels/cpu_linear.py), which
its forward uses instead of `F.linear`; the packed copy is taken once, after loading, and is
not updated if the weight changes later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.kernels.cpu_linear import pack_linear_weight, packed_linear

__all__ = [
    "ParallelContext",
    "pack_linear_weights",
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "QKVParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "ParallelLMHead",
]


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in the tensor-parallel group (tp_size=1: a single GPU)."""

    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"ParallelContext: need 0 <= tp_rank < tp_size, got {self.tp_rank}, {self.tp_size}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return x
        raise NotImplementedError("tensor parallelism (tp_size > 1) is not wired up yet")

    def shard(self, size: int, what: str) -> int:
        if size % self.tp_size:
            raise ValueError(f"{what} ({size}) is not divisible by tp_size ({self.tp_size})")
        return size // self.tp_size


def _param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class _PackableWeight(nn.Module):
    """A layer computing `x @ weight.T` whose weight may be swapped for a packed copy."""

    weight: nn.Parameter
    packed_weight: torch.Tensor | None = None

    def pack_weight(self) -> bool:
        """Take a packed copy of the (final) weight for `_matmul`; False where none applies."""
        self.packed_weight = pack_linear_weight(self.weight)
        return self.packed_weight is not None

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed_weight is not None:
            return packed_linear(x, self.packed_weight, bias)
        return F.linear(x, self.weight, bias)


def pack_linear_weights(model: nn.Module) -> int:
    """Pack the weight of every projection of `model` for the CPU (kernels/cpu_linear.py);
    returns how many were packed (0 off the CPU, for non-fp32 weights, or without oneDNN).
    Call it once the weights are loaded: a packed copy does not follow later changes."""
    return sum(m.pack_weight() for m in model.modules() if isinstance(m, _PackableWeight))


class _LinearBase(_PackableWeight):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = _param((out_features, in_features), dtype, device)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        if bias:
            self.bias = _param((out_features,), dtype, device)
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)


def _set_shard_ids(layer: _LinearBase, shard_ids: tuple[object, ...]) -> None:
    # A fused parameter is complete only when every block was loaded; the loader checks this.
    for p in (layer.weight, layer.bias):
        if p is not None:
            p.shard_ids = shard_ids  # type: ignore[attr-defined]


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{what}: checkpoint tensor has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


class ColumnParallelLinear(_LinearBase):
    """y = x W^T + b with W's output rows split across ranks (each rank: out / tp rows)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, dtype: torch.dtype,
                 device: torch.device | str | None = None, parallel: ParallelContext = ParallelContext()) -> None:
        self.parallel = parallel
        super().__init__(in_features, parallel.shard(out_features, "output size"), bias, dtype, device)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        rows = param.shape[0]
        _copy_checked(param.data, loaded.narrow(0, self.parallel.tp_rank * rows, rows), "ColumnParallelLinear")


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one weight (e.g. gate | up).

    Output layout per rank: [block 0 shard | block 1 shard | ...]; `shard_id` is the block index.
    The parameters carry `shard_ids` (all block ids) so a loader can tell a complete fused
    weight from one with a block missing.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False, *, dtype: torch.dtype,
                 device: torch.device | str | None = None, parallel: ParallelContext = ParallelContext()) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(output_sizes), bias, dtype=dtype, device=device, parallel=parallel)
        _set_shard_ids(self, tuple(range(len(self.output_sizes))))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"MergedColumnParallelLinear: bad shard id {shard_id!r}")
        tp = self.parallel
        offset = sum(self.output_sizes[:shard_id]) // tp.tp_size
        size = self.output_sizes[shard_id] // tp.tp_size
        _copy_checked(param.data.narrow(0, offset, size), loaded.narrow(0, tp.tp_rank * size, size),
                      f"MergedColumnParallelLinear block {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """The fused q|k|v projection; heads are split across ranks (KV heads replicated when
    tp_size > num_kv_heads is not supported yet). `shard_id` is "q", "k" or "v"."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False, *,
                 dtype: torch.dtype, device: torch.device | str | None = None,
                 parallel: ParallelContext = ParallelContext()) -> None:
        self.head_dim = head_dim
        self.num_heads = parallel.shard(num_heads, "num_heads")
        self.num_kv_heads = parallel.shard(num_kv_heads, "num_kv_heads")
        out = (num_heads + 2 * num_kv_heads) * head_dim
        super().__init__(hidden_size, out, bias, dtype=dtype, device=device, parallel=parallel)
        _set_shard_ids(self, ("q", "k", "v"))

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        offsets = {"q": (0, self.q_size), "k": (self.q_size, self.kv_size),
                   "v": (self.q_size + self.kv_size, self.kv_size)}
        if shard_id not in offsets:
            raise ValueError(f"QKVParallelLinear: bad shard id {shard_id!r}")
        offset, size = offsets[shard_id]  # type: ignore[index]
        src = loaded.narrow(0, self.parallel.tp_rank * size, size)
        _copy_checked(param.data.narrow(0, offset, size), src, f"QKVParallelLinear {shard_id}")


class RowParallelLinear(_LinearBase):
    """y = all_reduce(x_shard W_shard^T) + b with W's input columns split across ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, dtype: torch.dtype,
                 device: torch.device | str | None = None, parallel: ParallelContext = ParallelContext()) -> None:
        self.parallel = parallel
        super().__init__(parallel.shard(in_features, "input size"), out_features, bias, dtype, device)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param.dim() == 1:  # the bias is added once, after the reduction: not sharded
            _copy_checked(param.data, loaded, "RowParallelLinear bias")
            return
        cols = param.shape[1]
        _copy_checked(param.data, loaded.narrow(1, self.parallel.tp_rank * cols, cols), "RowParallelLinear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.parallel.all_reduce(self._matmul(x))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split into contiguous ranges, one per rank.

    With tp_size > 1, ids outside this rank's range give zero rows and the all-reduce sums the
    ranks' partial lookups; with tp_size=1 it is a plain lookup.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, dtype: torch.dtype,
                 device: torch.device | str | None = None, parallel: ParallelContext = ParallelContext()) -> None:
        super().__init__()
        self.parallel = parallel
        self.num_embeddings = num_embeddings
        self.shard_size = -(-num_embeddings // parallel.tp_size)  # ceil: the last shard may be padded
        self.vocab_start = parallel.tp_rank * self.shard_size
        self.weight = _param((self.shard_size, embedding_dim), dtype, device)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        rows = min(self.shard_size, self.num_embeddings - self.vocab_start)
        if loaded.shape[0] != self.num_embeddings or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(
                f"VocabParallelEmbedding: checkpoint tensor has shape {tuple(loaded.shape)}, "
                f"expected {(self.num_embeddings, *param.shape[1:])}"
            )
        param.data[:rows].copy_(loaded.narrow(0, self.vocab_start, rows))
        if rows < self.shard_size:
            param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        valid = (local >= 0) & (local < self.shard_size)
        out = F.embedding(local.clamp(0, self.shard_size - 1), self.weight) * valid.unsqueeze(-1)
        return self.parallel.all_reduce(out)


# `torch.mm(..., out_dtype=)` (a 16-bit product written as fp32), in torch releases that have it.
_MM_WRITES_FP32 = "dtype" in torch.ops.aten.mm.overloads()


class ParallelLMHead(VocabParallelEmbedding, _PackableWeight):
    """The output projection hidden -> vocab logits, vocabulary-parallel like the embedding
    (with tp_size > 1 each rank computes its vocabulary range; the runner gathers them)."""

    def forward(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """fp32 logits [rows, vocab], into `out` when given. On CUDA with 16-bit weights the
        matmul writes fp32 itself (fp32 accumulation, no bf16 rounding of the logits): a
        separate `.float()` would read and write the [rows, 128k] logits once more (~0.1-0.2 ms
        a step at 256-512 rows on an H100)."""
        if self.parallel.tp_size != 1:
            raise NotImplementedError("vocab-parallel logits gather (tp_size > 1) is not wired up yet")
        w = self.weight
        if out is not None and (out.dtype != torch.float32 or out.shape != (hidden.shape[0], w.shape[0])):
            raise ValueError(f"logits out must be float32 {(hidden.shape[0], w.shape[0])}, "
                             f"got {out.dtype} {tuple(out.shape)}")
        if w.is_cuda and w.dtype in (torch.bfloat16, torch.float16) and _MM_WRITES_FP32:
            if out is None:
                return torch.mm(hidden, w.t(), out_dtype=torch.float32)
            return torch.mm(hidden, w.t(), out_dtype=torch.float32, out=out)
        logits = self._matmul(hidden).float()
        return logits if out is None else out.copy_(logits)
