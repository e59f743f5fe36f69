"""Unit tests of PageAllocator: all-or-nothing alloc/free and double-free detection."""

from __future__ import annotations

import pytest

from radixserve.radix import IntegrityError, OutOfPages, PageAllocator


def test_alloc_and_free_roundtrip() -> None:
    a = PageAllocator(8)
    assert a.num_pages == 8 and a.num_free == 8
    pages = a.alloc(3)
    assert len(set(pages)) == 3 and all(0 <= p < 8 for p in pages)
    assert a.num_free == 5 and a.num_used == 3
    assert not any(a.is_free(p) for p in pages)
    a.free(pages)
    assert a.num_free == 8 and all(a.is_free(p) for p in range(8))
    a.check_integrity()


def test_alloc_zero_and_everything() -> None:
    a = PageAllocator(4)
    assert a.alloc(0) == []
    assert sorted(a.alloc(4)) == [0, 1, 2, 3]
    assert a.num_free == 0
    assert a.alloc(0) == []


def test_out_of_pages_allocates_nothing() -> None:
    a = PageAllocator(4)
    a.alloc(3)
    with pytest.raises(OutOfPages, match=r"asked for 2, only 1 free") as info:
        a.alloc(2)
    assert isinstance(info.value, RuntimeError)
    assert (info.value.requested, info.value.available) == (2, 1)
    assert a.num_free == 1
    a.check_integrity()


def test_double_free_and_out_of_range_are_errors_and_atomic() -> None:
    a = PageAllocator(4)
    pages = a.alloc(2)
    a.free([pages[0]])
    with pytest.raises(ValueError, match="double free"):
        a.free([pages[0]])
    with pytest.raises(ValueError, match="out of range"):
        a.free([pages[1], 4])
    assert not a.is_free(pages[1])  # the failed call freed nothing
    with pytest.raises(ValueError, match="double free"):
        a.free([pages[1], pages[1]])  # twice in one call
    assert not a.is_free(pages[1])
    with pytest.raises(ValueError, match="out of range"):
        a.free([-1])
    a.free([pages[1]])
    assert a.num_free == 4
    a.check_integrity()


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_bad_pool_size(bad: object) -> None:
    with pytest.raises(ValueError):
        PageAllocator(bad)  # type: ignore[arg-type]


def test_negative_alloc_and_is_free_range() -> None:
    a = PageAllocator(2)
    with pytest.raises(ValueError):
        a.alloc(-1)
    with pytest.raises(ValueError):
        a.is_free(2)


def test_check_integrity_detects_corruption() -> None:
    a = PageAllocator(4)
    a.alloc(1)
    a._stack.append(a._stack[0])  # simulate a page on the free list twice
    with pytest.raises(IntegrityError):
        a.check_integrity()
