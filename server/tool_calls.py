"""Tool calls: validating OpenAI `tools`, constraining the output to calls, parsing calls back.

Output format (what the constraint enforces and the parsers read):

    <tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}, ...]</tool_call>

a JSON list of call objects between `<tool_call>` tags. This is the format SmolLM2-Instruct
(the default model) was fine-tuned on for function calling: its tool-use prompt asks for exactly
such a list, so constrained decoding stays in the model's distribution. The tags are plain text
for this tokenizer (not special tokens). With `parallel_tool_calls=False` the list holds exactly
one call. The model's own chat template knows nothing of tools, so the server adds the tool
descriptions to the system prompt with `tools_system_prompt` (same format).

`tool_choice`:
  * "none": no constraint, no parsing (None);
  * "required": the whole output is one tool-call block with >= 1 call of any tool;
  * {"type": "function", "function": {"name": N}}: the same, restricted to tool N;
  * "auto" (the default when tools are given): free text, or text followed by one tool-call
    block. Once `<tool_call>` appears, the rest is constrained like "required" (a lazy Lark
    lexeme ends the free text at the tag). With a JSON `response_format`, the free-text branch
    is that JSON instead.
In every case a call's `arguments` must validate against its tool's `parameters` schema.

Everything here is a pure function or a small stateful parser; no server framework. Errors are
`ConstraintError` (a ValueError with `.param`), which the server maps to 400.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from radixserve.runtime.constraints.config import ConstraintLimits
from radixserve.runtime.constraints.errors import ConstraintError
from radixserve.runtime.constraints.spec import ConstraintSpec

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_ID_ALPHABET = string.ascii_letters + string.digits


# ---------------------------------------------------------------- tools


@dataclass(frozen=True)
class ToolSpec:
    """One validated function tool. `parameters` is its arguments' JSON Schema (an object
    schema; `{"type": "object", "properties": {}, "additionalProperties": false}` when the
    client gave none, i.e. a function without arguments)."""

    name: str
    description: str | None
    parameters: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["parameters"] = dict(self.parameters)
        return out


_NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def _as_dict(obj: Any) -> Any:
    """Plain data from a dict or a pydantic model (the server's protocol objects)."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json", by_alias=True, exclude_none=True)
    return obj


def validate_tools(tools: Sequence[Any] | None, *, limits: ConstraintLimits | None = None) -> list[ToolSpec]:
    """Check OpenAI `tools` ([{"type": "function", "function": {"name", "description",
    "parameters"}}]) and return them as ToolSpecs. Each `parameters` schema must be a valid
    JSON Schema for an object that llguidance can compile strictly; otherwise ConstraintError
    (param "tools") naming the tool and the problem."""
    from radixserve.runtime.constraints.compiler import _check_meta_schema, json_schema_error, json_schema_grammar

    import llguidance

    limits = limits or ConstraintLimits()
    if tools is None:
        return []
    if not isinstance(tools, (list, tuple)):
        raise ConstraintError("tools", "tools must be a list")
    specs: list[ToolSpec] = []
    seen: set[str] = set()
    for i, raw in enumerate(tools):
        tool = _as_dict(raw)
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
            raise ConstraintError("tools", f"{where}: expected {{\"type\": \"function\", \"function\": {{...}}}}")
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConstraintError("tools", f"{where}: function name must match {_NAME_RE.pattern}, got {name!r}")
        if name in seen:
            raise ConstraintError("tools", f"{where}: duplicate function name {name!r}")
        seen.add(name)
        where = f"tools[{i}] ({name!r})"
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise ConstraintError("tools", f"{where}: description must be a string")
        params = fn.get("parameters")
        if params is None:
            params = dict(_NO_ARGUMENTS)
        if not isinstance(params, dict):
            raise ConstraintError("tools", f"{where}: parameters must be a JSON Schema object")
        if "type" in params and params["type"] != "object":
            raise ConstraintError("tools", f"{where}: parameters must describe an object (\"type\": \"object\"), got type {params['type']!r}")
        try:
            _check_meta_schema(params, "tools")
        except ConstraintError as exc:
            raise exc.with_param("tools", f"{where}: parameters: ") from None
        try:
            grammar = json_schema_grammar(params, limits, param="tools")
        except ConstraintError as exc:
            raise exc.with_param("tools", f"{where}: parameters: ") from None
        error = llguidance.LLMatcher.validate_grammar(grammar)
        if error:
            raise json_schema_error(error, params, "tools").with_param("tools", f"{where}: parameters: ") from None
        specs.append(ToolSpec(name, description, params))
    return specs


def resolve_tool_choice(tool_choice: Any, tools: Sequence[ToolSpec]) -> tuple[str, list[ToolSpec]]:
    """(mode, allowed tools) for an OpenAI `tool_choice`: mode is "none", "auto" or
    "required" (a named function is "required" with one allowed tool). No tools means "none"."""
    choice = _as_dict(tool_choice)
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ConstraintError("tool_choice", f"expected 'none', 'auto', 'required' or a named function, got {choice!r}")
        if choice != "none" and not tools:
            raise ConstraintError("tool_choice", f"tool_choice {choice!r} requires tools")
        return choice, list(tools)
    if isinstance(choice, dict) and choice.get("type", "function") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        for tool in tools:
            if tool.name == name:
                return "required", [tool]
        raise ConstraintError("tool_choice", f"tool_choice names function {name!r}, which is not among the tools")
    raise ConstraintError("tool_choice", "expected 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}")


# ---------------------------------------------------------------- the constraint

_REF_KEYS = ("$ref",)


def _relocate_refs(node: Any, prefix: str) -> Any:
    """Copy of `node` with local refs ("#..."/"#/...") re-rooted under `prefix`, so a tool's
    parameter schema keeps working when embedded inside the calls schema."""
    if isinstance(node, list):
        return [_relocate_refs(item, prefix) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _REF_KEYS and isinstance(value, str) and value.startswith("#") and (value == "#" or value.startswith("#/")):
            out[key] = prefix + value[1:]
        elif key in ("enum", "const", "default", "examples"):
            out[key] = value
        else:
            out[key] = _relocate_refs(value, prefix)
    return out


def calls_schema(tools: Sequence[ToolSpec], parallel_tool_calls: bool = True) -> dict[str, Any]:
    """JSON Schema of the list inside a tool-call block: 1..n (or exactly 1) call objects
    `{"name": <tool>, "arguments": <valid per its parameters>}`, keys in that order."""
    defs: dict[str, Any] = {}
    variants = []
    for i, tool in enumerate(tools):
        key = f"radixserve_tool_{i}"
        defs[key] = _relocate_refs(dict(tool.parameters), f"#/$defs/{key}")
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool.name}, "arguments": {"$ref": f"#/$defs/{key}"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    items: dict[str, Any] = variants[0] if len(variants) == 1 else {"anyOf": variants}
    schema: dict[str, Any] = {"$defs": defs, "type": "array", "items": items, "minItems": 1}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


def _lark_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def tool_call_constraint(
    tools: Sequence[Any] | None,
    tool_choice: Any = None,
    parallel_tool_calls: bool = True,
    *,
    response_format: ConstraintSpec | None = None,
    limits: ConstraintLimits | None = None,
) -> ConstraintSpec | None:
    """The ConstraintSpec for a chat request's tools (see the module docstring), or None for
    tool_choice "none" / no tools (then `response_format` applies alone, the caller's business).

    `response_format` is the request's response_format constraint, if any: with "required" or
    a named function it does not apply to this turn (the output is tool calls); with "auto" a
    JSON response format replaces the free-text branch; a non-JSON one is a conflict."""
    limits = limits or ConstraintLimits()
    specs = tools if tools and all(isinstance(t, ToolSpec) for t in tools) else validate_tools(tools, limits=limits)
    mode, allowed = resolve_tool_choice(tool_choice, specs)
    if mode == "none":
        return None
    block_schema = _bounded_schema(calls_schema(allowed, parallel_tool_calls), limits)
    calls_rule = f"calls: %json {json.dumps(block_schema, ensure_ascii=False)}\n"
    block = f'{_lark_str(TOOL_CALL_START)} calls {_lark_str(TOOL_CALL_END)}'
    if mode == "required":
        return ConstraintSpec("grammar", f"start: {block}\n{calls_rule}")
    # auto
    if response_format is None:
        grammar = (
            f"start: TEXT | call_head calls {_lark_str(TOOL_CALL_END)}\n"
            # Lazy: the free text ends at the first "<tool_call>", which commits to a call.
            f"call_head[lazy]: /(?s:.*){re.escape(TOOL_CALL_START)}/\n"
            "TEXT: /(?s:.*)/\n" + calls_rule
        )
        return ConstraintSpec("grammar", grammar)
    if response_format.kind == "json_object":
        answer_schema: Any = {"type": "object"}
    elif response_format.kind == "json_schema":
        assert isinstance(response_format.value, str)
        answer_schema = json.loads(response_format.value)
    else:
        raise ConstraintError("response_format", f"a {response_format.kind} constraint cannot be combined with tool_choice 'auto'")
    answer = _bounded_schema(answer_schema, limits)
    grammar = f"start: answer | {block}\nanswer: %json {json.dumps(answer, ensure_ascii=False)}\n{calls_rule}"
    return ConstraintSpec("grammar", grammar)


def _bounded_schema(schema: Any, limits: ConstraintLimits) -> dict[str, Any]:
    """`schema` with our JSON options (to embed with `%json`), tightened by as many of the JSON
    bounds of `limits` as it compiles with (`compiling_bounds`, as for json_schema)."""
    from radixserve.runtime.constraints.compiler import compiling_bounds, schema_with_options

    return schema_with_options(schema, compiling_bounds(schema, limits, param="tools"))


def tools_system_prompt(tools: Sequence[Any], parallel_tool_calls: bool = True, tool_choice: Any = None) -> str:
    """Instructions (for the system message) that describe the tools and the call format to
    a model whose chat template has no tool support, such as the default model. Worded after
    the kind of prompt SmolLM2 saw in its function-calling fine-tuning (an expert composing
    calls, the tools in <tools> tags, the list format), so the model recognizes the task."""
    specs = tools if tools and all(isinstance(t, ToolSpec) for t in tools) else validate_tools(tools)
    mode, allowed = resolve_tool_choice(tool_choice, specs)
    listing = json.dumps([t.to_json() for t in allowed], ensure_ascii=False)
    how_many = "one or more function calls" if parallel_tool_calls else "exactly one function call"
    lines = [
        "You are an expert at composing function calls. You get a question and a set of functions you can call.",
        f"Based on the question, make {how_many} to achieve the purpose.",
    ]
    if mode == "auto":
        lines.append("If none of the functions fits the question, say so and answer without calling any.")
    lines += [
        "If the question lacks parameters a function requires, say so as well.",
        "You have access to these tools:",
        f"<tools>{listing}</tools>",
        "To call functions, the output MUST follow this format exactly, with no other text:",
        f'{TOOL_CALL_START}[{{"name": "func_name1", "arguments": {{"argument1": "value1", "argument2": "value2"}}}}]{TOOL_CALL_END}',
        "Make sure every argument has the type its schema gives.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- parsing


def new_tool_call_id() -> str:
    """An OpenAI-style tool call id: "call_" and 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


class _Incomplete(Exception):
    """The text ends inside the construct being scanned."""


class _Malformed(Exception):
    """The text cannot be a tool-call block from here on."""


_WS_CHARS = " \t\r\n"  # JSON whitespace; also what is trimmed next to a block
_WS = re.compile(r"[ \t\r\n]*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_SCALAR = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null")
_STRUCT = re.compile(r'["{}\[\]]')


@dataclass
class _CallScan:
    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    args_container: bool = False
    closed: bool = False


@dataclass
class _BlockScan:
    """One `<tool_call>` block: where its JSON starts, the calls found, and how it ended."""

    start: int  # index of "<tool_call>"
    calls: list[_CallScan] = field(default_factory=list)
    end: int | None = None  # index just past "</tool_call>" when complete
    malformed: bool = False


class _BlockScanner:
    """Scans the JSON list of calls after a `<tool_call>` tag. `final` means the text will not
    grow (a trailing number is complete, an open construct is truncated for good)."""

    def __init__(self, text: str, final: bool) -> None:
        self.text = text
        self.final = final

    def ws(self, i: int) -> int:
        return _WS.match(self.text, i).end()  # type: ignore[union-attr]

    def decoded(self, start: int, end: int) -> str:
        """The JSON string literal text[start:end], decoded (bad escapes are malformed)."""
        try:
            return json.loads(self.text[start:end])
        except json.JSONDecodeError:
            raise _Malformed from None

    def need(self, i: int) -> None:
        if i >= len(self.text):
            raise _Incomplete

    def string(self, i: int) -> int:
        match = _STRING.match(self.text, i)
        if match is None:
            raise _Incomplete  # an unterminated string (the opening quote is at i)
        return match.end()

    def value(self, i: int) -> int:
        """End index of the JSON value starting at i (structure only; checked later)."""
        self.need(i)
        ch = self.text[i]
        if ch == '"':
            return self.string(i)
        if ch in "{[":
            depth = 0
            j = i
            while True:
                match = _STRUCT.search(self.text, j)
                if match is None:
                    raise _Incomplete
                c = match.group()
                if c == '"':
                    j = self.string(match.start())
                    continue
                depth += 1 if c in "{[" else -1
                j = match.end()
                if depth == 0:
                    return j
        match = _SCALAR.match(self.text, i)
        if match is None or match.end() == i:
            raise _Malformed
        if match.end() >= len(self.text) and not self.final:
            raise _Incomplete  # a number may go on
        return match.end()

    def call(self, i: int, call: _CallScan) -> int:
        """Scan the call object at i ('{'); fills `call` as it goes; returns the end index."""
        i += 1
        first = True
        while True:
            i = self.ws(i)
            self.need(i)
            if self.text[i] == "}":
                call.closed = True
                return i + 1
            if not first:
                if self.text[i] != ",":
                    raise _Malformed
                i = self.ws(i + 1)
                self.need(i)
            first = False
            if self.text[i] != '"':
                raise _Malformed
            key_end = self.string(i)
            key = self.decoded(i, key_end)
            i = self.ws(key_end)
            self.need(i)
            if self.text[i] != ":":
                raise _Malformed
            i = self.ws(i + 1)
            self.need(i)
            if key == "name" and call.name is None:
                if self.text[i] != '"':
                    raise _Malformed
                end = self.string(i)
                call.name = self.decoded(i, end)
                i = end
            elif key in ("arguments", "parameters") and call.args_start is None:
                call.args_start = i
                call.args_container = self.text[i] in "{["
                end = self.value(i)
                try:
                    json.loads(self.text[i:end])
                except json.JSONDecodeError:
                    raise _Malformed from None
                call.args_end = end
                i = end
            else:
                i = self.value(i)

    def block(self, block: _BlockScan) -> None:
        """Scan the block whose tag starts at block.start; fills `block` (partially when the
        text ends inside it, in which case _Incomplete propagates)."""
        i = self.ws(block.start + len(TOOL_CALL_START))
        self.need(i)
        if self.text[i] == "{":
            single = True
        elif self.text[i] == "[":
            single = False
            i += 1
        else:
            raise _Malformed
        while True:
            i = self.ws(i)
            self.need(i)
            if not single and self.text[i] == "]" and not block.calls:
                i += 1
                break
            if self.text[i] != "{":
                raise _Malformed
            call = _CallScan()
            block.calls.append(call)
            i = self.call(i, call)
            if single:
                break
            i = self.ws(i)
            self.need(i)
            if self.text[i] == ",":
                i += 1
                continue
            if self.text[i] == "]":
                i += 1
                break
            raise _Malformed
        i = self.ws(i)
        tail = self.text[i : i + len(TOOL_CALL_END)]
        if tail != TOOL_CALL_END[: len(tail)]:
            raise _Malformed
        if len(tail) < len(TOOL_CALL_END):
            raise _Incomplete
        block.end = i + len(TOOL_CALL_END)


@dataclass
class _Item:
    """A piece of the output in document order: content text, or one tool call."""

    content: str | None = None
    name: str | None = None
    arguments: str = ""


def _partial_tag_suffix(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of "<tool_call>"."""
    for n in range(min(len(text), len(TOOL_CALL_START) - 1), 0, -1):
        if TOOL_CALL_START.startswith(text[-n:]):
            return n
    return 0


def _scan(text: str, final: bool, allowed: frozenset[str] | None) -> list[_Item]:
    """The output's items. With final=False, only what can no longer change is returned:
    content that could still turn into a tag or precede one (a partial tag, trailing
    whitespace) is held back, and a call's arguments grow as its text arrives.

    Content rules: text outside blocks is content, with whitespace next to a block dropped.
    A block that goes wrong before any call has a name is content after all (its tag is
    taken literally); after that, the calls found stand and the rest of the text is dropped."""
    items: list[_Item] = []
    pos = 0
    after_block = False
    scanner = _BlockScanner(text, final)
    while True:
        tag = text.find(TOOL_CALL_START, pos)
        segment = text[pos:] if tag < 0 else text[pos:tag]
        if after_block:
            segment = segment.lstrip(_WS_CHARS)
        if tag < 0:
            if not final:
                keep = len(segment) - _partial_tag_suffix(segment)
                segment = segment[:keep].rstrip(_WS_CHARS)
            if segment:
                items.append(_Item(content=segment))
            return items
        segment = segment.rstrip(_WS_CHARS)
        block = _BlockScan(tag)
        status = "complete"
        try:
            scanner.block(block)
        except _Incomplete:
            status = "incomplete"
        except _Malformed:
            status = "malformed"
        named = [c for c in block.calls if c.name is not None]
        if status == "malformed" and not named:
            # Not a tool call after all: the tag is text; rescan after it.
            literal = text[pos:tag + len(TOOL_CALL_START)]
            if after_block:
                literal = literal.lstrip(_WS_CHARS)
            if literal:
                items.append(_Item(content=literal))
            pos = tag + len(TOOL_CALL_START)
            after_block = False
            continue
        if status == "incomplete" and not final and not named:
            # Undecided: hold back the block (and the whitespace before it).
            if segment:
                items.append(_Item(content=segment))
            return items
        if segment:
            items.append(_Item(content=segment))
        for call in block.calls:
            if call.name is None or (allowed is not None and call.name not in allowed):
                continue
            if call.args_start is None:
                arguments = "{}" if call.closed else ""
            elif call.args_end is not None:
                arguments = text[call.args_start : call.args_end]
            elif call.args_container or final:
                arguments = text[call.args_start :]
            else:
                arguments = ""
            items.append(_Item(name=call.name, arguments=arguments))
        if status != "complete" or block.end is None:
            return items  # truncated or broken after a call began: the rest is dropped
        pos = block.end
        after_block = True


@dataclass(frozen=True)
class ParsedOutput:
    """A finished output split into OpenAI message fields: `content` (None when empty) and
    `tool_calls` ([{"id", "type": "function", "function": {"name", "arguments"}}], with
    `arguments` the call's raw JSON text)."""

    content: str | None
    tool_calls: list[dict[str, Any]]


def parse_tool_calls(
    text: str,
    *,
    tool_names: Iterable[str] | None = None,
    id_factory: Callable[[], str] = new_tool_call_id,
) -> ParsedOutput:
    """Split a finished output into content and tool calls (format in the module docstring).
    Calls to names outside `tool_names` (when given) are dropped. Feeding the same text to
    `ToolCallStreamParser` in any chunks gives the same content and calls."""
    allowed = frozenset(tool_names) if tool_names is not None else None
    content = ""
    calls: list[dict[str, Any]] = []
    for item in _scan(text, True, allowed):
        if item.content is not None:
            content += item.content
        else:
            calls.append({"id": id_factory(), "type": "function", "function": {"name": item.name, "arguments": item.arguments}})
    return ParsedOutput(content or None, calls)


class ToolCallStreamParser:
    """Turns streamed text deltas into content deltas and OpenAI tool-call deltas.

    `feed(delta)` and `finish()` return `(content, tool_call_deltas)`: the new content text
    ("" if none) and a list of dicts in the shape of OpenAI's `ChoiceDeltaToolCall`. A call's
    first delta carries `index`, `id`, `type` and `function.name` (and any arguments known
    yet); later ones `index` and `function.arguments` fragments. Concatenating everything
    gives exactly `parse_tool_calls(full_text)` (same ids when `id_factory` agrees).

    Each feed rescans the buffered text (cheap: content is searched with str.find, and tool
    blocks are short), so the result never depends on how the text was chunked."""

    def __init__(self, *, tool_names: Iterable[str] | None = None, id_factory: Callable[[], str] = new_tool_call_id) -> None:
        self._allowed = frozenset(tool_names) if tool_names is not None else None
        self._id_factory = id_factory
        self._text = ""
        self._emitted: list[int] = []  # per item: content chars / argument chars emitted
        self._call_index: dict[int, int] = {}  # item position -> tool call index
        self._finished = False

    @property
    def tool_calls_started(self) -> int:
        """Number of tool calls announced so far (finish_reason "tool_calls" when > 0)."""
        return len(self._call_index)

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        if self._finished:
            raise RuntimeError("ToolCallStreamParser.feed after finish()")
        self._text += delta
        return self._diff(final=False)

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """Flush what was held back (the text is complete)."""
        if self._finished:
            return "", []
        self._finished = True
        return self._diff(final=True)

    def _diff(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        items = _scan(self._text, final, self._allowed)
        content = ""
        deltas: list[dict[str, Any]] = []
        for pos, item in enumerate(items):
            if pos == len(self._emitted):
                self._emitted.append(0)
            done = self._emitted[pos]
            if item.content is not None:
                content += item.content[done:]
                self._emitted[pos] = len(item.content)
                continue
            fragment = item.arguments[done:]
            self._emitted[pos] = len(item.arguments)
            if pos not in self._call_index:
                index = len(self._call_index)
                self._call_index[pos] = index
                deltas.append(
                    {"index": index, "id": self._id_factory(), "type": "function", "function": {"name": item.name, "arguments": fragment}}
                )
            elif fragment:
                deltas.append({"index": self._call_index[pos], "function": {"arguments": fragment}})
        return content, deltas


def merge_stream(chunks: Iterable[tuple[str, list[dict[str, Any]]]]) -> ParsedOutput:
    """Fold streamed `(content, deltas)` pairs into the non-streamed result (what a client
    does; used by tests)."""
    content = ""
    calls: dict[int, dict[str, Any]] = {}
    for text, deltas in chunks:
        content += text
        for d in deltas:
            call = calls.setdefault(d["index"], {"id": None, "type": "function", "function": {"name": None, "arguments": ""}})
            if d.get("id"):
                call["id"] = d["id"]
            fn = d.get("function", {})
            if fn.get("name"):
                call["function"]["name"] = fn["name"]
            call["function"]["arguments"] += fn.get("arguments", "")
    return ParsedOutput(content or None, [calls[k] for k in sorted(calls)])
