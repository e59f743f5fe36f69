"""Request fields -> `SamplingParams` and `ConstraintSpec`: the one place that maps them.

Chat, completions and `/generate` all go through `build_sampling_params`, so a field means
the same thing on every endpoint and every range error names the client's field. The
context-length check also lives here: it runs before submission so the error gives the
client's numbers (prompt tokens, requested completion tokens, the limit).
"""

from __future__ import annotations

import asyncio
from typing import Any

from radixserve.runtime.constraints.config import ConstraintLimits
from radixserve.runtime.constraints.errors import ConstraintError
from radixserve.runtime.constraints.spec import ConstraintSpec
from radixserve.runtime.sampling_params import InvalidParams, SamplingParams
from radixserve.server.errors import APIError, bad_request, context_length_error
from radixserve.server.settings import ServerSettings
from radixserve.server.structured_outputs import constraint_from_request
from radixserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ConstraintFields,
    NativeSamplingParams,
    SamplingExtensions,
)

# SamplingParams field -> the request field a client would recognise in an error message.
_CHAT_PARAM_NAMES = {"logprobs": "top_logprobs", "max_tokens": "max_completion_tokens"}


def build_sampling_params(fields: dict[str, Any], param_names: dict[str, str] | None = None) -> SamplingParams:
    """`SamplingParams(**fields)`, with its validation errors as 400s naming the field."""
    try:
        return SamplingParams(**fields)
    except InvalidParams as exc:
        param = (param_names or {}).get(exc.param, exc.param)
        raise bad_request(str(exc).replace(exc.param, param, 1), param=param) from None


def constraint_from_fields(
    fields: ConstraintFields, *, json_object: bool = False, limits: ConstraintLimits | None = None
) -> ConstraintSpec | None:
    """The extension constraint fields (`regex`, `choice`, `grammar`, `json_schema`, and on
    /generate `json_object`) as one ConstraintSpec, compiled once without a tokenizer so a
    bad one is a 400 naming the field; at most one may be set."""
    try:
        return constraint_from_request(
            regex=fields.regex, choice=fields.choice, grammar=fields.grammar, json_schema=fields.json_schema,
            json_object=json_object, limits=limits,
        )
    except ConstraintError as exc:
        raise APIError(400, exc.message, param=exc.param, code="invalid_constraint") from None


def constraint_limits(settings: ServerSettings) -> ConstraintLimits:
    """The constraint limits the server checks requests against (from its settings)."""
    return ConstraintLimits(max_spec_bytes=settings.max_constraint_bytes)


def compile_timeout(param: str, timeout_s: float) -> APIError:
    return APIError(
        400,
        f"The output constraint did not compile within {timeout_s:g} s; simplify it "
        "(fewer alternatives, smaller repetition counts, a smaller schema).",
        param=param,
        code="constraint_too_complex",
    )


async def compile_in_thread(fn: Any, *args: Any, settings: ServerSettings, param: str, **kwargs: Any) -> Any:
    """Run a constraint-compiling `fn` in a worker thread, waiting at most the server's
    `constraint_timeout_s`. A thread cannot be stopped: on timeout the client gets its 400 at
    once and the compile runs on to llguidance's own fuel limit in the background."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(fn, *args, **kwargs), settings.constraint_timeout_s)
    except asyncio.TimeoutError:
        raise compile_timeout(param, settings.constraint_timeout_s) from None


async def resolve_constraint(
    fields: ConstraintFields, settings: ServerSettings, *, json_object: bool = False
) -> ConstraintSpec | None:
    """`constraint_from_fields`, in a worker thread (bounded by the compile timeout) when
    there is something to compile."""
    param = constraint_field(fields, json_object=json_object)
    if param is not None:
        return await compile_in_thread(
            constraint_from_fields, fields, json_object=json_object, limits=constraint_limits(settings),
            settings=settings, param=param,
        )
    return None


def constraint_field(fields: ConstraintFields, *, json_object: bool = False) -> str | None:
    """The extension constraint field a request sets (the first of them), or None: the
    `param` that a failure of its constraint is reported on."""
    for name in ("regex", "choice", "grammar", "json_schema"):
        if getattr(fields, name, None) is not None:
            return name
    return "json_object" if json_object else None


def budget_cap(settings: ServerSettings) -> int | None:
    """The completion budget of a request that asks for none: the server's default, within
    its max_tokens limit (None: the rest of the context window)."""
    caps = [c for c in (settings.default_max_tokens, settings.max_tokens_limit) if c is not None]
    return min(caps) if caps else None


def check_n(n: int, settings: ServerSettings, param: str = "n") -> None:
    if n > settings.max_n:
        raise bad_request(f"{param} is {n}, over this server's limit of {settings.max_n}.", param=param, code="invalid_value")


def check_prompt_tokens(prompt_tokens: int, settings: ServerSettings, param: str) -> None:
    limit = settings.max_prompt_tokens
    if limit is not None and prompt_tokens > limit:
        raise bad_request(
            f"The prompt is {prompt_tokens} tokens, over this server's limit of {limit} prompt tokens.",
            param=param,
            code="prompt_too_long",
        )


def check_max_tokens(requested: int | None, settings: ServerSettings, param: str) -> None:
    limit = settings.max_tokens_limit
    if requested is not None and limit is not None and requested > limit:
        raise bad_request(
            f"{param} is {requested}, over this server's limit of {limit} completion tokens.",
            param=param,
            code="invalid_value",
        )


def _common(req: SamplingExtensions) -> dict[str, Any]:
    if req.logit_bias:
        raise bad_request("logit_bias is not supported.", param="logit_bias")
    return {
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        "ignore_eos": req.ignore_eos,
        "stop_token_ids": tuple(req.stop_token_ids or ()),
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "skip_special_tokens": req.skip_special_tokens,
    }


def _stop(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def resolve_max_tokens(requested: int | None, prompt_tokens: int, limit: int, default: int | None, param: str) -> int:
    """The completion budget: the requested one, else the rest of the context window (capped
    by `default`). Raises the context-length error with the numbers."""
    if requested is None:
        room = limit - prompt_tokens
        if room < 1:
            raise context_length_error(prompt_tokens, 1, limit, param)
        return room if default is None else min(room, default)
    if prompt_tokens + requested > limit:
        raise context_length_error(prompt_tokens, requested, limit, param)
    return requested


def chat_sampling_params(req: ChatCompletionRequest, max_tokens: int, constraint: ConstraintSpec | None) -> SamplingParams:
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true.", param="top_logprobs")
    fields = _common(req) | {
        "max_tokens": max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "frequency_penalty": req.frequency_penalty,
        "presence_penalty": req.presence_penalty,
        "seed": req.seed,
        "n": req.n,
        "stop": _stop(req.stop),
        "logprobs": (req.top_logprobs or 0) if req.logprobs else None,
        "constraint": constraint,
    }
    return build_sampling_params(fields, _CHAT_PARAM_NAMES)


def completion_sampling_params(req: CompletionRequest, constraint: ConstraintSpec | None) -> SamplingParams:
    if req.suffix:
        raise bad_request("suffix is not supported.", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is not supported (only best_of == n).", param="best_of")
    fields = _common(req) | {
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "frequency_penalty": req.frequency_penalty,
        "presence_penalty": req.presence_penalty,
        "seed": req.seed,
        "n": req.n,
        "stop": _stop(req.stop),
        "logprobs": req.logprobs,
        # echo with logprobs scores the prompt too (OpenAI's legacy behaviour).
        "prompt_logprobs": req.logprobs if req.echo and req.logprobs is not None else None,
        "constraint": constraint,
    }
    return build_sampling_params(fields)


def native_sampling_params(sp: NativeSamplingParams, constraint: ConstraintSpec | None) -> SamplingParams:
    fields = sp.model_dump(exclude={"regex", "choice", "grammar", "json_schema", "json_object"})
    fields["stop"] = _stop(sp.stop)
    fields["stop_token_ids"] = tuple(sp.stop_token_ids or ())
    fields["constraint"] = constraint
    return build_sampling_params(fields)


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in ids if t >= vocab_size), None)
    if bad is not None:
        raise APIError(400, f"Token id {bad} is out of range: the vocabulary has {vocab_size} tokens.", param=param)
