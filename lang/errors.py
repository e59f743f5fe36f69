"""Errors a program author can act on.

Each names what went wrong in the author's terms (a variable, a choice list, a grammar line, a
URL) rather than an engine internal. They subclass the closest builtin (KeyError, ValueError,
ConnectionError) so generic handlers keep working.
"""

from __future__ import annotations

from collections.abc import Iterable


class LangError(Exception):
    """Base class of every error raised by `radixserve.lang` itself."""


class VariableNotFound(LangError, KeyError):
    """A program read a variable (`s["name"]`) that was never generated or selected.

    `name` is the missing variable, `available` the names that do exist at that point.
    """

    def __init__(self, name: str, available: Iterable[str]) -> None:
        self.name = name
        self.available = tuple(sorted(available))
        listed = ", ".join(repr(v) for v in self.available) if self.available else "none yet"
        super().__init__(
            f"variable {name!r} was never generated or selected in this program state; "
            f"variables that exist: {listed}"
        )

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class EmptyChoices(LangError, ValueError):
    """`select(...)` or `gen(choices=...)` was given no choices (or an empty string choice)."""


class GrammarSyntaxError(LangError, ValueError):
    """A Lark grammar given to `gen(grammar=...)` does not parse.

    `line` and `column` are 1-based positions in the grammar text.
    """

    def __init__(self, message: str, line: int, column: int, grammar: str) -> None:
        self.line = line
        self.column = column
        self.grammar = grammar
        lines = grammar.splitlines() or [""]
        shown = lines[line - 1] if 0 < line <= len(lines) else ""
        caret = " " * max(column - 1, 0) + "^"
        super().__init__(
            f"invalid grammar at line {line}, column {column}: {message}\n    {shown}\n    {caret}"
        )


class BackendUnreachable(LangError, ConnectionError):
    """The backend's server could not be reached. `url` is the address that was tried."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        super().__init__(f"cannot reach the radixserve server at {url}: {reason}")


class BackendError(LangError, RuntimeError):
    """The backend answered but refused or failed the request (HTTP 4xx/5xx, an engine error
    in one request). `status_code` is the HTTP status where there is one."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        self.status_code = status_code
        super().__init__(message)


class ChatTemplateError(LangError, ValueError):
    """The model has no chat template, or role markers could not be derived from it."""
