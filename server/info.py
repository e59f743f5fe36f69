"""Small endpoints about the model and the server: `/v1/models`, `/model_info`, `/health`,
`/tokenize`, `/detokenize`. None of them touches the engine thread: they read values fixed
at start-up, the tokenizer, or `engine.healthy()` (a cheap, lock-free check)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from radixserve.runtime.constraints.errors import ConstraintError
from radixserve.server import tool_calls
from radixserve.server.chat import render_chat_prompt
from radixserve.server.errors import APIError, bad_request
from radixserve.server.parsing import read_json
from radixserve.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelInfo,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from radixserve.server.sampling import check_token_ids
from radixserve.server.state import server_state


async def list_models(request: Request) -> Response:
    state = server_state(request)
    card = ModelCard(id=state.served_name, created=state.started_at, max_model_len=state.engine.max_model_len)
    return JSONResponse(ModelList(data=[card]).model_dump(mode="json"))


async def model_info(request: Request) -> Response:
    state = server_state(request)
    engine = state.engine
    tokenizer = engine.tokenizer
    bos_id = getattr(tokenizer, "bos_token_id", None)
    info = ModelInfo(
        model=state.served_name,
        engine_model_name=engine.model_name,
        aliases=sorted(state.accepted_names - {state.served_name}),
        max_model_len=engine.max_model_len,
        chat_template=engine.chat_template,
        bos_token=state.bos_token,
        eos_token=state.eos_token,
        bos_token_id=int(bos_id) if bos_id is not None else None,
        eos_token_ids=[int(t) for t in engine.eos_token_ids],
        vocab_size=state.vocab_size(),
        page_size=getattr(getattr(engine, "config", None), "page_size", None),
    )
    return JSONResponse(info.model_dump(mode="json"))


async def health(request: Request) -> Response:
    state = server_state(request)
    if state.shutting_down:
        return APIError(503, "The server is shutting down.", code="shutting_down").response()
    if not state.engine.healthy():
        return APIError(503, "The engine is not healthy.", code="engine_unhealthy").response()
    return JSONResponse({"status": "ok"})


async def tokenize(request: Request) -> Response:
    state = server_state(request)
    req = await read_json(request, TokenizeRequest)
    state.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("Send exactly one of prompt and messages.", param="prompt")
    if req.messages is not None:
        tools_prompt = None
        if req.tools:
            try:
                tools_prompt = tool_calls.tools_system_prompt(req.tools)
            except ConstraintError as exc:
                raise APIError(400, exc.message, param=exc.param, code="invalid_constraint") from None
        text = render_chat_prompt(state, req.messages, tools_prompt, req.add_generation_prompt, None)
    else:
        text = req.prompt or ""
    ids = await state.tokenize(text)
    body = TokenizeResponse(tokens=ids, count=len(ids), max_model_len=state.engine.max_model_len)
    return JSONResponse(body.model_dump(mode="json"))


async def detokenize(request: Request) -> Response:
    state = server_state(request)
    req = await read_json(request, DetokenizeRequest)
    state.check_model(req.model)
    check_token_ids(req.tokens, state.vocab_size(), "tokens")
    return JSONResponse(DetokenizeResponse(prompt=state.engine.detokenize(req.tokens)).model_dump(mode="json"))
