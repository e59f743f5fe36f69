"""Kernel tests run the Triton kernels on CPU through Triton's interpreter when there is no GPU.

Triton reads TRITON_INTERPRET when a function is decorated with `triton.jit`, and Triton's own
library (tl.cdiv, reductions) is decorated when Triton is first imported. So the variable is
set here, before any test module imports radixserve.kernels (this folder is collected first
under `tests/`). If Triton was imported earlier in this pytest process without the variable
(e.g. `pytest tests/runtime tests/kernels`), the Triton tests of this folder are skipped with
that reason; the reference-only tests (`*reference_matches*`) still run. Exporting TRITON_INTERPRET=1 avoids it.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

# pytest runs with --import-mode=importlib (pyproject.toml): make the sibling helper module
# `kernel_test_utils` importable from the test modules.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

HAS_CUDA = torch.cuda.is_available()
_TRITON_PREIMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA or not _TRITON_PREIMPORTED:
        return
    skip = pytest.mark.skip(
        reason="triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1; "
        "run tests/kernels on its own or export TRITON_INTERPRET=1"
    )
    for item in items:
        if str(item.path).startswith(_HERE) and "reference_matches" not in item.name:
            item.add_marker(skip)
