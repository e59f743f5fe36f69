"""What every handler reads: the engine, the settings, the metrics, and what is derived once
from the model at start-up (served names, the compiled chat template, special tokens).

One `ServerState` is built by the app's lifespan and stored on `app.state.server`; nothing
here is module-level, so two apps in one process (tests) never share state.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.requests import Request

from radixserve.runtime.chat_template import ChatTemplate, ChatTemplateError
from radixserve.runtime.constraints.config import ConstraintLimits
from radixserve.server.errors import APIError, model_not_found
from radixserve.server.metrics import ServerMetrics
from radixserve.server.settings import ServerSettings

logger = logging.getLogger(__name__)

# Prompts longer than this (characters) are tokenized in a worker thread, not on the loop.
_INLINE_TOKENIZE_CHARS = 4096


@dataclass
class ServerState:
    """Per-app state. `served_name` is what responses report as `model`; `accepted_names`
    are all names a request may send (the served name, aliases, the engine's own model name
    and "default")."""

    engine: Any
    settings: ServerSettings
    metrics: ServerMetrics
    served_name: str
    accepted_names: frozenset[str]
    chat_template: ChatTemplate | None
    chat_template_error: str | None
    bos_token: str | None
    eos_token: str | None
    started_at: int = field(default_factory=lambda: int(time.time()))
    shutting_down: bool = False
    _token_text: dict[int, str] = field(default_factory=dict)

    @classmethod
    def create(cls, engine: Any, settings: ServerSettings) -> ServerState:
        served = settings.served_model_name or engine.model_name
        names = frozenset({served, engine.model_name, "default", *settings.model_aliases})
        template, template_error = None, None
        if engine.chat_template:
            try:
                template = ChatTemplate(engine.chat_template)
            except ChatTemplateError as exc:
                template_error = exc.message
                logger.warning("the model's chat template does not compile: %s", exc.message)
        tokenizer = engine.tokenizer
        return cls(
            engine=engine,
            settings=settings,
            metrics=ServerMetrics(engine),
            served_name=served,
            accepted_names=names,
            chat_template=template,
            chat_template_error=template_error,
            bos_token=_special(tokenizer, "bos_token"),
            eos_token=_special(tokenizer, "eos_token"),
        )

    # ------------------------------------------------------------------ per request
    @property
    def constraint_limits(self) -> ConstraintLimits:
        """The engine's constraint limits and options (JSON bounds, whitespace cap), with this
        server's size limit: what the grammars the server builds itself (tool calls) follow,
        so they obey the same options as the constraints the engine compiles."""
        return replace(self.engine.config.constraints, max_spec_bytes=self.settings.max_constraint_bytes)

    def check_model(self, model: str | None) -> None:
        """A request's `model` must be one of ours (None means ours)."""
        if model is not None and model not in self.accepted_names:
            raise model_not_found(model)

    def require_chat_template(self) -> ChatTemplate:
        if self.chat_template is None:
            if self.chat_template_error is not None:
                raise APIError(500, f"The model's chat template is invalid: {self.chat_template_error}", code="invalid_chat_template")
            raise APIError(400, "This model has no chat template; use /v1/completions.", code="no_chat_template")
        return self.chat_template

    async def tokenize(self, text: str) -> list[int]:
        if len(text) <= _INLINE_TOKENIZE_CHARS:
            return self.engine.tokenize(text)
        return await asyncio.to_thread(self.engine.tokenize, text)

    def token_text(self, token_id: int) -> str:
        """The text of one token (for logprobs), cached: bounded by the vocabulary size."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.engine.detokenize([token_id])
            self._token_text[token_id] = text
        return text

    def vocab_size(self) -> int:
        return int(getattr(self.engine, "vocab_size", None) or len(self.engine.tokenizer))


def new_request_id(request: Request) -> str:
    """The engine request id: the client's (or generated) X-Request-Id plus a random suffix,
    so two HTTP requests that reuse one X-Request-Id never collide in the engine."""
    return f"{request_id_of(request)}-{secrets.token_hex(4)}"


def request_id_of(request: Request) -> str:
    return request.scope.get("radixserve.request_id") or secrets.token_hex(8)


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def _special(tokenizer: Any, name: str) -> str | None:
    value = getattr(tokenizer, name, None)
    return str(value) if value is not None else None
