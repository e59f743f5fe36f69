"""OpenAI `response_format` and the constraint extension fields -> one `ConstraintSpec`.

Fields (at most one may constrain the output; a second one is a conflict, not a silent pick):
  * `response_format`: {"type": "text"} (no constraint), {"type": "json_object"} (any JSON
    object), {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}. `strict` is
    accepted either way: the schema is always enforced strictly, and a keyword we cannot enforce
    is an error, never ignored.
  * extensions: `regex` (the whole output matches it), `choice` (exactly one of the strings),
    `grammar` (Lark, llguidance dialect), `json_schema` (a schema as an object or JSON text),
    and on native endpoints `json_object`.

`constraint_from_request` also checks, without a tokenizer, that the constraint compiles, so a
bad schema, regex or grammar is a 400 naming the field (ConstraintError's `param`) before the
request reaches the engine. Pure functions; no server framework.
"""

from __future__ import annotations

import json
import re
from typing import Any

from radixserve.runtime.constraints.config import ConstraintLimits
from radixserve.runtime.constraints.errors import ConstraintError
from radixserve.runtime.constraints.spec import ConstraintSpec

_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def _as_dict(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json", by_alias=True, exclude_none=True)
    return obj


def _schema_spec(schema: Any, param: str) -> ConstraintSpec:
    """A json_schema spec from a schema given as an object, a boolean or JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ConstraintError(param, f"the schema is not valid JSON: {exc}") from None
    if isinstance(schema, bool):
        if not schema:
            raise ConstraintError(param, "the schema is `false`: no output can satisfy it")
        schema = {}
    if not isinstance(schema, dict):
        raise ConstraintError(param, f"the schema must be a JSON object, got {type(schema).__name__}")
    try:
        return ConstraintSpec.json_schema(schema)
    except ConstraintError as exc:
        raise exc.with_param(param) from None


def response_format_constraint(response_format: Any) -> ConstraintSpec | None:
    """The ConstraintSpec of an OpenAI `response_format` (dict or pydantic model); None for
    type "text" or when absent."""
    rf = _as_dict(response_format)
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise ConstraintError("response_format", "response_format must be an object with a `type`")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ConstraintSpec("json_object")
    if kind != "json_schema":
        raise ConstraintError("response_format", f"unknown response_format type {kind!r}; expected 'text', 'json_object' or 'json_schema'")
    body = rf.get("json_schema")
    if not isinstance(body, dict):
        raise ConstraintError("response_format.json_schema", "response_format of type json_schema needs a `json_schema` object")
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or not _SCHEMA_NAME.match(name)):
        raise ConstraintError("response_format.json_schema.name", f"name must match {_SCHEMA_NAME.pattern}, got {name!r}")
    strict = body.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ConstraintError("response_format.json_schema.strict", "strict must be a boolean")
    if "schema" not in body or body["schema"] is None:
        raise ConstraintError("response_format.json_schema.schema", "response_format of type json_schema needs json_schema.schema")
    return _schema_spec(body["schema"], "response_format.json_schema.schema")


def constraint_from_request(
    *,
    response_format: Any = None,
    regex: Any = None,
    choice: Any = None,
    grammar: Any = None,
    json_schema: Any = None,
    json_object: bool = False,
    validate: bool = True,
    limits: ConstraintLimits | None = None,
) -> ConstraintSpec | None:
    """The one ConstraintSpec these request fields ask for (None if none does). Raises
    ConstraintError naming the field: a malformed value, an uncompilable constraint (when
    `validate`), or two fields at once."""
    sources: list[tuple[str, ConstraintSpec]] = []
    rf_spec = response_format_constraint(response_format)
    if rf_spec is not None:
        sources.append(("response_format", rf_spec))
    if regex is not None:
        if not isinstance(regex, str) or not regex:
            raise ConstraintError("regex", "regex must be a non-empty string")
        sources.append(("regex", ConstraintSpec("regex", regex)))
    if choice is not None:
        if isinstance(choice, str) or not isinstance(choice, (list, tuple)) or not choice:
            raise ConstraintError("choice", "choice must be a non-empty list of strings")
        if not all(isinstance(c, str) for c in choice):
            raise ConstraintError("choice", "every choice must be a string")
        sources.append(("choice", ConstraintSpec("choice", tuple(choice))))
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise ConstraintError("grammar", "grammar must be a non-empty string (Lark syntax)")
        sources.append(("grammar", ConstraintSpec("grammar", grammar)))
    if json_schema is not None:
        sources.append(("json_schema", _schema_spec(json_schema, "json_schema")))
    if json_object:
        sources.append(("json_object", ConstraintSpec("json_object")))
    if len(sources) > 1:
        names = " and ".join(f"`{name}`" for name, _ in sources)
        raise ConstraintError(sources[1][0], f"at most one output constraint may be given; got {names}")
    if not sources:
        return None
    name, spec = sources[0]
    if validate:
        if name == "response_format" and spec.kind == "json_schema":
            name = "response_format.json_schema.schema"
        check_spec(spec, name, limits)
    return spec


def check_spec(spec: ConstraintSpec, param: str, limits: ConstraintLimits | None = None) -> None:
    """Tokenizer-free compile check of `spec`; errors are re-attributed to `param` (e.g.
    "response_format.json_schema.schema")."""
    from radixserve.runtime.constraints.compiler import check_constraint

    try:
        check_constraint(spec, limits)
    except ConstraintError as exc:
        if exc.param == param:
            raise
        raise exc.with_param(param) from None
