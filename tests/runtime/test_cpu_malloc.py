"""glibc malloc tuning for CPU serving (runtime/cpu_malloc.py)."""

from __future__ import annotations

import platform

import torch

from radixserve.runtime.cpu_malloc import keep_tensor_buffers_in_heap


def test_applied_once_and_harmless():
    first = keep_tensor_buffers_in_heap()
    assert keep_tensor_buffers_in_heap() is first  # idempotent: applied once per process
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first is True
    # Large buffers still allocate, free and reuse correctly under the settings.
    for _ in range(3):
        big = torch.ones(16 << 20, dtype=torch.uint8)
        assert int(big.sum()) == 16 << 20
        del big
