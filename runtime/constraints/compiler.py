"""Compile a `ConstraintSpec` against a tokenizer into a `TokenMatcher` (llguidance backend).

Each kind has a grammar builder in `GRAMMAR_BUILDERS` that turns the spec into an llguidance
grammar (regex -> llguidance regex; choice -> a Lark alternation of string literals; json_schema
-> the schema; json_object -> `{"type": "object"}`; grammar -> the Lark text, validated first by
`check_lark_grammar`). JSON is compiled strictly: llguidance's `lenient` and `coerce_one_of` are
forced off (also against a schema's own `x-guidance`), so an unsupported keyword, a `oneOf` that
is not provably disjoint, or an unknown `format` is a ConstraintError naming it and where it is,
never silently ignored; the schema is first checked against its draft's meta-schema
(`jsonschema`). Free whitespace in JSON is capped (`ConstraintLimits.json_max_whitespace`).

`ConstraintCompiler` holds what is expensive to build and shared by all requests: the llguidance
tokenizer (about a second to build), the parser limits, an LRU cache of compiled grammars (a
matcher in its initial state per spec, deep-copied for each request) and, on demand, an
llguidance executor to fill a batch's masks on several threads.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import warnings
from collections import OrderedDict
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from radixserve.runtime.constraints.config import ConstraintLimits
from radixserve.runtime.constraints.errors import ConstraintError
from radixserve.runtime.constraints.lark_check import check_lark_grammar, grammar_error, regex_error_cause
from radixserve.runtime.constraints.matcher import TokenMatcher, allocate_bitmask, bitmask_width, unpack_bitmask
from radixserve.runtime.constraints.spec import ConstraintSpec

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- JSON options


def json_compile_options(limits: ConstraintLimits) -> dict[str, Any]:
    """llguidance JSON options we always impose (applied over a schema's own `x-guidance`):
    strict keywords, no oneOf->anyOf coercion, plain separators and capped whitespace."""
    options: dict[str, Any] = {
        "lenient": False,
        "coerce_one_of": False,
        "item_separator": ",",
        "key_separator": ":",
    }
    pattern = limits.json_whitespace_pattern()
    if pattern is None:
        options["whitespace_flexible"] = False
    else:
        options["whitespace_flexible"] = True
        options["whitespace_pattern"] = pattern
    return options


def schema_with_options(schema: dict[str, Any] | bool, limits: ConstraintLimits) -> dict[str, Any]:
    """`schema` with our options in its top-level `x-guidance` (for schemas embedded in Lark
    grammars with `%json`, where no override argument exists). Does not modify `schema`."""
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise ConstraintError("json_schema", "the schema must be a JSON object (or true)")
    merged = dict(tighten_schema(schema, limits))
    user = merged.get("x-guidance")
    merged["x-guidance"] = {**(user if isinstance(user, dict) else {}), **json_compile_options(limits)}
    return merged


# ---------------------------------------------------------------- JSON Schema checks and errors

# Keys whose values map names to subschemas (their keys are not keywords).
_NAME_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies"})
# Keys whose values are data, not schemas.
_DATA_KEYS = frozenset({"enum", "const", "default", "examples", "example", "x-guidance"})


def _pointer(parts: Sequence[Any]) -> str:
    return "/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in parts) if parts else "/"


def _schema_locations(schema: Any, match: Callable[[dict[str, Any]], bool], limit: int = 3) -> list[str]:
    """JSON pointers of the (sub)schemas for which `match` holds, in document order."""
    found: list[str] = []

    def walk(node: Any, path: list[Any]) -> None:
        if len(found) >= limit:
            return
        if isinstance(node, dict):
            if match(node):
                found.append(_pointer(path))
            for key, value in node.items():
                if key in _DATA_KEYS:
                    continue
                if key in _NAME_MAPS and isinstance(value, dict):
                    for name, sub in value.items():
                        walk(sub, path + [key, name])
                else:
                    walk(value, path + [key])
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, path + [i])

    walk(schema, [])
    return found


def _where(locations: list[str]) -> str:
    if not locations:
        return ""
    shown = ", ".join("the schema root" if loc == "/" else loc for loc in locations)
    return f" (at {shown})"


def _check_meta_schema(schema: Any, param: str) -> None:
    """Validate the schema against its draft's meta-schema (2020-12 when `$schema` is absent)."""
    import jsonschema

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown $schema URIs warn and fall back to the default
        try:
            validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        except Exception:  # an unknown $schema that jsonschema refuses outright
            validator = jsonschema.Draft202012Validator
        try:
            validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            where = _pointer(list(exc.absolute_path))
            where = "the schema root" if where == "/" else where
            raise ConstraintError(param, f"invalid JSON Schema at {where}: {exc.message}") from None


_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[(.*)\]")
_UNKNOWN_FORMAT = re.compile(r"Unknown format: (.*)")


def json_schema_error(message: str, schema: Any, param: str = "json_schema") -> ConstraintError:
    """A readable ConstraintError for llguidance's JSON-Schema compile error `message`,
    naming the unsupported keyword or format and where it occurs in `schema`."""
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    match = _UNIMPLEMENTED.search(first)
    if match:
        try:
            keywords = [str(k) for k in json.loads(f"[{match.group(1)}]")]
        except json.JSONDecodeError:
            keywords = [match.group(1)]
        names = ", ".join(f"'{k}'" for k in keywords)
        locations = _schema_locations(schema, lambda node: any(k in node for k in keywords))
        plural = "s" if len(keywords) > 1 else ""
        return ConstraintError(param, f"unsupported JSON Schema keyword{plural} {names}{_where(locations)}")
    match = _UNKNOWN_FORMAT.search(first)
    if match:
        fmt = match.group(1).strip()
        locations = _schema_locations(schema, lambda node: node.get("format") == fmt)
        return ConstraintError(param, f"unsupported string format '{fmt}'{_where(locations)}")
    if "oneOf constraints are not supported" in first:
        locations = _schema_locations(schema, lambda node: "oneOf" in node)
        return ConstraintError(
            param,
            "unsupported 'oneOf'"
            + _where(locations)
            + ": only a oneOf whose branches provably exclude each other is supported"
            " (treating it as anyOf would accept instances matching several branches)",
        )
    cause = regex_error_cause(message)
    if cause is not None or "regex" in first:
        return ConstraintError(param, f"unsupported regular expression in the schema: {cause or first}")
    if "min/maxProperties" in first:
        locations = _schema_locations(schema, lambda node: "minProperties" in node or "maxProperties" in node)
        return ConstraintError(param, f"unsupported use of minProperties/maxProperties{_where(locations)}: {first}")
    return ConstraintError(param, f"cannot compile the schema: {first}")


def normalize_schema(schema: Any) -> Any:
    """Sound rewrites that let llguidance compile more schemas without changing their
    meaning: `uniqueItems: false` (a no-op) is dropped. Returns a new object; data values
    (`enum`, `const`, `default`, ...) are never touched."""
    if isinstance(schema, list):
        return [normalize_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "uniqueItems" and value is False:
            continue
        if key in _DATA_KEYS:
            out[key] = value
        elif key in _NAME_MAPS and isinstance(value, dict):
            out[key] = {name: normalize_schema(sub) for name, sub in value.items()}
        else:
            out[key] = normalize_schema(value)
    return out


# ---------------------------------------------------------------- optional JSON bounds

# Where a subschema sits decides whether narrowing it narrows the whole schema ("monotone"):
# under `properties`, `items`, `allOf`, `anyOf`, `then`... it does; under `not` it widens the
# whole, under `if` (which branch applies), `oneOf` ("exactly one" may start to hold) and
# `contains` (with `maxContains`) it may do either. Bounds go into monotone positions only.
_MONOTONE_ONE = frozenset({
    "items", "additionalItems", "additionalProperties", "propertyNames", "then", "else",
    "unevaluatedItems", "unevaluatedProperties",
})
_MONOTONE_LIST = frozenset({"allOf", "anyOf", "prefixItems", "items"})
_MONOTONE_MAP = frozenset({"properties", "patternProperties", "dependentSchemas", "dependencies", "$defs", "definitions"})
_NON_MONOTONE = frozenset({"not", "if", "oneOf", "contains"})
# Positions that hold the value of a property or an item of the instance itself (not a schema
# combined with others): only there may an object be closed to its listed properties.
_STRUCTURAL = frozenset({"properties", "patternProperties", "additionalProperties", "items", "prefixItems", "additionalItems"})
# Keys that assert nothing: a schema made of these alone admits any JSON value.
_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "example", "$comment", "$id", "$schema", "$anchor",
    "deprecated", "readOnly", "writeOnly", "x-guidance",
})
# A node with one of these is composed elsewhere (a $ref target, branches): it gets no bounds or
# implicit-value rewrites of its own unless its `type` says what it is; its parts get theirs.
_COMPOSED = frozenset({"$ref", "$dynamicRef", "allOf", "anyOf", "oneOf", "not", "if", "dependentSchemas", "dependencies"})
# How deep free-form values (`{}`, `true`, unlisted properties, untyped items) may nest once
# bounds are on: arrays and objects below this depth hold scalars only.
FREE_VALUE_DEPTH = 3


def _free_value(limits: ConstraintLimits, depth: int = FREE_VALUE_DEPTH) -> dict[str, Any]:
    """A schema for "any JSON value" narrowed by the bounds: strings, arrays and objects capped,
    nested at most `depth` levels (a subset of `{}`, so sound wherever `{}` or `true` stands)."""
    node: dict[str, Any] = {}
    if limits.json_max_string_length is not None:
        node["maxLength"] = limits.json_max_string_length
    if limits.json_max_integer_digits is not None:
        _cap_magnitude(node, 10**limits.json_max_integer_digits - 1)
    if depth <= 0:
        node["type"] = ["null", "boolean", "number", "string"]
        return node
    inner = _free_value(limits, depth - 1)
    if limits.json_max_items is not None:
        node["maxItems"] = limits.json_max_items
    node["items"] = inner
    if limits.json_max_properties is not None:
        node["maxProperties"] = limits.json_max_properties
    node["additionalProperties"] = inner
    return node


def _cap(node: dict[str, Any], upper: str, lower: str, bound: int) -> None:
    """node[upper] = min(node[upper], bound), unless that would fall below node[lower]."""
    current = node.get(upper)
    minimum = node.get(lower, 0)
    if not isinstance(minimum, (int, float)) or minimum > bound:
        return
    if isinstance(current, (int, float)) and not isinstance(current, bool) and current <= bound:
        return
    node[upper] = bound


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cap_magnitude(node: dict[str, Any], bound: int) -> None:
    """node's numbers confined to [-bound, bound] (`minimum`/`maximum` only ever tightened),
    unless that would leave no number the node's own bounds admit."""
    low = [node[k] for k in ("minimum", "exclusiveMinimum") if _is_number(node.get(k))]
    high = [node[k] for k in ("maximum", "exclusiveMaximum") if _is_number(node.get(k))]
    if any(v > bound for v in low) or any(v < -bound for v in high):
        return
    if not _is_number(node.get("maximum")) or node["maximum"] > bound:
        node["maximum"] = bound
    if not _is_number(node.get("minimum")) or node["minimum"] < -bound:
        node["minimum"] = -bound


def _schema_entries(node: Any, stop: frozenset[str] = frozenset()) -> Iterator[tuple[str, Any]]:
    """(keyword, value) of every keyword of `node` and of its subschemas, outermost first.
    Data values (`enum`, `const`, ...) are not looked into, nor are the values of `stop`
    keywords (they are yielded, not descended into); names in `properties`, `$defs`, ... are
    names, not keywords."""
    if isinstance(node, list):
        for item in node:
            yield from _schema_entries(item, stop)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        yield key, value
        if key in _DATA_KEYS or key in stop:
            continue
        if key in _NAME_MAPS and isinstance(value, dict):
            for sub in value.values():
                yield from _schema_entries(sub, stop)
        else:
            yield from _schema_entries(value, stop)


def _keys_anywhere(schema: Any, keys: frozenset[str]) -> bool:
    """Whether any (sub)schema of `schema` uses one of `keys` (data values are not looked into)."""
    return any(key in keys for key, _ in _schema_entries(schema))


def tighten_schema(schema: Any, limits: ConstraintLimits) -> Any:
    """`schema` with the optional JSON bounds of `limits` added (a new object; `schema` itself is
    not modified; returned unchanged when no bound is set).

    Only ever stricter: bounds go into monotone positions only (see _MONOTONE_*), where adding
    `maxLength`, `maxItems` or `maxProperties` to a subschema, or replacing `true`, `{}` or an
    implicit "anything" (an absent `additionalProperties` or `items`) by a narrower schema, can
    only remove instances of the whole; so every output still validates against the original.
    Subschemas under `not`, `if`, `oneOf` and `contains` are left as they are, and so are the
    root definitions (`$defs`, `definitions`) they can reach through `$ref`, transitively; when
    such a subschema holds a reference that is not a plain `#/$defs/name` pointer (which could
    lead anywhere), the schema is not tightened at all. Implicit values are not rewritten where
    `unevaluatedProperties` or `unevaluatedItems` occur (an explicit `additionalProperties`
    would change what counts as evaluated).

    Free values are bounded recursively (`_free_value`, nested at most FREE_VALUE_DEPTH deep).
    With `json_max_properties`, an object in a structural position (a property value, an array
    item: not a branch of a combination) that lists its properties and says nothing of others
    admits only the listed ones: llguidance can count properties only where every listed one is
    required, so this is how such objects stay finite. Where a bound would contradict the schema
    (`minLength` above it) or llguidance cannot enforce it (`maxProperties` beside optional
    listed properties) it is left out; nodes with `enum` or `const` are finite already. An
    explicitly open object (`additionalProperties: true` or a schema) beside optional listed
    properties keeps an unbounded number of properties."""
    if not limits.bounds_json:
        return schema
    keep = _defs_reached_from_non_monotone(schema)
    if keep is None:
        return schema
    fill = not _keys_anywhere(schema, frozenset({"unevaluatedProperties", "unevaluatedItems"}))
    return _tighten(schema, limits, fill, structural=True, keep_defs=keep)


def _defs_reached_from_non_monotone(schema: Any) -> frozenset[tuple[str, str]] | None:
    """The root definitions, as (map, name), that a non-monotone subschema reaches through
    `$ref` (transitively): tightening them could loosen a `not`/`oneOf`. None when one of those
    references is not a plain pointer to a root definition."""
    if not isinstance(schema, dict):
        return frozenset()
    defs = {(m, name): sub for m in ("$defs", "definitions") if isinstance(schema.get(m), dict)
            for name, sub in schema[m].items()}
    reached: set[tuple[str, str]] = set()
    # The outermost subschemas under `not`, `if`, `oneOf`, `contains`, then what they reference.
    pending = [value for key, value in _schema_entries(schema, stop=_NON_MONOTONE) if key in _NON_MONOTONE]
    while pending:
        refs = [value if key == "$ref" else None for key, value in _schema_entries(pending.pop())
                if key in ("$ref", "$dynamicRef")]  # a $dynamicRef could lead anywhere: None
        for ref in refs:
            parts = ref[2:].split("/") if isinstance(ref, str) and ref.startswith("#/") else []
            target = (parts[0], parts[1].replace("~1", "/").replace("~0", "~")) if len(parts) == 2 else None
            if target not in defs:
                return None
            if target not in reached:
                reached.add(target)
                pending.append(defs[target])
    return frozenset(reached)


def _tighten(node: Any, limits: ConstraintLimits, fill: bool, structural: bool,
             keep_defs: frozenset[tuple[str, str]] = frozenset()) -> Any:
    if node is True:
        return _free_value(limits) if fill else node
    if not isinstance(node, dict):
        return node
    if fill and not set(node) - _ANNOTATIONS:
        return {**node, **_free_value(limits)}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DATA_KEYS or key in _NON_MONOTONE:
            out[key] = value
        elif key in _MONOTONE_MAP and isinstance(value, dict):
            inner = key in _STRUCTURAL
            out[key] = {name: _tighten(sub, limits, fill, inner) if isinstance(sub, (dict, bool)) and (key, name) not in keep_defs
                        else sub for name, sub in value.items()}
        elif key in _MONOTONE_ONE and isinstance(value, (dict, bool)):
            out[key] = _tighten(value, limits, fill, key in _STRUCTURAL)
        elif key in _MONOTONE_LIST and isinstance(value, list):
            out[key] = [_tighten(sub, limits, fill, key in _STRUCTURAL) for sub in value]
        else:
            out[key] = value
    if "enum" in out or "const" in out:
        return out
    declared = out.get("type")
    types = {declared} if isinstance(declared, str) else set(declared) if isinstance(declared, list) else None
    composed = any(key in out for key in _COMPOSED)
    if types is None and composed:
        return out

    def may_be(kind: str) -> bool:
        return types is None or kind in types

    if limits.json_max_string_length is not None and may_be("string"):
        _cap(out, "maxLength", "minLength", limits.json_max_string_length)
    if limits.json_max_integer_digits is not None and (may_be("integer") or may_be("number")):
        _cap_magnitude(out, 10**limits.json_max_integer_digits - 1)
    if may_be("array"):
        if limits.json_max_items is not None:
            _cap(out, "maxItems", "minItems", limits.json_max_items)
        if fill and not composed and "items" not in out and "prefixItems" not in out:
            out["items"] = _free_value(limits)
    if may_be("object"):
        properties = out.get("properties") if isinstance(out.get("properties"), dict) else {}
        required = set(out.get("required", [])) if isinstance(out.get("required"), list) else set()
        plain = "patternProperties" not in out
        cap = limits.json_max_properties
        if fill and not composed and "additionalProperties" not in out:
            # Unlisted properties are implicitly allowed. With a property cap, an object that
            # lists its properties gets only those (llguidance cannot count unlisted ones next to
            # optional listed ones); otherwise their values are bounded free values.
            if cap is not None and structural and properties and plain and required <= set(properties):
                out["additionalProperties"] = False
            else:
                out["additionalProperties"] = _free_value(limits)
        # llguidance enforces maxProperties only where every listed property is required.
        if cap is not None and plain and set(properties) <= required and len(required) <= cap:
            _cap(out, "maxProperties", "minProperties", cap)
    return out


def _finite_candidates(schema: Any) -> list[Any] | None:
    """The values a schema is confined to by a top-level `const` / `enum` (also inside a
    top-level `allOf`), or None when it is not visibly confined to a finite set."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return [schema["const"]]
    if isinstance(schema.get("enum"), list):
        return list(schema["enum"])
    for sub in schema.get("allOf", []) if isinstance(schema.get("allOf"), list) else []:
        found = _finite_candidates(sub)
        if found is not None:
            return found
    return None


def finite_enum_schema(schema: Any, max_values: int) -> dict[str, Any] | None:
    """For a schema confined to a finite set of values (see `_finite_candidates`), the
    equivalent `{"enum": [...]}` of the candidates the reference validator (`jsonschema`, with
    its format checker) accepts; None when not applicable. This lets schemas that combine an
    enum with keywords llguidance lacks (`not`, `if`, ...) compile exactly: membership of
    each value is decided by the reference implementation, so nothing invalid is admitted."""
    import jsonschema

    candidates = _finite_candidates(schema)
    if candidates is None or len(candidates) > max_values:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
            validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
            survivors: dict[str, Any] = {}
            for value in candidates:
                if validator.is_valid(value):
                    survivors.setdefault(json.dumps(value, sort_keys=True), value)
        except Exception:  # unresolvable $ref, a pattern Python cannot compile...
            return None
    return {"enum": list(survivors.values())}


def _load_schema(text: str, param: str) -> Any:
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConstraintError(param, f"the schema is not valid JSON: {exc}") from None
    if isinstance(schema, bool):
        if not schema:
            raise ConstraintError(param, "the schema is `false`: no output can satisfy it")
        return schema
    if not isinstance(schema, dict):
        raise ConstraintError(param, f"the schema must be a JSON object, got {type(schema).__name__}")
    return schema


# ---------------------------------------------------------------- grammar builders (the registry)


def _check_size(spec: ConstraintSpec, limits: ConstraintLimits) -> None:
    size = sum(len(v.encode("utf-8")) for v in spec.value) if isinstance(spec.value, tuple) else len(spec.value.encode("utf-8"))
    if size > limits.max_spec_bytes:
        raise ConstraintError(spec.kind, f"the constraint is {size} bytes, over the limit of {limits.max_spec_bytes}")


def _regex_grammar(spec: ConstraintSpec, limits: ConstraintLimits) -> str:
    import llguidance

    assert isinstance(spec.value, str)
    return llguidance.LLMatcher.grammar_from_regex(spec.value)


def choice_lark(choices: Sequence[str]) -> str:
    """A Lark grammar whose language is exactly `choices` (duplicates dropped, order kept).
    Literals are JSON-escaped, which llguidance's Lark string syntax reads."""
    unique = list(dict.fromkeys(choices))
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in unique) + "\n"


def _choice_grammar(spec: ConstraintSpec, limits: ConstraintLimits) -> str:
    import llguidance

    choices = spec.value
    assert isinstance(choices, tuple)
    if not choices:
        raise ConstraintError("choice", "at least one choice is required")
    if len(choices) > limits.max_choices:
        raise ConstraintError("choice", f"{len(choices)} choices, over the limit of {limits.max_choices}")
    if all(c == "" for c in choices):
        raise ConstraintError("choice", "the only choice is the empty string")
    return llguidance.LLMatcher.grammar_from_lark(choice_lark(choices))


def json_schema_grammar(schema: Any, limits: ConstraintLimits | None, param: str = "json_schema") -> str:
    """llguidance's grammar for a JSON Schema (with our compile options when `limits` is given).
    A schema llguidance cannot even serialize (an integer beyond 64 bits, say) is a
    ConstraintError on `param`, like every other bad schema."""
    import llguidance

    options = json_compile_options(limits) if limits is not None else None
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ConstraintError(param, f"cannot compile the schema: {exc}") from None


def compiling_bounds(schema: Any, limits: ConstraintLimits, param: str = "json_schema") -> ConstraintLimits:
    """The first of `limits.json_bound_fallbacks()` under which llguidance compiles `schema`
    tightened by it (the last, without bounds, when none does: its errors are the schema's
    own). Bounds can make a schema fail to compile (a `pattern` longer than the string cap,
    `maxProperties` beside an `allOf`); the schema then keeps as many of them as it can."""
    import llguidance

    chain = limits.json_bound_fallbacks()
    for looser in chain[:-1]:
        if not llguidance.LLMatcher.validate_grammar(json_schema_grammar(tighten_schema(schema, looser), looser, param)):
            return looser
    return chain[-1]


def _json_schema_grammar(spec: ConstraintSpec, limits: ConstraintLimits) -> str:
    assert isinstance(spec.value, str)
    schema = _load_schema(spec.value, "json_schema")
    if isinstance(schema, dict):
        _check_meta_schema(schema, "json_schema")
        schema = normalize_schema(schema)
    bounds = compiling_bounds(schema, limits)
    return json_schema_grammar(tighten_schema(schema, bounds), bounds)


def _json_object_grammar(spec: ConstraintSpec, limits: ConstraintLimits) -> str:
    return json_schema_grammar({"type": "object"}, limits)


def _lark_grammar(spec: ConstraintSpec, limits: ConstraintLimits) -> str:
    import llguidance

    assert isinstance(spec.value, str)
    check_lark_grammar(spec.value, "grammar")
    return llguidance.LLMatcher.grammar_from_lark(spec.value)


GRAMMAR_BUILDERS: Mapping[str, Callable[[ConstraintSpec, ConstraintLimits], str]] = MappingProxyType(
    {
        "regex": _regex_grammar,
        "choice": _choice_grammar,
        "json_schema": _json_schema_grammar,
        "json_object": _json_object_grammar,
        "grammar": _lark_grammar,
    }
)


# How llguidance words a resource limit hit while compiling (grammar size, lexer fuel/states).
_LIMIT_MARKERS = ("too big (limit", "fuel", "too complex", "stack level exceeded", "lexer states", "too many")


def _compile_error(spec: ConstraintSpec, message: str) -> ConstraintError:
    """llguidance's construction error for `spec`, worded for the client."""
    first = message.strip().splitlines()[0].lower() if message.strip() else ""
    if any(marker in first for marker in _LIMIT_MARKERS):
        return ConstraintError(spec.kind, f"the constraint is too complex to compile within the configured limits: {message.strip().splitlines()[0]}")
    if spec.kind == "json_schema":
        assert isinstance(spec.value, str)
        return json_schema_error(message, json.loads(spec.value))
    if spec.kind == "regex":
        cause = regex_error_cause(message)
        if cause is not None:
            return ConstraintError("regex", f"invalid or unsupported regular expression: {cause}{_regex_caret(message)}")
        return ConstraintError("regex", f"invalid regular expression: {message.strip().splitlines()[0]}")
    if spec.kind == "grammar":
        assert isinstance(spec.value, str)
        return grammar_error(message, spec.value, "grammar")
    return ConstraintError(spec.kind, message.strip().splitlines()[0] if message.strip() else "cannot compile")


def _regex_caret(message: str) -> str:
    """The regex and caret lines llguidance quotes under "regex parse error:" (indented)."""
    lines = message.splitlines()
    for i, line in enumerate(lines):
        if line.rstrip().endswith("regex parse error:") and i + 2 < len(lines):
            return f"\n{lines[i + 1]}\n{lines[i + 2]}"
    return ""


# ---------------------------------------------------------------- the compiler


def _build_lltokenizer(tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int] | None) -> Any:
    import llguidance
    import llguidance.hf

    if isinstance(tokenizer, llguidance.LLTokenizer):
        return tokenizer
    eos = list(eos_token_ids) if eos_token_ids else None
    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
    except Exception as exc:
        raise ValueError(f"cannot build the llguidance tokenizer from {type(tokenizer).__name__}: {exc}") from exc


class ConstraintCompiler:
    """Compiles ConstraintSpecs for one tokenizer and vocabulary; the engine holds one.

    Thread-safe (`compile` may run in the server's threads while the engine fills masks).
    `vocab_size` is the model's (logits width); tokens past the tokenizer's vocabulary are
    always disallowed. `eos_token_ids` (default: the tokenizer's EOS) are the tokens allowed
    exactly where the grammar accepts."""

    _TOKENIZER_ATTR = "_radixserve_constraint_compilers"

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        limits: ConstraintLimits | None = None,
        *,
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
        import llguidance

        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        self.limits = limits or ConstraintLimits()
        self.vocab_size = vocab_size
        self._lltok = _build_lltokenizer(tokenizer, vocab_size, eos_token_ids)
        self._eos = tuple(int(t) for t in self._lltok.eos_tokens)
        lim = self.limits
        self._ll_limits = llguidance.LLParserLimits(
            max_items_in_row=lim.max_items_in_row,
            initial_lexer_fuel=lim.initial_lexer_fuel,
            step_lexer_fuel=lim.step_lexer_fuel,
            step_max_items=lim.step_max_items,
            max_lexer_states=lim.max_lexer_states,
            max_grammar_size=lim.max_grammar_size,
            verbose_errors=False,
        )
        self._cache: OrderedDict[ConstraintSpec, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._executor: Any = None

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, vocab_size: int, limits: ConstraintLimits | None = None) -> "ConstraintCompiler":
        """The compiler for (tokenizer, vocab_size, limits), built once and kept on the
        tokenizer object itself (so its lifetime follows the tokenizer's; no module state)."""
        limits = limits or ConstraintLimits()
        key = (vocab_size, limits)
        registry = getattr(tokenizer, cls._TOKENIZER_ATTR, None)
        if isinstance(registry, dict) and key in registry:
            return registry[key]
        compiler = cls(tokenizer, vocab_size, limits)
        try:
            if not isinstance(registry, dict):
                registry = {}
                object.__setattr__(tokenizer, cls._TOKENIZER_ATTR, registry)
            registry[key] = compiler
        except (AttributeError, TypeError):
            logger.warning("cannot cache the constraint compiler on %s; hold a ConstraintCompiler instead", type(tokenizer).__name__)
        return compiler

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def lltokenizer(self) -> Any:
        """The llguidance tokenizer (shared, immutable)."""
        return self._lltok

    def grammar(self, spec: ConstraintSpec) -> str:
        """The llguidance grammar text for `spec` (raises ConstraintError for what the
        builders reject up front; compile errors surface in `compile`)."""
        if not isinstance(spec, ConstraintSpec):
            raise TypeError(f"expected a ConstraintSpec, got {type(spec).__name__}")
        _check_size(spec, self.limits)
        return GRAMMAR_BUILDERS[spec.kind](spec, self.limits)

    def _compile_template(self, spec: ConstraintSpec) -> Any:
        import llguidance

        grammar = self.grammar(spec)
        matcher = llguidance.LLMatcher(self._lltok, grammar, log_level=0, limits=self._ll_limits)
        if matcher.is_error() and spec.kind == "json_schema":
            matcher = self._finite_enum_fallback(spec, matcher)
        if matcher.is_error():
            raise _compile_error(spec, matcher.get_error())
        self._probe_first_step(spec, matcher)
        for warning in matcher.get_grammar_warnings():
            logger.debug("grammar warning for %s constraint: %s", spec.kind, warning)
        return matcher

    def _probe_first_step(self, spec: ConstraintSpec, matcher: Any) -> None:
        """Compute the first token mask now, on a copy: a constraint that compiles but exceeds
        the parser's limits on its first step, or a JSON constraint that admits no value at all
        (e.g. a schema whose only definition refers to itself), is the client's error (400),
        not a generation failure later."""
        probe = TokenMatcher(matcher.deep_copy(), self.vocab_size, self._eos)
        bitmask = allocate_bitmask(1, self.vocab_size)
        probe.fill_bitmask(bitmask, 0)
        if probe.is_error():
            raise _compile_error(spec, f"the constraint exceeds the parser's limits: {probe.error()}")
        if spec.kind in ("json_schema", "json_object"):
            allowed = unpack_bitmask(bitmask, self.vocab_size)[0]
            allowed[list(self._eos)] = False
            if not bool(allowed.any()):
                raise _compile_error(spec, "the schema admits no JSON value")

    def _finite_enum_fallback(self, spec: ConstraintSpec, failed: Any) -> Any:
        """When llguidance cannot compile a schema confined to a finite enum, compile the enum
        of the values the reference validator accepts instead (see `finite_enum_schema`)."""
        import llguidance

        assert isinstance(spec.value, str)
        replacement = finite_enum_schema(json.loads(spec.value), self.limits.max_choices)
        if replacement is None:
            return failed
        if not replacement["enum"]:
            raise ConstraintError("json_schema", "no value satisfies the schema (every value of its enum/const is excluded)")
        grammar = json_schema_grammar(replacement, self.limits)
        matcher = llguidance.LLMatcher(self._lltok, grammar, log_level=0, limits=self._ll_limits)
        return failed if matcher.is_error() else matcher

    def compile(self, spec: ConstraintSpec) -> TokenMatcher:
        """A fresh TokenMatcher for `spec`; raises ConstraintError if it cannot be compiled.
        Repeated specs hit the cache (errors are cached too)."""
        template = None
        if self.limits.cache_size:
            with self._lock:
                template = self._cache.get(spec)
                if template is not None:
                    self._cache.move_to_end(spec)
        if template is None:
            try:
                template = self._compile_template(spec)
            except ConstraintError as exc:
                template = exc
            if self.limits.cache_size:
                with self._lock:
                    self._cache[spec] = template
                    while len(self._cache) > self.limits.cache_size:
                        self._cache.popitem(last=False)
        if isinstance(template, ConstraintError):
            raise ConstraintError(template.param, template.message, line=template.line, column=template.column)
        return TokenMatcher(template.deep_copy(), self.vocab_size, self._eos)

    def fill_bitmasks(self, matchers: Sequence[tuple[TokenMatcher, int]], bitmask: torch.Tensor) -> None:
        """Fill `bitmask[row]` for every (matcher, row), in parallel on llguidance's thread
        pool (`ConstraintLimits.mask_threads`). Same result as calling `fill_bitmask` on each."""
        if not matchers:
            return
        if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or bitmask.dim() != 2 or not bitmask.is_contiguous():
            raise ValueError("fill_bitmasks: bitmask must be a contiguous 2-D int32 CPU tensor")
        words = bitmask.shape[1]
        if words != bitmask_width(self.vocab_size):
            for matcher, row in matchers:
                matcher.fill_bitmask(bitmask, row)
            return
        if self._executor is None:
            import llguidance

            with self._lock:
                if self._executor is None:
                    self._executor = llguidance.LLExecutor(self.limits.mask_threads)
        pairs = [(m.llmatcher, int(row)) for m, row in matchers]
        for _, row in pairs:
            if not 0 <= row < bitmask.shape[0]:
                raise IndexError(f"fill_bitmasks: row {row} out of range for {bitmask.shape[0]} rows")
        self._executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), words * 4, bitmask.shape[0])


def check_constraint(spec: ConstraintSpec, limits: ConstraintLimits | None = None) -> None:
    """Raise ConstraintError unless `spec` would compile, without a tokenizer (for early
    validation in the server or the DSL). Special tokens named in a Lark grammar are only
    checked against the real tokenizer, at compile time."""
    import llguidance

    limits = limits or ConstraintLimits()
    _check_size(spec, limits)
    grammar = GRAMMAR_BUILDERS[spec.kind](spec, limits)
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error and spec.kind == "json_schema":
        assert isinstance(spec.value, str)
        replacement = finite_enum_schema(json.loads(spec.value), limits.max_choices)
        if replacement is not None:
            if not replacement["enum"]:
                raise ConstraintError("json_schema", "no value satisfies the schema (every value of its enum/const is excluded)")
            error = llguidance.LLMatcher.validate_grammar(json_schema_grammar(replacement, limits))
    if error:
        raise _compile_error(spec, error)


def compile_constraint(spec: ConstraintSpec, tokenizer: Any, vocab_size: int, limits: ConstraintLimits | None = None) -> TokenMatcher:
    """Compile `spec` for `tokenizer` (a Hugging Face fast tokenizer or an llguidance
    LLTokenizer) and a model vocabulary of `vocab_size`. The per-tokenizer compiler (with its
    llguidance tokenizer and grammar cache) is built on first use and kept on the tokenizer
    object: see `ConstraintCompiler.for_tokenizer`."""
    return ConstraintCompiler.for_tokenizer(tokenizer, vocab_size, limits).compile(spec)
