"""The paged KV pool: one K and one V tensor per layer, all pages allocated up front.

Each layer's cache is `[num_pages, page_size, num_kv_heads, head_dim]`, the layout the kernels
in `radixserve.kernels` read and write. A token's slot is `page * page_size + offset`; which
pages belong to which sequence is the radix cache's business (`radix/`), not this module's:
`KVCache` is only storage. Page 0 is an ordinary page; the allocator may reserve it as the
padding target of page tables (ForwardBatch pads with 0 and never reads padding).

    k[layer]: | page 0: P slots x [Hkv, D] | page 1 | ... | page N-1 |
"""

from __future__ import annotations

import numpy as np
import torch

from .model_config import ModelConfig

__all__ = ["KVCache"]


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled cache tensor.

    Why zeros: attention only weights slots inside each sequence, but the PyTorch reference
    kernels gather whole pages (tail slots of a last page, padding page 0) and mask them; a
    masked slot holding NaN or Inf bits (possible in never-written memory) still poisons the
    result (0 * NaN = NaN). Stale finite values from freed pages are harmless, so zeroing once
    at allocation is enough.
    On CPU the zeros come from numpy's calloc: the OS hands out zero pages lazily, so a 2 GiB
    pool costs nothing at startup (torch.zeros would touch every page up front, seconds here).
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = 1
    for n in shape:
        count *= n
    raw = torch.from_numpy(np.zeros(count * itemsize, dtype=np.uint8))
    return raw.view(dtype).view(shape)


class KVCache:
    """Per-layer K/V tensors of a paged pool.

    Invariants: `k[i]` and `v[i]` are contiguous, of shape
    `(num_pages, page_size, num_kv_heads, head_dim)`, of `dtype` on `device`, for every layer i.
    Slots start zeroed (see `_zeros`); a slot is meaningful only while the allocator holds its
    page for a sequence.
    """

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        for name, value in (("num_layers", num_layers), ("num_pages", num_pages),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVCache: {name} must be a positive int, got {value!r}")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= 64:
            raise ValueError(f"KVCache: page_size must be an int in 1..64, got {page_size!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"KVCache: dtype must be a floating type, got {dtype}")
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k: list[torch.Tensor] = [_zeros(shape, dtype, self.device) for _ in range(num_layers)]
        self.v: list[torch.Tensor] = [_zeros(shape, dtype, self.device) for _ in range(num_layers)]

    @classmethod
    def for_model(cls, config: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype,
                  device: torch.device | str) -> KVCache:
        return cls(config.num_layers, num_pages, page_size, config.num_kv_heads, config.head_dim, dtype, device)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of layer i."""
        return self.k[i], self.v[i]

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    @property
    def bytes_per_page(self) -> int:
        """Bytes one page occupies across all layers, K and V."""
        return self.page_bytes(self.num_layers, self.page_size, self.num_kv_heads, self.head_dim, self.dtype)

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_page * self.num_pages

    @staticmethod
    def page_bytes(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * page_size * num_kv_heads * head_dim * itemsize

    @staticmethod
    def pages_for_budget(config: ModelConfig, page_size: int, budget_bytes: int, dtype: torch.dtype) -> int:
        """How many whole pages of `config`'s KV fit in `budget_bytes` (0 if not even one)."""
        if budget_bytes < 0:
            raise ValueError(f"KVCache.pages_for_budget: budget_bytes must be >= 0, got {budget_bytes}")
        per_page = KVCache.page_bytes(config.num_layers, page_size, config.num_kv_heads, config.head_dim, dtype)
        return int(budget_bytes // per_page)

    def __repr__(self) -> str:
        return (f"KVCache(layers={self.num_layers}, pages={self.num_pages}, page_size={self.page_size}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}, "
                f"device={self.device}, {self.total_bytes / 2**20:.1f} MiB)")
