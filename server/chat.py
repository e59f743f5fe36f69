"""`POST /v1/chat/completions`: messages through the chat template, then the engine.

Request flow: validate -> plan constraints/tools -> render the template -> tokenize -> check
the context length -> submit -> stream SSE chunks or collect one response. The engine
request is aborted in every path that does not read it to the end (client disconnect,
an error while streaming).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from radixserve.runtime.chat_template import ChatTemplateError
from radixserve.runtime.outputs import StreamDelta, TokenLogprob
from radixserve.server.chat_tools import ChatPlan, StreamParser, needs_compilation, plan_chat
from radixserve.server.engine_client import GenerationRun
from radixserve.server.errors import bad_request
from radixserve.server.parsing import read_json
from radixserve.server.protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessage,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTokenLogprobWithTop,
)
from radixserve.server.sampling import (
    budget_cap,
    chat_sampling_params,
    check_max_tokens,
    check_n,
    check_prompt_tokens,
    compile_in_thread,
    constraint_field,
    resolve_max_tokens,
)
from radixserve.server.sse import EventStreamResponse, cancel_on_disconnect, sse_data, sse_stream
from radixserve.server.state import ServerState, new_request_id, server_state
from radixserve.server.usage import UsageCounter, generation_failed

logger = logging.getLogger(__name__)

# Variables the template receives from us; chat_template_kwargs may not override them.
_RESERVED_TEMPLATE_VARS = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"})


async def chat_completions(request: Request) -> Response:
    arrival = time.monotonic()
    state = server_state(request)
    req = await read_json(request, ChatCompletionRequest)
    state.check_model(req.model)
    settings = state.settings
    check_n(req.n, settings)
    requested = req.max_completion_tokens or req.max_tokens
    check_max_tokens(requested, settings, "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
    limits = state.constraint_limits
    if needs_compilation(req):
        plan = await compile_in_thread(plan_chat, req, limits, settings=settings, param=_constraint_param(req))
    else:
        plan = plan_chat(req, limits)
    prompt = render_chat_prompt(state, req.messages, plan.tools_prompt, req.add_generation_prompt, req.chat_template_kwargs)
    ids = await state.tokenize(prompt)
    check_prompt_tokens(len(ids), settings, "messages")
    max_tokens = resolve_max_tokens(requested, len(ids), state.engine.max_model_len, budget_cap(settings), "messages")
    params = chat_sampling_params(req, max_tokens, plan.constraint)
    request_id = new_request_id(request)
    writer = ChatWriter(state, req, plan, f"chatcmpl-{request_id}", len(ids))
    run = GenerationRun(state.engine, state.metrics, arrival, compile_timeout_s=settings.constraint_timeout_s)
    await run.start([ids], params, request_id=request_id, cache_salt=req.cache_salt, prompt_param="messages")
    if req.stream:
        return EventStreamResponse(writer.stream(run), on_close=run.close)
    try:
        completed, body = await cancel_on_disconnect(request, writer.collect(run))
    finally:
        run.close()
    return JSONResponse(body) if completed else Response(status_code=499)


def _constraint_param(req: ChatCompletionRequest) -> str:
    """The field a compile timeout is blamed on: the first constraint the request sets."""
    field = constraint_field(req)
    if field is not None:
        return field
    if req.tools and req.tool_choice != "none":
        return "tools"
    return "response_format"


def template_messages(messages: list[ChatMessage], system_extra: str | None = None) -> list[dict[str, Any]]:
    """OpenAI messages as the plain dicts chat templates expect (Hugging Face conventions:
    string content, tool-call arguments as a dict, "developer" read as "system").
    `system_extra` (the tools description) is appended to the system message, or becomes one."""
    out: list[dict[str, Any]] = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        item: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role, "content": content or ""}
        if message.name is not None:
            item["name"] = message.name
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            item["tool_calls"] = [
                {
                    "id": call.id,
                    "type": call.type,
                    "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)},
                }
                for call in message.tool_calls
            ]
        out.append(item)
    if system_extra:
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{system_extra}" if out[0]["content"] else system_extra
        else:
            out.insert(0, {"role": "system", "content": system_extra})
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def render_chat_prompt(
    state: ServerState,
    messages: list[ChatMessage],
    tools_prompt: str | None,
    add_generation_prompt: bool,
    template_kwargs: dict[str, Any] | None,
) -> str:
    template = state.require_chat_template()
    extra = dict(template_kwargs or {})
    clash = sorted(_RESERVED_TEMPLATE_VARS & extra.keys())
    if clash:
        raise bad_request(f"chat_template_kwargs may not set {', '.join(clash)}.", param="chat_template_kwargs")
    try:
        return template.render(
            template_messages(messages, tools_prompt),
            add_generation_prompt=add_generation_prompt,
            bos_token=state.bos_token,
            eos_token=state.eos_token,
            **extra,
        )
    except ChatTemplateError as exc:
        raise bad_request(exc.message, param="messages", code="chat_template_error") from None


class ChatWriter:
    """Turns one chat request's deltas into OpenAI chat responses (whole or chunked)."""

    def __init__(self, state: ServerState, req: ChatCompletionRequest, plan: ChatPlan, response_id: str, prompt_tokens: int) -> None:
        self.state = state
        self.req = req
        self.plan = plan
        self.id = response_id
        self.created = int(time.time())
        self.usage = UsageCounter(prompt_tokens)

    def _logprobs(self, logprobs: list[TokenLogprob] | None) -> ChatChoiceLogprobs | None:
        if not self.req.logprobs or logprobs is None:
            return None
        text = self.state.token_text
        return ChatChoiceLogprobs(
            content=[
                ChatTokenLogprobWithTop(
                    token=text(lp.token_id),
                    logprob=lp.logprob,
                    bytes=list(text(lp.token_id).encode("utf-8")),
                    top_logprobs=[ChatTokenLogprob(token=text(t), logprob=v, bytes=list(text(t).encode("utf-8"))) for t, v in lp.top],
                )
                for lp in logprobs
            ]
        )

    # ------------------------------------------------------------------ whole response
    async def collect(self, run: GenerationRun) -> dict[str, Any]:
        n = self.req.n
        texts: list[list[str]] = [[] for _ in range(n)]
        logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        try:
            async for _, delta in run.events():
                self.usage.add(delta)
                if delta.finish_reason == "error":
                    raise generation_failed(delta, _constraint_param(self.req))
                texts[delta.index].append(delta.text)
                if delta.logprobs:
                    logprobs[delta.index].extend(delta.logprobs)
                if delta.finish_reason is not None:
                    finish[delta.index] = delta.finish_reason
        finally:
            run.close()
        choices = []
        for i in range(n):
            content, tool_calls = self.plan.parse("".join(texts[i]))
            reason = "tool_calls" if tool_calls and finish[i] == "stop" else finish[i]
            choices.append(
                ChatChoice(
                    index=i,
                    message=ChatResponseMessage(content=content, tool_calls=tool_calls or None),
                    logprobs=self._logprobs(logprobs[i]),
                    finish_reason=reason,
                )
            )
        body = ChatCompletion(
            id=self.id, created=self.created, model=self.state.served_name, choices=choices, usage=self.usage.usage()
        )
        return body.model_dump(mode="json")

    # ------------------------------------------------------------------ streamed response
    def _chunk(self, choices: list[ChatChunkChoice], usage: Any = None) -> bytes:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.state.served_name, choices=choices, usage=usage)
        return sse_data(chunk)

    def stream(self, run: GenerationRun) -> AsyncIterator[bytes]:
        return sse_stream(self._events(run), f"chat stream {self.id}", run.close)

    async def _events(self, run: GenerationRun) -> AsyncIterator[bytes]:
        n = self.req.n
        parsers = [self.plan.stream_parser() for _ in range(n)]
        yield self._chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(n)])
        async for _, delta in run.events():
            self.usage.add(delta)
            if delta.finish_reason == "error":
                raise generation_failed(delta, _constraint_param(self.req))
            for chunk_choice in self._stream_choices(delta, parsers[delta.index]):
                yield self._chunk([chunk_choice])
        options = self.req.stream_options
        if options is not None and options.include_usage:
            yield self._chunk([], usage=self.usage.usage())

    def _stream_choices(self, delta: StreamDelta, parser: StreamParser | None) -> list[ChatChunkChoice]:
        i = delta.index
        content, tool_deltas = (delta.text, []) if parser is None else parser.feed(delta.text)
        if delta.finish_reason is not None and parser is not None:
            tail_content, tail_tools = parser.finish()
            content, tool_deltas = content + tail_content, tool_deltas + tail_tools
        finish = delta.finish_reason
        if finish == "stop" and parser is not None and parser.saw_tool_call:
            finish = "tool_calls"
        if not content and not tool_deltas and finish is None and not delta.logprobs:
            return []
        return [
            ChatChunkChoice(
                index=i,
                delta=ChatDelta(content=content or None, tool_calls=tool_deltas or None),
                logprobs=self._logprobs(delta.logprobs),
                finish_reason=finish,
            )
        ]
