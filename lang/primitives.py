"""The DSL's primitives: `gen`, `select` and the role blocks `system`, `user`, `assistant`.

Each builds an immutable expression; nothing runs until it is appended to a program state
(`s += gen("answer")`). Arguments are checked here, at construction, so a mistake fails where
the program is written: an empty choice list raises `EmptyChoices`, and a grammar is parsed
with `lark` right away so a malformed one raises `GrammarSyntaxError` with its line and column.

Expressions concatenate with `+` (`s += "Answer: " + gen("a")`), and role blocks hold any
sequence of strings and expressions (`assistant(gen("reply"))`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from radixserve.lang.errors import EmptyChoices, GrammarSyntaxError
from radixserve.runtime.constraints.spec import ConstraintSpec
from radixserve.runtime.sampling_params import SamplingParams

ROLES = ("system", "user", "assistant")

# SamplingParams fields `gen` may set; the rest (n, logprobs, prompt_logprobs...) belong to
# the interpreter.
_GEN_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
)

#: Used for any field neither `gen(...)` nor the run's `sampling=` sets.
DEFAULT_SAMPLING: Mapping[str, Any] = {"max_tokens": 128, "temperature": 1.0}


class Expr:
    """Base of every DSL expression; `+` concatenates."""

    def __add__(self, other: ExprLike) -> Seq:
        return Seq((self, other))

    def __radd__(self, other: ExprLike) -> Seq:
        return Seq((other, self))


ExprLike = Union[str, Expr]


@dataclass(frozen=True)
class Seq(Expr):
    """Expressions appended one after another."""

    items: tuple[ExprLike, ...]

    def __post_init__(self) -> None:
        flat: list[ExprLike] = []
        for item in self.items:
            _check_expr(item)
            flat.extend(item.items if isinstance(item, Seq) else (item,))
        object.__setattr__(self, "items", tuple(flat))


@dataclass(frozen=True)
class Gen(Expr):
    """Generate text into variable `name` (None: generate without capturing).

    `overrides` holds only the sampling fields the caller set; the rest come from the run's
    defaults. `grammar_parser` is the lark parser built from `constraint` when it is a grammar
    (handy as an oracle: every output must parse).
    """

    name: str | None
    overrides: tuple[tuple[str, Any], ...] = ()
    constraint: ConstraintSpec | None = None
    grammar_parser: Any = field(default=None, compare=False, repr=False)

    def sampling_params(self, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        merged = dict(DEFAULT_SAMPLING)
        merged.update(defaults or {})
        merged.update(self.overrides)
        unknown = set(merged) - set(_GEN_FIELDS)
        if unknown:
            raise TypeError(f"unknown sampling fields: {sorted(unknown)}; allowed: {list(_GEN_FIELDS)}")
        return SamplingParams(constraint=self.constraint, **merged)


@dataclass(frozen=True)
class Select(Expr):
    """Pick one of `choices` by scoring each after the current text (see interpreter.py for
    the normalization), store it in variable `name` and append it."""

    name: str | None
    choices: tuple[str, ...]


@dataclass(frozen=True)
class Role(Expr):
    """A chat message of `role` whose content is `content`, wrapped in the role's prefix and
    suffix as the model's chat template renders them."""

    role: str
    content: tuple[ExprLike, ...]


def check_sampling_defaults(sampling: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a run's `sampling=` defaults (field names and values) before anything runs."""
    out = dict(sampling)
    unknown = set(out) - set(_GEN_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling fields {sorted(unknown)}; allowed: {list(_GEN_FIELDS)}")
    if isinstance(out.get("stop"), str):
        out["stop"] = (out["stop"],)
    SamplingParams(**out)  # raises InvalidParams naming the field
    return out


def _check_expr(item: object) -> None:
    if not isinstance(item, (str, Expr)):
        raise TypeError(
            f"cannot append {type(item).__name__} to a program; expected str, gen(...), "
            f"select(...), a role block or a concatenation of those"
        )


def _check_name(name: str | None) -> None:
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"a variable name must be a non-empty string, got {name!r}")


def _check_choices(choices: Sequence[str] | None, what: str) -> tuple[str, ...]:
    if choices is None or isinstance(choices, str):
        raise TypeError(f"{what}: choices must be a list of strings, got {choices!r}")
    out = tuple(choices)
    if not out:
        raise EmptyChoices(f"{what}: the choice list is empty; give at least one choice")
    for c in out:
        if not isinstance(c, str):
            raise TypeError(f"{what}: every choice must be a string, got {c!r}")
        if not c:
            raise EmptyChoices(f"{what}: the empty string cannot be a choice (it has no tokens to score)")
    return out


_LINE_COL = re.compile(r"at line (\d+) column (\d+)")
_UNDEFINED = re.compile(r"(?:Rule|Terminal) '([^']+)' used but not defined")
_DEFINED_TWICE = re.compile(r"(?:Rule|Terminal) '([^']+)' defined more than once")


def _locate_name(grammar: str, name: str, definition: bool, occurrence: int = 0) -> tuple[int, int]:
    """1-based (line, column) of a rule/terminal name: its `occurrence`-th definition
    (`name:` at the start of a line) or its first use elsewhere."""
    esc = re.escape(name.lstrip("_?!"))
    if definition:
        pattern = re.compile(rf"^[ \t]*[?!]?{esc}(?:\.\d+)?[ \t]*:", re.M)
    else:
        pattern = re.compile(rf"(?<![\w\"'/]){esc}(?![\w\"'])")
    hits = list(pattern.finditer(grammar))
    if not definition:
        defs = {m.start() for m in re.finditer(rf"^[ \t]*[?!]?{esc}(?:\.\d+)?[ \t]*:", grammar, re.M)}
        hits = [m for m in hits if not any(d <= m.start() <= d + len(name) + 4 for d in defs)]
    if not hits:
        return 1, 1
    m = hits[min(occurrence, len(hits) - 1)]
    pos = m.start() + (len(m.group(0)) - len(m.group(0).lstrip()))
    line = grammar.count("\n", 0, pos) + 1
    column = pos - (grammar.rfind("\n", 0, pos) + 1) + 1
    return line, column


def parse_grammar(grammar: str) -> Any:
    """Parse a Lark grammar (start rule `start`) with lark; raise `GrammarSyntaxError` with a
    1-based line and column if it is malformed. Returns the `lark.Lark` parser.

    The grammar must be plain Lark syntax (what both lark and the engine's llguidance read);
    llguidance-only extensions such as `%json` are not accepted here.
    """
    import lark  # deferred: only programs with grammars pay for it

    if not isinstance(grammar, str) or not grammar.strip():
        raise GrammarSyntaxError("the grammar is empty", 1, 1, grammar if isinstance(grammar, str) else "")
    try:
        return lark.Lark(grammar, start="start", parser="earley")
    except lark.exceptions.UnexpectedInput as e:  # raised for some syntax errors
        line, col = getattr(e, "line", 1) or 1, getattr(e, "column", 1) or 1
        raise GrammarSyntaxError(str(e).split("\n")[0], line, col, grammar) from None
    except lark.exceptions.LarkError as e:
        msg = str(e)
        first = msg.strip().split("\n")[0]
        m = _LINE_COL.search(msg)
        if m:
            line, col = int(m.group(1)), int(m.group(2))
            first = _LINE_COL.sub("", first).replace(" in <string>:", "").rstrip(" ,:")
        elif (m := _UNDEFINED.search(msg)) is not None:
            line, col = _locate_name(grammar, m.group(1), definition=False)
        elif (m := _DEFINED_TWICE.search(msg)) is not None:
            line, col = _locate_name(grammar, m.group(1), definition=True, occurrence=1)
        elif "NonTerminal('start')" in msg:
            line, col, first = 1, 1, "the grammar has no 'start' rule"
        else:
            line, col = 1, 1
        raise GrammarSyntaxError(first, line, col, grammar) from None


def _schema_text(json_schema: Any) -> str:
    if isinstance(json_schema, str):
        try:
            json.loads(json_schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema is not valid JSON: {e}") from None
        return json_schema
    if isinstance(json_schema, type) and hasattr(json_schema, "model_json_schema"):
        json_schema = json_schema.model_json_schema()  # a pydantic model class
    if not isinstance(json_schema, Mapping):
        raise TypeError(f"json_schema must be a dict, JSON text or a pydantic model, got {json_schema!r}")
    return json.dumps(json_schema, sort_keys=True)


def gen(
    name: str | None = None,
    *,
    max_tokens: int | None = None,
    stop: str | Sequence[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    ignore_eos: bool | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    repetition_penalty: float | None = None,
    regex: str | None = None,
    choices: Sequence[str] | None = None,
    json_schema: Any = None,
    grammar: str | None = None,
) -> Gen:
    """Generate a continuation and capture its text as variable `name`.

    Sampling arguments left as None take the run's defaults (`program.run(sampling={...})`),
    then `DEFAULT_SAMPLING` (max_tokens=128, temperature=1.0; temperature=0 is greedy).
    At most one constraint: `regex`, `choices` (constrained decoding to one of the strings,
    unlike `select`, which scores them), `json_schema` (dict, JSON text or pydantic model) or
    `grammar` (Lark text, parsed now).
    """
    _check_name(name)
    local = dict(
        max_tokens=max_tokens,
        stop=stop,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        seed=seed,
        stop_token_ids=stop_token_ids,
        ignore_eos=ignore_eos,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        repetition_penalty=repetition_penalty,
    )
    overrides = {k: v for k, v in local.items() if v is not None}
    if isinstance(overrides.get("stop"), str):
        overrides["stop"] = (overrides["stop"],)
    for key in ("stop", "stop_token_ids"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    # Validate the explicit values now (the error names the field) rather than at run time.
    SamplingParams(**overrides)

    given = [k for k, v in (("regex", regex), ("choices", choices), ("json_schema", json_schema), ("grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"gen({name!r}): give at most one constraint, got {given}")
    constraint = None
    parser = None
    if regex is not None:
        if not isinstance(regex, str) or not regex:
            raise ValueError(f"gen({name!r}): regex must be a non-empty string")
        constraint = ConstraintSpec("regex", regex)
    elif choices is not None:
        constraint = ConstraintSpec("choice", _check_choices(choices, f"gen({name!r})"))
    elif json_schema is not None:
        constraint = ConstraintSpec("json_schema", _schema_text(json_schema))
    elif grammar is not None:
        parser = parse_grammar(grammar)
        constraint = ConstraintSpec("grammar", grammar)
    return Gen(name, tuple(sorted(overrides.items())), constraint, parser)


def select(name: str | None = None, choices: Sequence[str] | None = None) -> Select:
    """Choose the most likely of `choices` after the current text, capture it as `name` and
    append it. Each choice is scored by its token-length-normalized log-probability (the mean
    log-probability of its tokens) in one batched engine call; see `interpreter.py`."""
    _check_name(name)
    return Select(name, _check_choices(choices, f"select({name!r})"))


def _role(role: str, parts: tuple[ExprLike, ...]) -> Role:
    for p in parts:
        _check_expr(p)
        if isinstance(p, Role) or (isinstance(p, Seq) and any(isinstance(i, Role) for i in p.items)):
            raise ValueError(f"a {role}(...) block cannot contain another role block")
    return Role(role, tuple(parts))


def system(*content: ExprLike) -> Role:
    """A system message: `s += system("You are terse.")`."""
    return _role("system", content)


def user(*content: ExprLike) -> Role:
    """A user message: `s += user("What is 2+2?")`."""
    return _role("user", content)


def assistant(*content: ExprLike) -> Role:
    """An assistant message, usually generated: `s += assistant(gen("answer"))`. It opens
    with exactly the text the chat template's `add_generation_prompt` produces."""
    return _role("assistant", content)


__all__ = [
    "gen",
    "select",
    "system",
    "user",
    "assistant",
    "parse_grammar",
    "Expr",
    "Gen",
    "Select",
    "Role",
    "Seq",
    "DEFAULT_SAMPLING",
]
