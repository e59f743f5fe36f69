"""Early validation of Lark grammars, with line and column, before they reach the engine.

Two parsers have a say. llguidance runs the grammar, so it decides what is accepted; `lark`
(the reference implementation of the syntax, and the oracle our tests parse outputs with)
supplies a position when llguidance's error has none. llguidance reads a superset of Lark
(`%json {...}`, special tokens `<|...|>`, `x{m,n}`, `&`/`~` in terminals, lazy lexemes, zero-width
regexes), so the policy is:

  * llguidance accepts            -> accepted, whatever lark says (the grammar may use extensions);
  * llguidance rejects with a line -> ConstraintError with llguidance's message, line and column;
  * llguidance rejects, no line   -> lark's line and column if lark also rejects, else
                                     llguidance's message alone.

The check is tokenizer-free (special tokens are resolved later, at compile time), so the DSL can
run it when a grammar is defined.
"""

from __future__ import annotations

import re

from radixserve.runtime.constraints.errors import ConstraintError

# llguidance prefixes grammar errors with "L(C): ..." or "at L(C): ..." (1-based).
_LL_POSITION = re.compile(r"^(?:at )?(\d+)\((\d+)\):\s*")
# lark puts positions in the message text ("at line 3 column 7") or on the exception.
_LARK_POSITION = re.compile(r"line (\d+),? column (\d+)")


def check_lark_grammar(text: str, param: str = "grammar") -> None:
    """Raise ConstraintError (with `.line`/`.column` when known) unless `text` is a grammar
    llguidance can run. Does not need a tokenizer; see the module docstring for the policy."""
    if not isinstance(text, str) or not text.strip():
        raise ConstraintError(param, "the grammar is empty")
    import llguidance

    ll_error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(text))
    if not ll_error:
        return
    raise grammar_error(ll_error, text, param)


def grammar_error(ll_error: str, text: str, param: str = "grammar") -> ConstraintError:
    """Turn llguidance's error for grammar `text` into a ConstraintError, borrowing lark's
    position when llguidance gives none."""
    first, _, _rest = ll_error.partition("\n")
    match = _LL_POSITION.match(first)
    if match:
        line, column = int(match.group(1)), int(match.group(2))
        detail = first[match.end():].strip()
        cause = regex_error_cause(ll_error)
        if cause and cause not in detail:
            detail = f"{detail.rstrip(':')}: {cause}"
        return ConstraintError(param, f"line {line}, column {column}: {detail}{_excerpt(text, line, column)}", line=line, column=column)
    position = _lark_position(text)
    if position is not None:
        line, column, lark_message = position
        return ConstraintError(
            param,
            f"line {line}, column {column}: {first.strip()} (lark: {lark_message}){_excerpt(text, line, column)}",
            line=line,
            column=column,
        )
    return ConstraintError(param, first.strip())


def regex_error_cause(ll_error: str) -> str | None:
    """The "error: ..." line of a regex parse error inside an llguidance message, if any
    (llguidance quotes the regex, a caret line, then the cause)."""
    for line in ll_error.splitlines():
        if line.startswith("error: "):
            return line[len("error: "):].strip()
    return None


def _lark_position(text: str) -> tuple[int, int, str] | None:
    """(line, column, message) of lark's error for `text`, or None if lark accepts it or gives
    no position."""
    import lark

    try:
        lark.Lark(text, parser="earley", lexer="dynamic")
    except Exception as exc:  # lark raises several unrelated types (GrammarError, UnexpectedInput, re.error)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        line = getattr(exc, "line", None)
        column = getattr(exc, "column", None)
        if isinstance(line, int) and isinstance(column, int) and line > 0:
            return line, column, message
        match = _LARK_POSITION.search(str(exc))
        if match:
            return int(match.group(1)), int(match.group(2)), message
        return None
    return None


def _excerpt(text: str, line: int, column: int) -> str:
    """The offending grammar line with a caret under the column (empty if out of range)."""
    lines = text.splitlines()
    if not 1 <= line <= len(lines):
        return ""
    source = lines[line - 1]
    return f"\n    {source}\n    {' ' * max(column - 1, 0)}^"
