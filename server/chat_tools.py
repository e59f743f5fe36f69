"""How a chat request's `response_format`, constraint fields, `tools` and `tool_choice` shape
its generation: the seam between the chat route and the structured-output modules.

`server/structured_outputs.py` maps `response_format` and the extension fields (`regex`,
`choice`, `grammar`, `json_schema`) to one ConstraintSpec, refusing two at once.
`server/tool_calls.py` validates tools, builds the tool-call constraint (which, for
tool_choice "auto", folds a JSON response_format into its free-text branch), describes the
tools and the call format in a system prompt, and parses calls back out of the text, whole
or streamed. The chat route sees only `ChatPlan`.

Building a plan compiles the constraint once without a tokenizer (a bad schema is a 400
before the engine sees it); that may take a while for a large schema, so the route builds
plans with constraints in a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from radixserve.runtime.constraints.config import ConstraintLimits
from radixserve.runtime.constraints.errors import ConstraintError
from radixserve.runtime.constraints.spec import ConstraintSpec
from radixserve.server import tool_calls
from radixserve.server.errors import APIError, bad_request
from radixserve.server.protocol import ChatCompletionRequest, ToolCall, ToolCallDelta
from radixserve.server.structured_outputs import constraint_from_request, response_format_constraint

@dataclass
class ChatPlan:
    """What the chat route submits and how it reads the output back.

    `tools_prompt` describes the tools and the call format (the one the constraint enforces
    and the parser reads) and is added to the system message; templates' own tool rendering
    is not used, as its format would differ from the enforced one. `tool_names` is None when
    the output is not parsed for tool calls."""

    constraint: ConstraintSpec | None = None
    tools_prompt: str | None = None
    tool_names: frozenset[str] | None = None

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished output."""
        if self.tool_names is None:
            return text, []
        parsed = tool_calls.parse_tool_calls(text, tool_names=self.tool_names)
        return parsed.content, [ToolCall.model_validate(call) for call in parsed.tool_calls]

    def stream_parser(self) -> StreamParser | None:
        return None if self.tool_names is None else StreamParser(self.tool_names)


class StreamParser:
    """Streamed text -> (content delta, tool-call deltas) for one choice."""

    def __init__(self, tool_names: frozenset[str]) -> None:
        self._parser = tool_calls.ToolCallStreamParser(tool_names=tool_names)

    @property
    def saw_tool_call(self) -> bool:
        return self._parser.tool_calls_started > 0

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = self._parser.feed(text)
        return content, [ToolCallDelta.model_validate(d) for d in deltas]

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = self._parser.finish()
        return content, [ToolCallDelta.model_validate(d) for d in deltas]


def needs_compilation(req: ChatCompletionRequest) -> bool:
    """Whether building the plan compiles a constraint (worth a worker thread)."""
    fields = (req.regex, req.choice, req.grammar, req.json_schema)
    rf = req.response_format is not None and req.response_format.type != "text"
    return rf or any(f is not None for f in fields) or bool(req.tools and req.tool_choice != "none")


def plan_chat(req: ChatCompletionRequest, limits: ConstraintLimits | None = None) -> ChatPlan:
    """The plan for `req`, its constraint checked against `limits` (the server's);
    ConstraintErrors become 400s naming the field."""
    try:
        return _plan(req, limits)
    except ConstraintError as exc:
        raise APIError(400, exc.message, param=exc.param, code="invalid_constraint") from None


def _plan(req: ChatCompletionRequest, limits: ConstraintLimits | None) -> ChatPlan:
    extension = {"regex": req.regex, "choice": req.choice, "grammar": req.grammar, "json_schema": req.json_schema}
    specs = tool_calls.validate_tools(req.tools, limits=limits) if req.tools else []
    mode, allowed = tool_calls.resolve_tool_choice(req.tool_choice, specs)
    if mode == "none":
        return ChatPlan(constraint=constraint_from_request(response_format=req.response_format, limits=limits, **extension))
    given = [name for name, value in extension.items() if value is not None]
    if given:
        raise bad_request(f"{given[0]} cannot be combined with tools; use response_format or tool_choice 'none'.", param=given[0])
    response_format = response_format_constraint(req.response_format)
    constraint = tool_calls.tool_call_constraint(
        specs, req.tool_choice, req.parallel_tool_calls, response_format=response_format, limits=limits
    )
    return ChatPlan(
        constraint=constraint,
        tools_prompt=tool_calls.tools_system_prompt(specs, req.parallel_tool_calls, req.tool_choice),
        tool_names=frozenset(tool.name for tool in allowed),
    )
