"""Bookkeeping of KV-cache page indices (no tensors).

The KV pool in `runtime/` owns the actual key/value tensors, laid out as `num_pages` pages
of `page_size` token slots each. Which page indices are in use is pure bookkeeping, kept
here so that the radix tree and the scheduler can reason about pages without touching a
device. The free list is a Python list used as a stack (O(1) pop/push per page) plus a
`bytearray` of per-page free flags, which makes double frees and frees of pages that were
never handed out detectable in O(1) instead of silently corrupting the pool.

Every page index is, at any moment, either free (owned by this allocator) or handed out
(owned by whoever called `alloc`: a running request, or the radix tree after it adopted the
page on `insert`). The allocator cannot tell those owners apart; `RadixCache.check_integrity`
does that accounting.
"""

from __future__ import annotations

from typing import Iterable

from .errors import IntegrityError, OutOfPages

__all__ = ["PageAllocator"]


class PageAllocator:
    """Free list of page indices `0 .. num_pages - 1`.

    Invariants:
      * `len(self._stack) == num_free == number of 1s in self._flags`;
      * a page index is in `self._stack` exactly once iff its flag is 1.

    Both `alloc` and `free` are all-or-nothing: on error the allocator is unchanged.
    The order in which pages are handed out is unspecified (it happens to start with low
    indices, and reuses the most recently freed pages first, which keeps them warm).
    """

    __slots__ = ("_num_pages", "_stack", "_flags")

    def __init__(self, num_pages: int) -> None:
        if isinstance(num_pages, bool) or not isinstance(num_pages, int):
            raise ValueError(f"num_pages must be an int, got {type(num_pages).__name__}")
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self._num_pages = num_pages
        # Reversed so that pop() hands out page 0 first: nicer to read in logs and tests.
        self._stack: list[int] = list(range(num_pages - 1, -1, -1))
        self._flags = bytearray(b"\x01") * num_pages  # 1 = free

    @property
    def num_pages(self) -> int:
        """Size of the pool (constant)."""
        return self._num_pages

    @property
    def num_free(self) -> int:
        """How many pages `alloc` can hand out right now."""
        return len(self._stack)

    @property
    def num_used(self) -> int:
        """Pages currently handed out (`num_pages - num_free`)."""
        return self._num_pages - len(self._stack)

    def is_free(self, page: int) -> bool:
        """Whether `page` is in the free list. ValueError if it is out of range."""
        if not 0 <= page < self._num_pages:
            raise ValueError(f"page {page} out of range [0, {self._num_pages})")
        return self._flags[page] == 1

    def alloc(self, n: int) -> list[int]:
        """Hand out `n` distinct free pages; the caller owns them until it frees them.

        Raises `OutOfPages` (and allocates nothing) when fewer than `n` are free, and
        ValueError when `n` is negative. `alloc(0)` returns `[]`.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        stack = self._stack
        if n > len(stack):
            raise OutOfPages(n, len(stack), self._num_pages)
        if n == 0:
            return []
        pages = stack[-n:]
        del stack[-n:]
        pages.reverse()  # pop order: lowest index first on a fresh allocator
        flags = self._flags
        for p in pages:
            flags[p] = 0
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Return `pages` to the free list.

        Raises ValueError (and frees nothing) if a page is out of range, already free, or
        listed twice in `pages`: each of those is a double free waiting to corrupt the pool.
        """
        pages = list(pages)
        flags = self._flags
        n = self._num_pages
        for i, p in enumerate(pages):
            if not 0 <= p < n or flags[p]:
                # Undo the flags set so far so that the call is all-or-nothing.
                for q in pages[:i]:
                    flags[q] = 0
                if not 0 <= p < n:
                    raise ValueError(f"cannot free page {p}: out of range [0, {n})")
                raise ValueError(f"double free of page {p}")
            flags[p] = 1
        self._stack.extend(pages)

    def check_integrity(self) -> None:
        """Raise `IntegrityError` if the free list and the free flags disagree."""
        stack = self._stack
        if len(set(stack)) != len(stack):
            raise IntegrityError("allocator: a page is on the free list twice")
        if sum(self._flags) != len(stack):
            raise IntegrityError(
                f"allocator: {sum(self._flags)} free flags but {len(stack)} pages on the free list"
            )
        for p in stack:
            if not 0 <= p < self._num_pages or not self._flags[p]:
                raise IntegrityError(f"allocator: page {p} on the free list is not flagged free")

    def __repr__(self) -> str:
        return f"PageAllocator(num_pages={self._num_pages}, num_free={self.num_free})"
