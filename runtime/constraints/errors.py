"""The one exception of the constraints package: a constraint that cannot be compiled.

`ConstraintError` is a `ValueError` that names the request field at fault (`param`: "regex",
"json_schema", "grammar", "choice", "response_format", "tools", ...), so the server can turn it
into a 400 whose `param` points at the client's field. Grammar errors also carry the 1-based
`line` and `column` in the grammar text. This module imports nothing heavy: `spec.py` (and so
every `SamplingParams` user) depends on it.
"""

from __future__ import annotations


class ConstraintError(ValueError):
    """A constraint is malformed, unsupported, or over a configured limit.

    `param` names the offending field; `line`/`column` (1-based) locate a grammar error when
    known. `str(exc)` is "<param>: <message>", the message alone is `exc.message`."""

    def __init__(self, param: str, message: str, *, line: int | None = None, column: int | None = None) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message
        self.line = line
        self.column = column

    def with_param(self, param: str, prefix: str = "") -> "ConstraintError":
        """The same error re-attributed to another field (e.g. a tool's parameter schema is
        reported under "tools"), optionally with context prepended to the message."""
        return ConstraintError(param, prefix + self.message, line=self.line, column=self.column)
