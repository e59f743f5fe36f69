"""The radix tree that shares KV pages between requests with common token prefixes.

Requests of agent and RAG workloads repeat long prefixes (system prompts, retrieved
documents, earlier turns of a conversation). Their KV entries are identical, so each
prefix is computed once and its KV pages are shared: this module maps token sequences to
the page indices that hold their KV, so that a new request only prefills its uncached
suffix. It is pure bookkeeping (ints and dicts, no tensors) so it can be tested on CPU and
kept off the device's critical path.

Shape of the tree (page size P = 2, pages in parentheses):

    root ── [1 2 | 3 4] (5, 9) ─┬─ [5 6] (2)           cached: 1 2 3 4 5 6
                                └─ [7 8 | 9 9] (4, 0)  cached: 1 2 3 4 7 8 9 9

* A node holds a run of tokens (`key`, its length a multiple of P) and one page index per P
  tokens (`pages`); children are keyed by the tuple of their first P tokens, so siblings
  always differ within their first page. Only whole pages are shared: a request's partial
  tail page stays private to it.
* `lock_ref` counts the locks held on a node or any of its descendants; a node with
  `lock_ref > 0` is never evicted, and neither is its path to the root. Page indices read
  from the tree are valid only while a lock covering them is held.
* Each `cache_salt` has its own root, so tenants never share a node (nor learn of each
  other's prefixes by timing). The `None` salt is the default root.
* Eviction frees whole unlocked leaves, smallest policy key first (see `eviction.py`),
  through a lazy heap: O(log n) per evicted node, no scan of the tree.

Scheduler protocol, with `P` the page size and `c = cache`:

    m = c.match_prefix(tokens, salt); c.lock(m.node)     # m.pages now belong to the request
    own = allocator.alloc(needed)                         # private pages for the suffix
    ... compute KV up to k tokens (k a multiple of P) ...
    n = c.insert(tokens[:k], pages[:k // P], salt)        # tree adopts pages[n // P:]
    m2 = c.match_prefix(tokens[:k], salt)                 # the tree's pages for [0, k)
    allocator.free(p for p, q in zip(pages, m2.pages) if p != q)   # our duplicates
    pages[:k // P] = m2.pages; c.lock(m2.node); c.unlock(m.node)

On finish the same insert + free of duplicates happens, then `unlock` (no re-match needed),
and the partial tail page, if any, is freed by the request.
"""

from __future__ import annotations

import heapq
from typing import Iterator, NamedTuple, Sequence

from .errors import IntegrityError
from .eviction import EVICTION_POLICIES, EvictionPolicy
from .page_allocator import PageAllocator

__all__ = ["TreeNode", "PrefixMatch", "RadixCache"]

MAX_PAGE_SIZE = 64


class TreeNode:
    """One node of the radix tree: a run of whole pages of tokens and their KV pages.

    Invariants (checked by `RadixCache.check_integrity`):
      * non-root: `len(key) > 0`, `len(key) % P == 0`, `len(pages) * P == len(key)`;
      * `parent.children[key[:P]] is self`;
      * `lock_ref == own_lock + sum(child.lock_ref for child in children)`;
      * a root has an empty key, no pages, no parent and `lock_ref == 0` (locking it is a
        no-op: it holds nothing).

    A node object keeps its identity across splits: splitting moves the *front* of its
    key into a new parent, so a node handed out by `match_prefix` still ends at the same
    token position and locking it still covers the same pages. After eviction or `reset`
    the node is detached (`parent is None`, not a root) and must not be locked again.
    """

    __slots__ = (
        "key",
        "pages",
        "children",
        "parent",
        "lock_ref",
        "own_lock",
        "last_access",
        "hit_count",
        "created",
        "is_root",
        "salt",
    )

    def __init__(
        self,
        key: tuple[int, ...],
        pages: list[int],
        parent: TreeNode | None,
        now: int,
        *,
        is_root: bool = False,
        salt: str | None = None,
    ) -> None:
        self.key = key
        self.pages = pages
        self.children: dict[tuple[int, ...], TreeNode] = {}
        self.parent = parent
        self.lock_ref = 0  # locks on this node or any descendant
        self.own_lock = 0  # locks taken on exactly this node
        self.last_access = now  # logical clock of the cache, not wall time
        self.hit_count = 0
        self.created = now
        self.is_root = is_root
        self.salt = salt  # meaningful on roots only

    @property
    def is_leaf(self) -> bool:
        return not self.children

    @property
    def detached(self) -> bool:
        """True once the node was evicted (or the cache reset): it holds nothing now."""
        return self.parent is None and not self.is_root

    def __repr__(self) -> str:
        if self.is_root:
            return f"TreeNode(root, salt={self.salt!r}, children={len(self.children)})"
        head = ", ".join(map(str, self.key[:8])) + (", ..." if len(self.key) > 8 else "")
        return (
            f"TreeNode(key=({head}) len={len(self.key)}, pages={len(self.pages)}, "
            f"lock_ref={self.lock_ref}, children={len(self.children)})"
        )


class PrefixMatch(NamedTuple):
    """Result of `RadixCache.match_prefix`.

    * `pages`: the KV page of each matched page of tokens, in order (a fresh list the caller
      may keep). Valid only while `node` (or a descendant) is locked: an unlocked page may
      be evicted and handed to another request by the next allocation.
    * `num_tokens`: matched tokens, always `len(pages) * page_size` (so a multiple of it).
    * `node`: the deepest matched node; the match ends exactly at its end, so `lock(node)`
      locks exactly `pages`. The namespace's root when nothing matched (locking it is a
      no-op).
    """

    pages: list[int]
    num_tokens: int
    node: TreeNode


class RadixCache:
    """Radix tree over token ids whose values are KV page indices.

    Page ownership: pages in the tree belong to the tree; `insert` adopts the caller's
    pages beyond the already-cached prefix; `evict` and `reset` give pages back to the
    allocator. The tree never frees a caller's private pages and never allocates.

    Every page of the pool is, at any moment, exactly one of: free in the allocator,
    cached and evictable (`lock_ref == 0`), cached and locked, or private to a running
    request. `check_integrity(private_pages)` verifies that these four counts add up.

    Not thread-safe: the scheduler owns it and calls it from one thread.
    """

    def __init__(self, allocator: PageAllocator, page_size: int = 1, eviction: str = "lru") -> None:
        if isinstance(page_size, bool) or not isinstance(page_size, int):
            raise ValueError(f"page_size must be an int, got {type(page_size).__name__}")
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be in [1, {MAX_PAGE_SIZE}], got {page_size}")
        policy = EVICTION_POLICIES.get(eviction) if isinstance(eviction, str) else None
        if policy is None:
            known = ", ".join(sorted(EVICTION_POLICIES))
            raise ValueError(f"unknown eviction policy {eviction!r}; known: {known}")
        self.allocator = allocator
        self.page_size = page_size
        self.eviction = eviction
        self._priority: EvictionPolicy = policy
        self._clock = 0
        self._roots: dict[str | None, TreeNode] = {}
        self._num_nodes = 0  # non-root nodes
        self._evictable_pages = 0  # pages in nodes with lock_ref == 0
        self._locked_pages = 0  # pages in nodes with lock_ref > 0
        # Lazy min-heap of (policy key, sequence number, node). An entry may be stale (node
        # locked, no longer a leaf, evicted, or touched since): it is re-checked when popped.
        # Invariant: every unlocked leaf has at least one entry whose key is <= its current key.
        self._heap: list[tuple[tuple[int, ...], int, TreeNode]] = []
        self._seq = 0
        self._roots[None] = self._new_root(None)

    # ------------------------------------------------------------------ properties

    @property
    def num_nodes(self) -> int:
        """Number of non-root nodes over all namespaces."""
        return self._num_nodes

    @property
    def cached_pages(self) -> int:
        """Number of pages held by the tree (`evictable_pages + locked_pages`)."""
        return self._evictable_pages + self._locked_pages

    @property
    def evictable_pages(self) -> int:
        """Pages in unlocked nodes: what `evict` could free if asked for everything."""
        return self._evictable_pages

    @property
    def locked_pages(self) -> int:
        """Pages in nodes with `lock_ref > 0` (in use by running requests)."""
        return self._locked_pages

    @property
    def salts(self) -> list[str | None]:
        """Namespaces that currently have a root (`None` always does)."""
        return list(self._roots)

    def all_pages(self) -> Iterator[int]:
        """Yield every page held by the tree (depth-first, all namespaces)."""
        for node in self._iter_nodes():
            yield from node.pages

    # ------------------------------------------------------------------ lookup

    def match_prefix(
        self, tokens: Sequence[int], salt: str | None = None, *, touch: bool = True
    ) -> PrefixMatch:
        """Longest cached prefix of `tokens` (whole pages only) in namespace `salt`.

        Does not change which tokens or pages are cached and takes no lock. It may split
        the last matched node so that the match ends on a node boundary, and it refreshes
        `last_access` / `hit_count` of the matched path (this is what LRU/LFU order by)
        unless `touch=False` (for probes such as ordering the waiting queue, which should
        not count as uses). Only the first `len(tokens) // P * P` tokens are considered.
        Call `lock(node)` before the next `evict` or allocation if the pages are to be used.

        Split when the match ends inside a node (P = 2; tokens 1 2 3 4 7 7):

            before:  root ── [1 2 | 3 4 | 5 6] (8, 3, 6)
            after:   root ── [1 2 | 3 4] (8, 3) ── [5 6] (6)
                                   ^ returned node; pages [8, 3]; num_tokens 4

        The lower part keeps the original node object (and its locks and heap entries).
        """
        P = self.page_size
        root = self._roots.get(salt)
        if root is None:
            # Unknown namespace: nothing cached. A transient root (not registered) keeps
            # `node` a TreeNode without creating a namespace that nothing would ever drop.
            return PrefixMatch([], 0, self._new_root(salt))
        toks = tokens if type(tokens) is tuple else tuple(tokens)
        n = len(toks) - len(toks) % P
        if touch:
            self._clock += 1
        now = self._clock
        node = root
        pos = 0
        pages: list[int] = []
        while pos < n:
            child = node.children.get(toks[pos : pos + P])
            if child is None:
                break
            key = child.key
            end = pos + len(key)
            if end <= n and toks[pos:end] == key:
                # Whole node matched: one C-level tuple comparison, no per-token loop.
                pages += child.pages
                if touch:
                    child.last_access = now
                    child.hit_count += 1
                node = child
                pos = end
                continue
            k = self._common_tokens(key, toks, pos, n)
            upper = self._split(child, k)
            if touch:
                upper.last_access = now
                upper.hit_count += 1
            pages += upper.pages
            node = upper
            pos += k
            break
        return PrefixMatch(pages, pos, node)

    # ------------------------------------------------------------------ locking

    def lock(self, node: TreeNode) -> None:
        """Pin `node` and its ancestors (not the root): none of them can be evicted.

        Each `lock` must be paired with exactly one `unlock` of the same node. Locking a
        root is a no-op (it holds no pages). RuntimeError if the node was evicted.
        """
        if node.is_root:
            return
        if node.parent is None:
            raise RuntimeError("cannot lock a node that was evicted (lock right after match_prefix)")
        node.own_lock += 1
        while not node.is_root:
            if node.lock_ref == 0:
                n = len(node.pages)
                self._evictable_pages -= n
                self._locked_pages += n
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]  # non-roots always have a parent

    def unlock(self, node: TreeNode) -> None:
        """Undo one `lock(node)`. RuntimeError if `node` holds no lock of its own."""
        if node.is_root:
            return
        if node.own_lock <= 0:
            raise RuntimeError(f"unlock without a matching lock on {node!r}")
        node.own_lock -= 1
        leaf = node
        while not node.is_root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                n = len(node.pages)
                self._locked_pages -= n
                self._evictable_pages += n
            node = node.parent  # type: ignore[assignment]
        if leaf.lock_ref == 0 and not leaf.children:
            self._push(leaf)  # became an evictable leaf: it needs a heap entry

    # ------------------------------------------------------------------ insertion

    def insert(self, tokens: Sequence[int], pages: Sequence[int], salt: str | None = None) -> int:
        """Cache `tokens` (whole pages) with their KV `pages`; return the already-cached length.

        `len(pages)` must equal `len(tokens) // P` (ValueError otherwise): pass the request's
        whole pages, tree-owned ones included. Returns `n`, the number of leading tokens that
        were already cached (a multiple of P). The tree adopts `pages[n // P:]`; it frees
        nothing. The caller still owns `pages[:n // P]` that it did not get from the tree
        and must free them (same KV, computed twice):

            P = 2, tree before:  root ── [1 2 | 3 4] (7, 3)
            insert tokens        1 2 | 3 4 | 5 6      pages (7, 8, 9)
                                 └─ cached ┘ └ new ┘
            tree after:          root ── [1 2 | 3 4] (7, 3) ── [5 6] (9)
            returns 4: page 9 now belongs to the tree; page 7 came from the tree (nothing to
            do); page 8 duplicates the tree's page 3, so the caller frees 8.

        Insertion may split a node where the new tokens diverge inside it (same picture as
        in `match_prefix`), and refreshes `last_access` along the path.
        """
        P = self.page_size
        npages = len(pages)
        if npages != len(tokens) // P:
            raise ValueError(
                f"insert needs one page per {P} tokens: {len(tokens)} tokens -> "
                f"{len(tokens) // P} pages, got {npages}"
            )
        if npages == 0:
            return 0
        n = npages * P
        toks = tuple(tokens[:n]) if type(tokens) is not tuple or len(tokens) != n else tokens
        root = self._roots.get(salt)
        if root is None:
            root = self._roots[salt] = self._new_root(salt)
        self._clock += 1
        now = self._clock
        node = root
        pos = 0
        while pos < n:
            child = node.children.get(toks[pos : pos + P])
            if child is None:
                new_pages = list(pages[pos // P :])
                self._check_adoptable(new_pages)
                leaf = TreeNode(toks[pos:], new_pages, node, now)
                leaf.hit_count = 1
                node.children[toks[pos : pos + P]] = leaf
                self._num_nodes += 1
                self._evictable_pages += len(new_pages)
                self._push(leaf)
                return pos
            key = child.key
            end = pos + len(key)
            if end <= n and toks[pos:end] == key:
                child.last_access = now
                node = child
                pos = end
                continue
            k = self._common_tokens(key, toks, pos, n)
            node = self._split(child, k)
            node.last_access = now
            pos += k
            # Loop again: either pos == n (all cached) or the next page finds no child.
        # Fully cached: nothing adopted. A touched leaf keeps its (now older) heap entry,
        # which evict re-queues at the new key when it pops it.
        return pos

    # ------------------------------------------------------------------ eviction

    def evict(self, num_pages: int) -> int:
        """Free at least `num_pages` pages from unlocked leaves, if that many are evictable.

        Leaves go smallest policy key first (LRU: least recently used); a parent whose last
        child goes becomes a candidate in turn. Whole nodes are freed, so the count may
        exceed `num_pages`. Returns the number of pages given back to the allocator (fewer
        than asked only when nothing evictable is left). Cost: O(k log n) for k nodes freed.
        """
        if num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {num_pages}")
        freed = 0
        priority = self._priority
        P = self.page_size
        # self._heap is re-read every round: _push may replace it when it compacts.
        while freed < num_pages and self._heap:
            key, _, node = heapq.heappop(self._heap)
            if node.parent is None or node.children or node.lock_ref:
                continue  # stale: evicted, grew children, or locked since the push
            current = priority(node)
            if current != key:
                # Touched since the push; keys only grow, so re-queue it at its true place.
                self._seq += 1
                heapq.heappush(self._heap, (current, self._seq, node))
                continue
            parent = node.parent
            del parent.children[node.key[:P]]
            node.parent = None
            self.allocator.free(node.pages)
            n = len(node.pages)
            freed += n
            self._evictable_pages -= n
            self._num_nodes -= 1
            if parent.children:
                continue
            if parent.is_root:
                if parent.salt is not None:
                    del self._roots[parent.salt]  # empty namespace: drop it
            elif parent.lock_ref == 0:
                self._push(parent)
        return freed

    def reset(self) -> None:
        """Evict everything (all namespaces). RuntimeError if any node is locked.

        Nodes handed out earlier become detached and must not be locked again.
        """
        if self._locked_pages:
            raise RuntimeError(
                f"cannot reset the radix cache: {self._locked_pages} pages are locked by running requests"
            )
        nodes = list(self._iter_nodes())
        pages = [p for node in nodes for p in node.pages]
        self.allocator.free(pages)
        for node in nodes:
            node.parent = None
            node.children = {}
        self._roots = {None: self._new_root(None)}
        self._heap = []
        self._num_nodes = 0
        self._evictable_pages = 0

    # ------------------------------------------------------------------ checking

    def check_integrity(self, private_pages: int = 0) -> None:
        """Raise `IntegrityError` describing the first broken invariant, if any.

        `private_pages` is the number of pages the caller's running requests hold outside
        the tree (allocated, not yet inserted, or duplicates not yet freed). Checks: the
        allocator's own lists; every node's shape and parent/child links; `lock_ref`
        accounting; pages unique, in range and not free; the cached counters; a heap entry
        for every evictable leaf; and free + evictable + locked + private == pool size.
        O(n) in the size of the tree: for tests and debugging, not the hot path.
        """
        alloc = self.allocator
        alloc.check_integrity()
        P = self.page_size
        if None not in self._roots:
            raise IntegrityError("the default (None) namespace has no root")
        seen: set[int] = set()
        evictable = locked = nodes = 0
        heap_nodes = {id(entry[2]) for entry in self._heap}
        for salt, root in self._roots.items():
            if not root.is_root or root.parent is not None or root.key or root.pages:
                raise IntegrityError(f"root of salt {salt!r} is malformed: {root!r}")
            if root.salt != salt:
                raise IntegrityError(f"root registered under salt {salt!r} says salt {root.salt!r}")
            if root.lock_ref or root.own_lock:
                raise IntegrityError(f"root of salt {salt!r} is locked")
            if salt is not None and not root.children:
                raise IntegrityError(f"empty namespace root for salt {salt!r} was not dropped")
            stack = [root]
            while stack:
                node = stack.pop()
                child_locks = 0
                for first, child in node.children.items():
                    if child.parent is not node:
                        raise IntegrityError(f"{child!r} has the wrong parent")
                    if child.is_root:
                        raise IntegrityError(f"a root is a child of {node!r}")
                    if child.key[:P] != first or len(first) != P:
                        raise IntegrityError(f"{child!r} is filed under {first!r}, not its first page")
                    child_locks += child.lock_ref
                    stack.append(child)
                if node.is_root:
                    continue
                nodes += 1
                if not node.key or len(node.key) % P:
                    raise IntegrityError(f"{node!r}: key length {len(node.key)} is not a positive multiple of {P}")
                if len(node.pages) * P != len(node.key):
                    raise IntegrityError(f"{node!r}: {len(node.pages)} pages for {len(node.key)} tokens")
                if node.own_lock < 0:
                    raise IntegrityError(f"{node!r}: negative own lock count {node.own_lock}")
                if node.lock_ref != node.own_lock + child_locks:
                    raise IntegrityError(
                        f"{node!r}: lock_ref {node.lock_ref} != own {node.own_lock} + children {child_locks}"
                    )
                for p in node.pages:
                    if not isinstance(p, int) or not 0 <= p < alloc.num_pages:
                        raise IntegrityError(f"{node!r}: page {p!r} out of range")
                    if p in seen:
                        raise IntegrityError(f"page {p} is held by two nodes (or twice by one)")
                    seen.add(p)
                    if alloc.is_free(p):
                        raise IntegrityError(f"page {p} is held by {node!r} but free in the allocator")
                if node.lock_ref:
                    locked += len(node.pages)
                else:
                    evictable += len(node.pages)
                    if not node.children and id(node) not in heap_nodes:
                        raise IntegrityError(f"evictable leaf {node!r} has no heap entry: evict would miss it")
        if nodes != self._num_nodes:
            raise IntegrityError(f"num_nodes counter {self._num_nodes} != {nodes} nodes in the tree")
        if evictable != self._evictable_pages:
            raise IntegrityError(f"evictable counter {self._evictable_pages} != {evictable} counted")
        if locked != self._locked_pages:
            raise IntegrityError(f"locked counter {self._locked_pages} != {locked} counted")
        if private_pages < 0:
            raise IntegrityError(f"private_pages must be >= 0, got {private_pages}")
        total = alloc.num_free + evictable + locked + private_pages
        if total != alloc.num_pages:
            raise IntegrityError(
                f"page accounting: free {alloc.num_free} + evictable {evictable} + locked {locked} "
                f"+ private {private_pages} = {total} != pool {alloc.num_pages}"
                + (" (leak)" if total < alloc.num_pages else "")
            )

    # ------------------------------------------------------------------ internals

    def _new_root(self, salt: str | None) -> TreeNode:
        return TreeNode((), [], None, self._clock, is_root=True, salt=salt)

    def _iter_nodes(self) -> Iterator[TreeNode]:
        """All non-root nodes, depth-first."""
        for root in list(self._roots.values()):
            stack = list(root.children.values())
            while stack:
                node = stack.pop()
                yield node
                stack.extend(node.children.values())

    def _common_tokens(self, key: tuple[int, ...], toks: tuple[int, ...], pos: int, n: int) -> int:
        """Length of the common prefix (whole pages) of `key` and `toks[pos:n]`.

        Known: the first page matches (the child was found by it) and the whole key does
        not fit/match. Binary search over pages, comparing only the not-yet-known part of
        each probe, so the C-level comparison work stays O(len(key)):

            key   | a b | c d | e f | g h |
            toks  | a b | c d | e x | ...
                    lo=1 ----> answer 2 pages (4 tokens)
        """
        P = self.page_size
        lo = 1  # pages known to match
        hi = min(len(key), n - pos) // P  # upper bound on matching pages
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if key[lo * P : mid * P] == toks[pos + lo * P : pos + mid * P]:
                lo = mid
            else:
                hi = mid - 1
        return lo * P

    def _split(self, node: TreeNode, k: int) -> TreeNode:
        """Split `node` after its first `k` tokens (0 < k < len(key), k % P == 0).

            parent ── [a b c d e f] (p0 p1 p2)          (P = 2, k = 4)
            parent ── [a b c d] (p0 p1) ── [e f] (p2)
                      ^ new node (returned)  ^ `node`, same object

        The new upper node inherits lock_ref (every lock below `node` is below it too),
        the access stats and the creation tick; it has no locks of its own. Page counts
        per lock state do not change, and `node` keeps its heap entries.
        """
        P = self.page_size
        kp = k // P
        parent = node.parent
        assert parent is not None  # internal invariant: only attached nodes are split
        upper = TreeNode(node.key[:k], node.pages[:kp], parent, node.created)
        upper.lock_ref = node.lock_ref
        upper.last_access = node.last_access
        upper.hit_count = node.hit_count
        parent.children[node.key[:P]] = upper
        node.key = node.key[k:]
        node.pages = node.pages[kp:]
        node.parent = upper
        upper.children[node.key[:P]] = node
        self._num_nodes += 1
        return upper

    def _push(self, node: TreeNode) -> None:
        """Queue an unlocked leaf for eviction; rebuild the heap when stale entries pile up."""
        heap = self._heap
        self._seq += 1
        heapq.heappush(heap, (self._priority(node), self._seq, node))
        if len(heap) > 2 * self._num_nodes + 64:
            self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        """Drop stale entries: one fresh entry per evictable leaf. Amortized O(1) per push."""
        priority = self._priority
        entries = []
        for node in self._iter_nodes():
            if not node.children and node.lock_ref == 0:
                self._seq += 1
                entries.append((priority(node), self._seq, node))
        heapq.heapify(entries)
        self._heap = entries

    def _check_adoptable(self, pages: list[int]) -> None:
        """ValueError unless `pages` are distinct pages handed out by the allocator."""
        if len(set(pages)) != len(pages):
            raise ValueError(f"insert: duplicate page indices in {pages}")
        is_free = self.allocator.is_free
        for p in pages:
            if is_free(p):  # also ValueError when out of range
                raise ValueError(f"insert: page {p} is free in the allocator; only allocated pages can be cached")

    def __repr__(self) -> str:
        return (
            f"RadixCache(page_size={self.page_size}, eviction={self.eviction!r}, nodes={self._num_nodes}, "
            f"cached={self.cached_pages}, locked={self._locked_pages}, namespaces={len(self._roots)})"
        )
