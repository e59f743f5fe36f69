"""Exceptions of the radix package.

They live in their own module so that the allocator and the tree can raise them without
importing each other, and so that callers (the scheduler, tests) can catch them by type
rather than by message: `OutOfPages` is the normal signal that the scheduler must evict or
preempt, while `IntegrityError` always means a bug in the bookkeeping.
"""

from __future__ import annotations

__all__ = ["OutOfPages", "IntegrityError"]


class OutOfPages(RuntimeError):
    """Raised by `PageAllocator.alloc` when fewer pages are free than were asked for.

    Nothing was allocated when this is raised. `requested` and `available` let the
    scheduler compute how much to evict (`requested - available`) without parsing text.
    """

    def __init__(self, requested: int, available: int, num_pages: int) -> None:
        super().__init__(
            f"out of KV pages: asked for {requested}, only {available} free "
            f"(pool of {num_pages})"
        )
        self.requested = requested
        self.available = available
        self.num_pages = num_pages


class IntegrityError(Exception):
    """A bookkeeping invariant of the radix cache or the allocator does not hold.

    Raised (never `assert`-ed, so it also fires under `python -O`) by `check_integrity()`
    with a message that describes the first violation found.
    """
