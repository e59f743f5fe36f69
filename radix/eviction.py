"""Eviction policies of the radix cache, as a registry of priority functions.

A policy maps a tree node to a sort key; `RadixCache.evict` frees the evictable leaf with
the *smallest* key first. Keeping policies as data (name -> function) instead of an
if/elif chain in the tree lets a new policy be added in one line and lets the config
validate a policy name against `EVICTION_POLICIES` before the engine starts.

Contract a policy must keep, because the cache uses a lazy heap (entries are not updated
when a node is touched, only re-checked when popped): a node's key may only grow or stay
equal over the node's life. Touches (`last_access`, `hit_count`) only ever increase, so
keys built from them, or from the constant `created`, qualify.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Mapping

if TYPE_CHECKING:
    from .tree import TreeNode

__all__ = ["EvictionPolicy", "EVICTION_POLICIES"]

EvictionPolicy = Callable[["TreeNode"], tuple[int, ...]]
"""Maps a node to its eviction key: smaller is evicted first; must never decrease."""


def _lru(node: TreeNode) -> tuple[int, ...]:
    # Least recently used first.
    return (node.last_access,)


def _lfu(node: TreeNode) -> tuple[int, ...]:
    # Fewest hits first; among equals, least recently used first.
    return (node.hit_count, node.last_access)


def _fifo(node: TreeNode) -> tuple[int, ...]:
    # Oldest insertion first, whatever its use since (a baseline for benchmarks).
    return (node.created,)


# Read-only view: the registry is fixed at import time (no module-level mutable state).
EVICTION_POLICIES: Mapping[str, EvictionPolicy] = MappingProxyType(
    {"lru": _lru, "lfu": _lfu, "fifo": _fifo}
)
