"""radixserve.radix: prefix sharing of paged KV cache through a radix tree over token ids.

This package is the bookkeeping half of RadixAttention: `PageAllocator` tracks which KV
page indices are free, and `RadixCache` maps cached token prefixes to the pages holding
their KV, so that requests sharing a prefix (system prompt, documents, earlier turns)
compute it once. It is pure Python (no torch, nothing else of radixserve) so the scheduler
can call it on its hot path without device synchronization and tests run anywhere; the KV
tensors themselves live in `runtime/`'s KV pool, indexed by these page numbers.

See `tree.py` for the scheduler protocol (match, lock, insert, free duplicates, unlock).
"""

from .errors import IntegrityError, OutOfPages
from .eviction import EVICTION_POLICIES, EvictionPolicy
from .page_allocator import PageAllocator
from .tree import PrefixMatch, RadixCache, TreeNode

__all__ = [
    "PageAllocator",
    "OutOfPages",
    "RadixCache",
    "PrefixMatch",
    "TreeNode",
    "IntegrityError",
    "EVICTION_POLICIES",
    "EvictionPolicy",
]
