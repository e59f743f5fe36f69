"""Property-based tests: random scheduler-like operation sequences against a reference model.

The reference model is a plain dict per salt, `{token prefix (whole pages): page}`, holding
every cached page-aligned prefix, plus the logical time each prefix was last touched. The
state machine drives the cache the way the scheduler does (match + lock, allocate, chunked
insert + re-match, finish, abort, evict) and after every step checks:

* `check_integrity(private_pages=...)` (every page is free, evictable, locked or private);
* the tree's contents equal the model's exactly (same prefixes, same pages);
* match lengths and pages equal the model's longest cached prefix;
* eviction only removes unlocked prefixes, frees exactly what it reports, stops early only
  when nothing is evictable, and (LRU) never evicts something touched later than a leaf it
  leaves behind;
* at the end, with every request gone and everything evicted, all pages are free (no leak).
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from radixserve.radix import PageAllocator, RadixCache, TreeNode

SALTS = st.sampled_from([None, "a", "b"])
Prefix = tuple[int, ...]


@dataclass
class Request:
    salt: str | None
    tokens: tuple[int, ...]
    node: TreeNode  # locked node; covers pages[: locked // P]
    locked: int  # tokens whose pages came from the tree (multiple of P)
    pages: list[int]  # one per whole page of tokens: tree pages, then private ones
    tail: list[int]  # the private partial page, if the prompt does not end on a page


def token_seqs(P: int) -> st.SearchStrategy[tuple[int, ...]]:
    """Prompts built from a few page patterns, so prefixes are shared often.

    A mutation inside a page makes prompts diverge mid-page (only whole pages may be
    shared), and a partial tail checks that it is never cached.
    """

    def build(pats: list[int], mutate: int | None, tail: int) -> tuple[int, ...]:
        toks = [t for pat in pats for t in [pat] * P] if P > 1 else list(pats)
        if P > 1:
            # Distinguish positions inside a page so that pages are not all-equal runs.
            toks = [t * 10 + i % P for i, t in enumerate(toks)]
        if mutate is not None and toks:
            toks[mutate % len(toks)] = 99
        toks += [7] * tail
        return tuple(toks)

    return st.builds(
        build,
        st.lists(st.integers(0, 2), max_size=6),
        st.none() | st.integers(0, 100),
        st.integers(0, P - 1),
    )


class RadixMachine(RuleBasedStateMachine):
    P = 1
    POLICY = "lru"
    NUM_PAGES = 24
    MAX_RUNNING = 4

    def __init__(self) -> None:
        super().__init__()
        self.alloc = PageAllocator(self.NUM_PAGES)
        self.cache = RadixCache(self.alloc, page_size=self.P, eviction=self.POLICY)
        self.model: dict[str | None, dict[Prefix, int]] = {}
        self.ticks: dict[str | None, dict[Prefix, int]] = {}
        self.clock = 0
        self.running: list[Request] = []

    # ------------------------------------------------------------ model helpers

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def longest(self, salt: str | None, tokens: tuple[int, ...]) -> int:
        cached = self.model.get(salt, {})
        P, k = self.P, 0
        while k + P <= len(tokens) and tokens[: k + P] in cached:
            k += P
        return k

    def model_pages(self, salt: str | None, tokens: tuple[int, ...], k: int) -> list[int]:
        return [self.model[salt][tokens[:j]] for j in range(self.P, k + 1, self.P)]

    def touch(self, salt: str | None, tokens: tuple[int, ...], k: int, now: int) -> None:
        ticks = self.ticks.setdefault(salt, {})
        for j in range(self.P, k + 1, self.P):
            ticks[tokens[:j]] = now

    def private_pages(self) -> int:
        P = self.P
        return sum(len(r.pages) - r.locked // P + len(r.tail) for r in self.running)

    def tree_contents(self) -> dict[str | None, dict[Prefix, int]]:
        """Every cached page-aligned prefix of the real tree, with its page."""
        P = self.P
        out: dict[str | None, dict[Prefix, int]] = {}
        for salt, root in self.cache._roots.items():
            found: dict[Prefix, int] = {}
            stack: list[tuple[TreeNode, Prefix]] = [(root, ())]
            while stack:
                node, prefix = stack.pop()
                for i, page in enumerate(node.pages):
                    found[prefix + node.key[: (i + 1) * P]] = page
                full = prefix + node.key
                stack.extend((child, full) for child in node.children.values())
            if found:
                out[salt] = found
        return out

    def is_locked(self, salt: str | None, prefix: Prefix) -> bool:
        return any(
            r.salt == salt and r.locked >= len(prefix) and r.tokens[: len(prefix)] == prefix
            for r in self.running
        )

    def match(
        self, tokens: tuple[int, ...], salt: str | None, touch: bool = True
    ) -> tuple[int, list[int], TreeNode]:
        """match_prefix checked against the model; returns (tokens, pages, node)."""
        expected = self.longest(salt, tokens)
        m = self.cache.match_prefix(list(tokens), salt, touch=touch)
        assert m.num_tokens == expected, (m.num_tokens, expected)
        assert m.num_tokens == len(m.pages) * self.P
        assert m.pages == self.model_pages(salt, tokens, expected)
        if touch and salt in self.cache._roots:  # the tree only ticks when the namespace exists
            self.touch(salt, tokens, expected, self.tick())
        return m.num_tokens, m.pages, m.node

    def insert(self, req: Request, k_tokens: int) -> int:
        """insert checked against the model; the model adopts the new pages."""
        P = self.P
        tokens = req.tokens[:k_tokens]
        expected = self.longest(req.salt, tokens)
        n = self.cache.insert(list(tokens), req.pages[: k_tokens // P], req.salt)
        assert n == expected and n >= req.locked, (n, expected, req.locked)
        if k_tokens:
            cached = self.model.setdefault(req.salt, {})
            for j in range(n + P, k_tokens + 1, P):
                cached[tokens[:j]] = req.pages[j // P - 1]
            self.touch(req.salt, tokens, k_tokens, self.tick())
        return n

    def do_evict(self, want: int) -> int:
        before = {s: dict(d) for s, d in self.model.items()}
        evictable_before = self.cache.evictable_pages
        freed = self.cache.evict(want)
        after = self.tree_contents()
        evicted: list[tuple[str | None, Prefix]] = []
        for salt, cached in before.items():
            now = after.get(salt, {})
            for prefix, page in cached.items():
                if prefix in now:
                    assert now[prefix] == page
                else:
                    assert not self.is_locked(salt, prefix), "evicted a locked prefix"
                    assert self.alloc.is_free(page), "evicted page was not given back"
                    evicted.append((salt, prefix))
            assert set(now) <= set(cached), "evict added prefixes"
        assert set(after) <= set(before)
        assert freed == len(evicted)
        assert freed >= min(want, evictable_before)
        if freed < want:
            assert self.cache.evictable_pages == 0
        if self.POLICY == "lru" and evicted:
            newest_evicted = max(self.ticks[s][p] for s, p in evicted)
            for salt, cached in after.items():
                for prefix in cached:
                    leaf = not any(prefix + ext in cached for ext in self._next_pages(salt, prefix, cached))
                    if leaf and not self.is_locked(salt, prefix):
                        assert self.ticks[salt][prefix] >= newest_evicted, "LRU order violated"
        for salt, prefix in evicted:
            del self.ticks[salt][prefix]
        self.model = after
        return freed

    def _next_pages(self, salt: str | None, prefix: Prefix, cached: dict[Prefix, int]) -> list[Prefix]:
        P = self.P
        return [p[len(prefix) :] for p in cached if len(p) == len(prefix) + P and p[: len(prefix)] == prefix]

    def release(self, req: Request, free_whole_from: int) -> None:
        """Free the request's private pages from page index `free_whole_from`, and its tail."""
        self.alloc.free(req.pages[free_whole_from:])
        self.alloc.free(req.tail)
        self.cache.unlock(req.node)

    # ------------------------------------------------------------ rules

    @precondition(lambda self: len(self.running) < self.MAX_RUNNING)
    @rule(data=st.data(), salt=SALTS)
    def start_request(self, data: st.DataObject, salt: str | None) -> None:
        P = self.P
        tokens = data.draw(token_seqs(P), label="tokens")
        k, pages, node = self.match(tokens, salt)
        self.cache.lock(node)
        whole = len(tokens) // P - len(pages)
        need = whole + (1 if len(tokens) % P else 0)
        if self.alloc.num_free < need:
            self.do_evict(need - self.alloc.num_free)
        if self.alloc.num_free < need:
            self.cache.unlock(node)  # the scheduler would keep it waiting
            return
        own = self.alloc.alloc(whole)
        tail = self.alloc.alloc(need - whole)
        self.running.append(Request(salt, tokens, node, k, pages + own, tail))

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 100), data=st.data())
    def prefill_chunk(self, i: int, data: st.DataObject) -> None:
        """Hand the pages computed so far to the tree and swap in the tree's pages."""
        P = self.P
        req = self.running[i % len(self.running)]
        k_pages = data.draw(st.integers(req.locked // P, len(req.pages)), label="chunk_end")
        k = k_pages * P
        self.insert(req, k)
        got, tree_pages, node = self.match(req.tokens[:k], req.salt)
        assert got == k
        dup = [p for p, q in zip(req.pages, tree_pages) if p != q]
        assert all(req.pages.index(p) >= req.locked // P for p in dup)
        self.alloc.free(dup)
        req.pages[:k_pages] = tree_pages
        self.cache.lock(node)
        self.cache.unlock(req.node)
        req.node, req.locked = node, k

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 100))
    def finish_request(self, i: int) -> None:
        P = self.P
        req = self.running.pop(i % len(self.running))
        n = self.insert(req, len(req.pages) * P)
        # Pages before `locked` are the tree's; [locked, n) are our duplicates; the rest adopted.
        self.alloc.free(req.pages[req.locked // P : n // P])
        self.alloc.free(req.tail)
        self.cache.unlock(req.node)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 100))
    def abort_request(self, i: int) -> None:
        """Preemption: private pages go back, nothing is inserted."""
        req = self.running.pop(i % len(self.running))
        self.release(req, req.locked // self.P)

    @rule(data=st.data(), salt=SALTS, touch=st.booleans())
    def probe(self, data: st.DataObject, salt: str | None, touch: bool) -> None:
        """A lookup without lock (e.g. cache-aware queue ordering), maybe not a "use"."""
        self.match(data.draw(token_seqs(self.P), label="tokens"), salt, touch)

    @rule(want=st.integers(0, 12))
    def evict(self, want: int) -> None:
        self.do_evict(want)

    # ------------------------------------------------------------ checks

    @invariant()
    def check(self) -> None:
        self.cache.check_integrity(private_pages=self.private_pages())
        contents = self.tree_contents()
        assert contents == {s: d for s, d in self.model.items() if d}
        assert self.cache.cached_pages == sum(len(d) for d in contents.values())
        assert set(self.cache.salts) == {None} | set(contents)

    def teardown(self) -> None:
        while self.running:
            req = self.running.pop()
            self.release(req, req.locked // self.P)
        assert self.cache.locked_pages == 0
        evictable = self.cache.evictable_pages
        assert self.cache.evict(self.NUM_PAGES) == evictable
        assert self.alloc.num_free == self.alloc.num_pages, "pages leaked"
        assert self.cache.num_nodes == 0 and self.cache.salts == [None]
        self.cache.check_integrity()


def machine(P: int, policy: str, examples: int) -> type[RuleBasedStateMachine]:
    cls = type(f"RadixMachineP{P}{policy}", (RadixMachine,), {"P": P, "POLICY": policy})
    cls.TestCase.settings = settings(
        max_examples=examples,
        stateful_step_count=40,
        deadline=None,
        database=None,  # keep the repository clean; a failure prints its reproduction
        suppress_health_check=[HealthCheck.too_slow],
    )
    return cls


TestRadixP1LRU = machine(1, "lru", 100).TestCase
TestRadixP2LRU = machine(2, "lru", 80).TestCase
TestRadixP4LRU = machine(4, "lru", 80).TestCase
TestRadixP4LFU = machine(4, "lfu", 50).TestCase
TestRadixP16FIFO = machine(16, "fifo", 40).TestCase
