"""What a user asks the output to follow, before it is compiled against a tokenizer.

A `ConstraintSpec` is plain data (hashable, picklable) so it can travel from the server or the
DSL to the engine; `radixserve.runtime.constraints.compile_constraint` turns it into a
per-request matcher. Kinds: a regex, a list of choices, a JSON Schema (as a JSON string), any
JSON object, or a grammar in Lark syntax.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from radixserve.runtime.constraints.errors import ConstraintError

ConstraintKind = Literal["regex", "choice", "json_schema", "json_object", "grammar"]

CONSTRAINT_KINDS: tuple[str, ...] = ("regex", "choice", "json_schema", "json_object", "grammar")


@dataclass(frozen=True)
class ConstraintSpec:
    """One output constraint. `value` is the regex, the Lark grammar text, the JSON Schema
    serialized as JSON text, or for `choice` a tuple of the allowed strings; unused for
    `json_object`.

    Invariants (checked here, raising ConstraintError): `kind` is one of CONSTRAINT_KINDS;
    `value` is a str except for `choice`, where a list is normalized to a tuple of str.
    Whether the value compiles is checked by the compiler, not here."""

    kind: ConstraintKind
    value: str | tuple[str, ...] = ""

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise ConstraintError("constraint", f"unknown constraint kind {self.kind!r}; expected one of {', '.join(CONSTRAINT_KINDS)}")
        if self.kind == "choice":
            if isinstance(self.value, str) or not isinstance(self.value, (tuple, list)):
                raise ConstraintError("choice", "choices must be a list of strings")
            if not all(isinstance(c, str) for c in self.value):
                raise ConstraintError("choice", "every choice must be a string")
            object.__setattr__(self, "value", tuple(self.value))
        elif not isinstance(self.value, str):
            raise ConstraintError(self.kind, f"expected a string value for a {self.kind} constraint, got {type(self.value).__name__}")

    @classmethod
    def json_schema(cls, schema: str | dict[str, Any] | bool) -> "ConstraintSpec":
        """A JSON Schema constraint from a schema given as JSON text or as a dict / bool
        (serialized here, key order kept: llguidance fixes property order from it)."""
        if isinstance(schema, str):
            return cls("json_schema", schema)
        try:
            text = json.dumps(schema, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConstraintError("json_schema", f"the schema is not JSON-serializable: {exc}") from None
        return cls("json_schema", text)

    @classmethod
    def choices(cls, options: list[str] | tuple[str, ...]) -> "ConstraintSpec":
        return cls("choice", tuple(options))
