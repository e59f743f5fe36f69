"""Suite-wide test setup.

Triton kernels run on the CPU through Triton's interpreter; the switch must be set before
triton is first imported by any test module, so it lives here, at the root.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001
    """Skip tests marked `gpu` on machines without CUDA."""
    if torch.cuda.is_available():
        return
    import pytest

    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
