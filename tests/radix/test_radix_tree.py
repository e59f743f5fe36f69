"""Unit tests of RadixCache: match/split, insert, locking, eviction order, salts, errors."""

from __future__ import annotations

import time

import pytest

from radixserve.radix import (
    EVICTION_POLICIES,
    IntegrityError,
    PageAllocator,
    PrefixMatch,
    RadixCache,
)


def make(num_pages: int = 64, page_size: int = 1, eviction: str = "lru") -> tuple[PageAllocator, RadixCache]:
    alloc = PageAllocator(num_pages)
    return alloc, RadixCache(alloc, page_size=page_size, eviction=eviction)


def cache_seq(cache: RadixCache, tokens: list[int], salt: str | None = None, private: int = 0) -> list[int]:
    """Do what the scheduler does for a finished request; return the tree's pages for it.

    match + lock, allocate the uncached whole pages, insert, free duplicates, unlock.
    `private` is how many pages other (running) requests hold outside the tree.
    """
    P = cache.page_size
    m = cache.match_prefix(tokens, salt)
    cache.lock(m.node)
    own = cache.allocator.alloc(len(tokens) // P - len(m.pages))
    pages = m.pages + own
    n = cache.insert(tokens, pages, salt)
    assert n >= m.num_tokens
    cache.allocator.free(pages[m.num_tokens // P : n // P])
    cache.unlock(m.node)
    cache.check_integrity(private_pages=private)
    return cache.match_prefix(tokens, salt).pages


# ---------------------------------------------------------------- construction


def test_validation_of_page_size_and_policy() -> None:
    alloc = PageAllocator(8)
    for bad in (0, 65, -1, 2.0, True):
        with pytest.raises(ValueError, match="page_size"):
            RadixCache(alloc, page_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="known: fifo, lfu, lru"):
        RadixCache(alloc, eviction="mru")
    assert {"lru", "lfu"} <= set(EVICTION_POLICIES)
    with pytest.raises(TypeError):
        EVICTION_POLICIES["x"] = EVICTION_POLICIES["lru"]  # type: ignore[index]
    for size in (1, 4, 16, 64):
        RadixCache(alloc, page_size=size).check_integrity()


def test_empty_cache_matches_nothing() -> None:
    alloc, cache = make()
    m = cache.match_prefix([1, 2, 3])
    assert isinstance(m, PrefixMatch)
    assert m.pages == [] and m.num_tokens == 0 and m.node.is_root
    cache.lock(m.node)  # no-op on a root
    cache.unlock(m.node)
    assert cache.num_nodes == 0 and cache.cached_pages == 0
    cache.check_integrity()


# ---------------------------------------------------------------- insert / match / split


def test_insert_returns_cached_length_and_adopts_the_rest() -> None:
    alloc, cache = make()
    p1 = alloc.alloc(4)
    assert cache.insert([1, 2, 3, 4], p1) == 0
    assert cache.cached_pages == 4 and cache.evictable_pages == 4
    p2 = alloc.alloc(6)
    assert cache.insert([1, 2, 3, 4, 5, 6], p2) == 4
    # The caller frees its duplicates for the cached range.
    alloc.free(p2[:4])
    cache.check_integrity()
    m = cache.match_prefix([1, 2, 3, 4, 5, 6, 7])
    assert m.pages == p1 + p2[4:] and m.num_tokens == 6
    # Fully cached: nothing adopted.
    p3 = alloc.alloc(3)
    assert cache.insert([1, 2, 3], p3) == 3
    alloc.free(p3)
    cache.check_integrity()


def test_match_splits_node_and_keeps_node_identity() -> None:
    alloc, cache = make()
    pages = alloc.alloc(6)
    cache.insert([1, 2, 3, 4, 5, 6], pages)
    full = cache.match_prefix([1, 2, 3, 4, 5, 6])
    assert cache.num_nodes == 1
    m = cache.match_prefix([1, 2, 3, 9])
    assert m.num_tokens == 3 and m.pages == pages[:3]
    assert cache.num_nodes == 2  # split into [1 2 3] -> [4 5 6]
    assert m.node.key == (1, 2, 3) and full.node.key == (4, 5, 6)
    assert full.node.parent is m.node
    cache.check_integrity()
    # The earlier match's node still covers all six pages: lock it, nothing is evictable.
    cache.lock(full.node)
    assert cache.locked_pages == 6 and cache.evictable_pages == 0
    assert m.node.lock_ref == 1 and m.node.own_lock == 0
    assert cache.evict(10) == 0
    cache.unlock(full.node)
    cache.check_integrity()


def test_insert_diverging_inside_a_node_splits_it() -> None:
    alloc, cache = make()
    a = alloc.alloc(5)
    cache.insert([1, 2, 3, 4, 5], a)
    b = alloc.alloc(5)
    assert cache.insert([1, 2, 7, 8, 9], b) == 2
    alloc.free(b[:2])
    assert cache.num_nodes == 3
    assert cache.match_prefix([1, 2, 3, 4, 5]).pages == a
    assert cache.match_prefix([1, 2, 7, 8, 9]).pages == a[:2] + b[2:]
    assert cache.match_prefix([1, 2, 7, 0]).num_tokens == 3
    cache.check_integrity()


def test_insert_shorter_than_a_node_splits_without_adopting() -> None:
    alloc, cache = make()
    a = alloc.alloc(6)
    cache.insert([1, 2, 3, 4, 5, 6], a)
    b = alloc.alloc(3)
    assert cache.insert([1, 2, 3], b) == 3
    alloc.free(b)
    assert cache.num_nodes == 2 and cache.cached_pages == 6
    cache.check_integrity()


def test_insert_validates_lengths_and_pages() -> None:
    alloc, cache = make(page_size=2)
    with pytest.raises(ValueError, match="one page per 2 tokens"):
        cache.insert([1, 2, 3, 4], [0])
    with pytest.raises(ValueError, match="free in the allocator"):
        cache.insert([1, 2], [5])  # never allocated
    pages = alloc.alloc(2)
    with pytest.raises(ValueError, match="duplicate"):
        cache.insert([1, 2, 3, 4], [pages[0], pages[0]])
    assert cache.insert([1], []) == 0  # less than a page: nothing to cache
    assert cache.num_nodes == 0
    alloc.free(pages)
    cache.check_integrity()


@pytest.mark.parametrize("P", [1, 4, 16])
def test_page_sizes_share_only_whole_pages(P: int) -> None:
    alloc, cache = make(num_pages=64, page_size=P)
    base = list(range(100, 100 + 3 * P))  # three pages
    pages = cache_seq(cache, base + [7] * (P - 1 if P > 1 else 0))  # partial tail is not cached
    assert len(pages) == 3
    # A prompt diverging in the middle of page 2 only shares page 1 (and page 0).
    probe = base[: P + P // 2] + [-1] * (3 * P)
    m = cache.match_prefix(probe)
    expected_pages = (P + P // 2) // P
    assert m.num_tokens == expected_pages * P and m.num_tokens % P == 0
    assert m.pages == pages[:expected_pages]
    # Tokens are truncated to whole pages before matching.
    m = cache.match_prefix(base[: 2 * P + P - 1])
    assert m.num_tokens == (2 * P if P > 1 else 2) and len(m.pages) * P == m.num_tokens
    # Every node's key is whole pages.
    cache.check_integrity()
    for node in cache._iter_nodes():
        assert len(node.key) % P == 0 and len(node.pages) * P == len(node.key)
    # Siblings that differ only after their first page live under one child keyed by it.
    other = base[:P] + [5] * (2 * P)
    cache_seq(cache, other)
    root = cache._roots[None]
    assert list(root.children) == [tuple(base[:P])]
    cache.check_integrity()


def test_match_shorter_than_a_page_is_empty() -> None:
    alloc, cache = make(page_size=4)
    cache_seq(cache, [1, 2, 3, 4, 5, 6, 7, 8])
    m = cache.match_prefix([1, 2, 3])
    assert m.num_tokens == 0 and m.node.is_root


# ---------------------------------------------------------------- locking


def test_lock_unlock_counts_and_errors() -> None:
    alloc, cache = make()
    cache_seq(cache, [1, 2, 3, 4])
    cache_seq(cache, [1, 2, 5, 6])
    m_long = cache.match_prefix([1, 2, 3, 4])
    m_short = cache.match_prefix([1, 2])
    cache.lock(m_long.node)
    cache.lock(m_short.node)
    cache.lock(m_short.node)
    assert m_short.node.lock_ref == 3 and m_short.node.own_lock == 2
    assert cache.locked_pages == 4 and cache.evictable_pages == 2
    cache.check_integrity()
    cache.unlock(m_short.node)
    cache.unlock(m_short.node)
    with pytest.raises(RuntimeError, match="without a matching lock"):
        cache.unlock(m_short.node)  # its own locks are gone, even though lock_ref is 1
    cache.unlock(m_long.node)
    with pytest.raises(RuntimeError):
        cache.unlock(m_long.node)
    assert cache.locked_pages == 0 and cache.evictable_pages == 6
    cache.check_integrity()


def test_lock_of_evicted_node_is_an_error() -> None:
    alloc, cache = make()
    cache_seq(cache, [1, 2, 3])
    m = cache.match_prefix([1, 2, 3])
    assert cache.evict(3) == 3
    assert m.node.detached
    with pytest.raises(RuntimeError, match="evicted"):
        cache.lock(m.node)


def test_check_integrity_reports_broken_lock_accounting_and_leaks() -> None:
    alloc, cache = make(num_pages=8)
    cache_seq(cache, [1, 2, 3])
    m = cache.match_prefix([1, 2, 3])
    m.node.lock_ref += 1  # corrupt
    with pytest.raises(IntegrityError, match="lock_ref"):
        cache.check_integrity()
    m.node.lock_ref -= 1
    cache.check_integrity()
    alloc.alloc(2)  # pages that nobody reports as private: a leak
    with pytest.raises(IntegrityError, match="leak"):
        cache.check_integrity()
    cache.check_integrity(private_pages=2)


# ---------------------------------------------------------------- eviction


def test_lru_eviction_order() -> None:
    alloc, cache = make()
    cache_seq(cache, [1, 1])  # oldest
    cache_seq(cache, [2, 2])
    cache_seq(cache, [3, 3])
    cache.match_prefix([1, 1])  # touch: now the newest
    assert cache.evict(1) == 2  # whole leaf [2 2]
    assert cache.match_prefix([2, 2]).num_tokens == 0
    assert cache.evict(2) == 2
    assert cache.match_prefix([3, 3]).num_tokens == 0
    assert cache.match_prefix([1, 1]).num_tokens == 2
    cache.check_integrity()


def test_eviction_exposes_parents_and_skips_locked() -> None:
    alloc, cache = make()
    cache_seq(cache, [1, 2, 3, 4])
    cache_seq(cache, [1, 2, 5, 6])  # root -> [1 2] -> {[3 4], [5 6]}
    locked = cache.match_prefix([1, 2, 5, 6])
    cache.lock(locked.node)
    assert cache.evict(100) == 2  # only [3 4]; [1 2] and [5 6] are pinned
    assert cache.cached_pages == 4 and cache.evictable_pages == 0
    cache.unlock(locked.node)
    cache.check_integrity()
    assert cache.evict(100) == 4  # leaf, then its parent once it became a leaf
    assert cache.num_nodes == 0 and alloc.num_free == alloc.num_pages
    cache.check_integrity()


def test_untouched_probe_does_not_refresh_lru() -> None:
    alloc, cache = make()
    cache_seq(cache, [1, 1])  # oldest
    cache_seq(cache, [2, 2])
    m = cache.match_prefix([1, 1, 5], touch=False)
    assert m.num_tokens == 2
    assert cache.evict(1) == 2
    assert cache.match_prefix([1, 1]).num_tokens == 0  # still the LRU victim
    assert cache.match_prefix([2, 2]).num_tokens == 2


def test_lfu_prefers_evicting_rarely_used() -> None:
    alloc, cache = make(eviction="lfu")
    cache_seq(cache, [1])
    cache_seq(cache, [2])
    for _ in range(3):
        cache.match_prefix([1])
    cache.match_prefix([2])  # most recent but fewer hits
    assert cache.evict(1) == 1
    assert cache.match_prefix([1]).num_tokens == 1
    assert cache.match_prefix([2]).num_tokens == 0


def test_evict_zero_and_negative() -> None:
    alloc, cache = make()
    cache_seq(cache, [1, 2])
    assert cache.evict(0) == 0
    with pytest.raises(ValueError):
        cache.evict(-1)


def test_reset_frees_everything_unless_locked() -> None:
    alloc, cache = make()
    cache_seq(cache, [1, 2, 3])
    cache_seq(cache, [1, 2, 3], salt="t")
    m = cache.match_prefix([1, 2])
    cache.lock(m.node)
    with pytest.raises(RuntimeError, match="locked"):
        cache.reset()
    cache.unlock(m.node)
    cache.reset()
    assert alloc.num_free == alloc.num_pages and cache.num_nodes == 0
    assert list(cache.all_pages()) == [] and cache.salts == [None]
    cache.check_integrity()
    with pytest.raises(RuntimeError):
        cache.lock(m.node)


def test_all_pages_and_counters() -> None:
    alloc, cache = make()
    a = cache_seq(cache, [1, 2, 3])
    b = cache_seq(cache, [1, 9])
    assert sorted(cache.all_pages()) == sorted(set(a) | set(b))
    assert cache.cached_pages == 4 == cache.evictable_pages + cache.locked_pages


# ---------------------------------------------------------------- salts


def test_salts_never_share_nodes() -> None:
    alloc, cache = make()
    a = cache_seq(cache, [1, 2, 3, 4], salt="alice")
    assert cache.match_prefix([1, 2, 3, 4]).num_tokens == 0  # default namespace
    assert cache.match_prefix([1, 2, 3, 4], salt="bob").num_tokens == 0
    b = cache_seq(cache, [1, 2, 3, 4], salt="bob")
    assert set(a).isdisjoint(b)
    assert cache.match_prefix([1, 2, 3, 4], salt="alice").pages == a
    assert cache.match_prefix([1, 2, 3, 4], salt="bob").pages == b
    assert set(cache.salts) == {None, "alice", "bob"}
    cache.check_integrity()


def test_eviction_spans_namespaces_and_drops_empty_roots() -> None:
    alloc, cache = make()
    cache_seq(cache, [1, 2], salt="a")  # oldest
    cache_seq(cache, [1, 2])
    cache_seq(cache, [1, 2], salt="b")
    assert cache.evict(1) == 2
    assert cache.salts == [None, "b"]  # "a" was emptied and dropped
    assert cache.evict(2) == 2
    assert cache.salts == [None, "b"]  # the default root always stays
    cache.check_integrity()
    assert cache.evict(5) == 2
    assert cache.salts == [None]
    cache.check_integrity()


def test_match_in_unknown_salt_does_not_create_namespace() -> None:
    alloc, cache = make()
    m = cache.match_prefix([1, 2], salt="nobody")
    assert m.num_tokens == 0 and m.node.is_root and m.node.salt == "nobody"
    cache.lock(m.node)
    cache.unlock(m.node)
    assert cache.salts == [None]


# ---------------------------------------------------------------- scheduler protocol


def test_chunked_prefill_handoff_with_rematch() -> None:
    """A running request hands its computed pages to the tree after each chunk.

    Meanwhile another request caches the same prefix; the re-match swaps the request's
    duplicate pages for the tree's and frees them.
    """
    P = 2
    alloc, cache = make(num_pages=32, page_size=P)
    prompt = list(range(1, 13))  # 12 tokens, 6 pages
    m = cache.match_prefix(prompt[:-1])
    cache.lock(m.node)
    pages = m.pages + alloc.alloc(len(prompt) // P - len(m.pages))
    private = len(pages) - len(m.pages)
    node = m.node
    # Someone else finishes the first 4 tokens meanwhile.
    other = cache_seq(cache, prompt[:4], private=private)
    cache.check_integrity(private_pages=private)
    for k in (6, 12):  # end of each chunk, in tokens (multiples of P)
        n = cache.insert(prompt[:k], pages[: k // P])
        m2 = cache.match_prefix(prompt[:k])
        assert m2.num_tokens == k and n <= k
        dup = [p for p, q in zip(pages, m2.pages) if p != q]
        alloc.free(dup)
        pages[: k // P] = m2.pages
        cache.lock(m2.node)
        cache.unlock(node)
        node = m2.node
        private = len(pages) - k // P
        cache.check_integrity(private_pages=private)
    assert pages[:2] == other
    cache.unlock(node)
    assert cache.locked_pages == 0 and cache.cached_pages == 6
    assert cache.evict(100) == 6 and alloc.num_free == alloc.num_pages


# ---------------------------------------------------------------- speed


def test_hot_path_is_fast_enough() -> None:
    """4096-token prompts over a tree of ~2000 nodes: match/insert well under a millisecond-ish."""
    P = 16
    alloc, cache = make(num_pages=40_000, page_size=P)
    system = list(range(1000, 1000 + 2048))
    for i in range(1000):
        doc = [i] * 64 + list(range(i * 7, i * 7 + 64))
        toks = system + doc
        pages = alloc.alloc(len(toks) // P)
        n = cache.insert(toks, pages)
        alloc.free(pages[: n // P])
    assert cache.num_nodes >= 1000
    prompt = system + [500] * 64 + list(range(3500, 3564)) + list(range(2000))
    t0 = time.perf_counter()
    for _ in range(200):
        m = cache.match_prefix(prompt)
    per_match = (time.perf_counter() - t0) / 200
    assert m.num_tokens == 2048 + 128
    t0 = time.perf_counter()
    freed = cache.evict(5000)
    assert freed >= 5000
    evict_time = time.perf_counter() - t0
    cache.check_integrity()
    # Generous bounds (shared CI cores); typical numbers are ~20 us and ~5 ms.
    assert per_match < 2e-3, per_match
    assert evict_time < 0.5, evict_time
