"""Request and response bodies (pydantic v2): the OpenAI schema we implement, our extension
fields, and the native `/generate` and utility endpoints.

These models are the single source of truth for validation and for `/openapi.json`, so
numeric bounds here match `SamplingParams`' own checks: a body the schema accepts is not
rejected later for a range reason (only for semantic ones, e.g. the context length).
Validation is strict (no type coercion). Unknown fields are ignored on the OpenAI endpoints,
as OpenAI-compatible clients send fields we do not model; the native `/generate` body is our
own schema and refuses them.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict

from radixserve.runtime.sampling_params import SamplingParams
from radixserve.server.settings import MAX_N

_SP = SamplingParams()  # defaults of the native endpoint's sampling params, kept in sync
MAX_TOP_LOGPROBS = SamplingParams.MAX_TOP_LOGPROBS
# The sampler holds top_k in an int64 tensor; anything at or past the vocabulary is "off"
# anyway, so a 32-bit bound loses nothing and keeps absurd values out of the engine.
MAX_TOP_K = 2**31 - 1



def _integral(value: Any) -> Any:
    """JSON Schema's "integer" includes 2.0; strict validation would refuse it."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _int(**bounds: int) -> Any:
    """An integer type with bounds (the validator goes last: constraints placed after it
    would be left out of the JSON Schema)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


TopK = _int(ge=-MAX_TOP_K, le=MAX_TOP_K)
NonNegativeInt = _int(ge=0)
PositiveInt = _int(ge=1)
TokenId = Annotated[int, Strict(), Field(ge=0), BeforeValidator(_integral)]
StopStrings = Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=64)]
Seed = _int(ge=-(2**63), lt=2**64)
Temperature = Annotated[float, Field(ge=0.0, le=100.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
MinP = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
# Dividing logits by a penalty near 0 overflows to inf and the softmax to NaN; 0.01 already
# multiplies a logit by 100, far past any useful setting.
RepetitionPenalty = Annotated[float, Field(ge=0.01, le=10.0)]
TopLogprobs = _int(ge=0, le=MAX_TOP_LOGPROBS)
N = _int(ge=1, le=MAX_N)


class _Body(BaseModel):
    # strict: JSON types are not coerced ("1" is not an int, false is not 0, 1 is not true),
    # so what the OpenAPI schema rejects, validation rejects too.
    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)


# ---------------------------------------------------------------- shared pieces


def _exactly_one(a: str, a_schema: dict[str, Any], b: str, b_schema: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema for "exactly one of fields a and b is given (and not null)"."""
    return {"oneOf": [{"required": [a], "properties": {a: a_schema}}, {"required": [b], "properties": {b: b_schema}}]}



class StreamOptions(_Body):
    include_usage: bool = False


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    """Token counts; `prompt_tokens_details.cached_tokens` are prompt tokens served from the
    prefix cache (not recomputed)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ConstraintFields(_Body):
    """Extension fields that constrain the output (at most one of them, and not together
    with `response_format` or forced tool calls)."""

    regex: str | None = Field(None, min_length=1, description="Regular expression the output must match.")
    choice: list[str] | None = Field(None, min_length=1, description="The output is exactly one of these strings.")
    grammar: str | None = Field(None, min_length=1, description="Lark grammar the output must follow.")
    json_schema: dict[str, Any] | str | None = Field(None, description="JSON Schema the output must follow.")


class SamplingExtensions(ConstraintFields):
    """Extension fields beyond OpenAI's, shared by chat and completions."""

    top_k: TopK = Field(-1, description="Sample from the k most likely tokens (<= 0: off).")
    min_p: MinP = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    cache_salt: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Namespace for prefix caching: requests share cached prefixes only with the same salt.",
    )
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: a non-empty logit_bias is rejected.")


# ---------------------------------------------------------------- chat


class TextContentPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str = Field(description="The arguments as a JSON object, serialized.")


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class JSONSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class ChatCompletionRequest(SamplingExtensions):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: N = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopStrings | None = None
    max_tokens: PositiveInt | None = Field(None, description="Deprecated in favour of max_completion_tokens.")
    max_completion_tokens: PositiveInt | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    seed: Seed | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprobWithTop(ChatTokenLogprob):
    top_logprobs: list[ChatTokenLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprobWithTop] | None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict[str, str] | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# ---------------------------------------------------------------- completions

Prompt = (
    Annotated[str, Field(min_length=1)]
    | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    | Annotated[list[TokenId], Field(min_length=1)]
    | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
)


class CompletionRequest(SamplingExtensions):
    model: str | None = None
    prompt: Prompt
    suffix: str | None = Field(None, description="Not supported: a non-empty suffix is rejected.")
    max_tokens: NonNegativeInt = 16
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: N = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: TopLogprobs | None = None
    echo: bool = False
    stop: StopStrings | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    best_of: N | None = Field(None, description="Only best_of == n is supported.")
    seed: Seed | None = None
    user: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    system_fingerprint: str | None = None


# ---------------------------------------------------------------- native /generate


class NativeSamplingParams(ConstraintFields):
    """Every `SamplingParams` field (same names, same defaults) plus the constraint fields
    (`regex`, `choice`, `grammar`, `json_schema`, `json_object`). Unknown fields are refused:
    this is our own schema, so a misspelt parameter (`max_token`) is a 400, not a silent
    default."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: NonNegativeInt = _SP.max_tokens
    temperature: Temperature = _SP.temperature
    top_p: TopP = _SP.top_p
    top_k: TopK = _SP.top_k
    min_p: MinP = _SP.min_p
    repetition_penalty: RepetitionPenalty = _SP.repetition_penalty
    frequency_penalty: Penalty = _SP.frequency_penalty
    presence_penalty: Penalty = _SP.presence_penalty
    seed: Seed | None = _SP.seed
    n: N = _SP.n
    stop: StopStrings | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = _SP.ignore_eos
    include_stop_str_in_output: bool = _SP.include_stop_str_in_output
    skip_special_tokens: bool = _SP.skip_special_tokens
    logprobs: TopLogprobs | None = _SP.logprobs
    prompt_logprobs: TopLogprobs | None = _SP.prompt_logprobs
    prompt_logprobs_start: NonNegativeInt = _SP.prompt_logprobs_start
    json_object: bool = Field(False, description="The output is any JSON object.")


class GenerateRequest(_Body):
    """Exactly one of `text` and `input_ids`. Unknown fields are refused (our own schema)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra=_exactly_one("text", {"type": "string"}, "input_ids", {"type": "array"})
    )

    text: str | None = Field(None, min_length=1)
    input_ids: list[TokenId] | None = Field(None, min_length=1)
    sampling_params: NativeSamplingParams = Field(default_factory=NativeSamplingParams)
    stream: bool = False
    cache_salt: str | None = Field(None, min_length=1, max_length=256)


class NativeLogprob(BaseModel):
    """One token's log-probability; `top` holds [token_id, logprob] pairs, best first."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] = []


class NativeUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class NativeOutput(BaseModel):
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[NativeLogprob] | None = None


class GenerateResponse(BaseModel):
    """The result; the top-level text/token_ids/finish_reason/logprobs are those of
    `outputs[0]`. `prompt_logprobs[i]` is the prompt token at `prompt_logprobs_start + i`."""

    id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[NativeLogprob] | None = None
    prompt_token_ids: list[int]
    prompt_logprobs: list[NativeLogprob | None] | None = None
    prompt_logprobs_start: int = 0
    outputs: list[NativeOutput]
    usage: NativeUsage


class GenerateStreamEvent(BaseModel):
    """One SSE event of a streamed /generate: new text and tokens of continuation `index`.
    Its last event has `finish_reason` and `usage` set."""

    id: str
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[NativeLogprob] | None = None
    prompt_logprobs: list[NativeLogprob | None] | None = None
    usage: NativeUsage | None = None


# ---------------------------------------------------------------- utility endpoints


class TokenizeRequest(_Body):
    """Exactly one of `prompt` and `messages` (rendered with the chat template)."""

    model_config = ConfigDict(json_schema_extra=_exactly_one("prompt", {"type": "string"}, "messages", {"type": "array"}))

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "radixserve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ModelInfo(BaseModel):
    model: str
    engine_model_name: str
    aliases: list[str]
    max_model_len: int
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    bos_token_id: int | None
    eos_token_ids: list[int]
    vocab_size: int
    page_size: int | None


class HealthStatus(BaseModel):
    status: Literal["ok"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
