"""Structured-output constraints: specs and their compilation to token masks (llguidance).

Light names (`ConstraintSpec`, `ConstraintError`, `ConstraintLimits`) import eagerly; the
compiler and matcher (torch, llguidance, jsonschema, lark) load on first access, so importing
`SamplingParams` stays cheap.

Engine-facing API:
    compiler = ConstraintCompiler(tokenizer, vocab_size, limits)    # once per engine
    matcher = compiler.compile(spec)        # or compile_constraint(spec, tokenizer, vocab_size)
    bitmask = allocate_bitmask(max_batch, vocab_size)
    matcher.fill_bitmask(bitmask, row); apply_bitmask(logits, bitmask, rows)
    matcher.consume(token); matcher.forced_tokens(); matcher.is_finished(); matcher.accepts_eos()
"""

from __future__ import annotations

from typing import Any

from radixserve.runtime.constraints.config import ConstraintLimits
from radixserve.runtime.constraints.errors import ConstraintError
from radixserve.runtime.constraints.spec import CONSTRAINT_KINDS, ConstraintKind, ConstraintSpec

_LAZY = {
    "ConstraintCompiler": "radixserve.runtime.constraints.compiler",
    "compile_constraint": "radixserve.runtime.constraints.compiler",
    "check_constraint": "radixserve.runtime.constraints.compiler",
    "GRAMMAR_BUILDERS": "radixserve.runtime.constraints.compiler",
    "json_compile_options": "radixserve.runtime.constraints.compiler",
    "schema_with_options": "radixserve.runtime.constraints.compiler",
    "TokenMatcher": "radixserve.runtime.constraints.matcher",
    "allocate_bitmask": "radixserve.runtime.constraints.matcher",
    "apply_bitmask": "radixserve.runtime.constraints.matcher",
    "unpack_bitmask": "radixserve.runtime.constraints.matcher",
    "bitmask_width": "radixserve.runtime.constraints.matcher",
    "check_lark_grammar": "radixserve.runtime.constraints.lark_check",
}

__all__ = [
    "CONSTRAINT_KINDS",
    "ConstraintKind",
    "ConstraintSpec",
    "ConstraintError",
    "ConstraintLimits",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)
