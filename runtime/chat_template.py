"""Render a model's Jinja chat template into the prompt string, safely.

Chat templates ship with model folders and are untrusted input: they run in Jinja's
`ImmutableSandboxedEnvironment` (no attribute access to Python internals, no mutation of
the inputs), and everything they see is first rebuilt from plain JSON types. The environment
mirrors transformers' `apply_chat_template` so prompts are byte-identical to what the
model was trained with: `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a
`tojson` filter that does not HTML-escape (and takes `indent`, `separators`, `sort_keys`),
the globals `raise_exception(msg)`, `strftime_now(fmt)`, `dict(...)`, and a `namespace` that
refuses underscore names, and a `{% generation %}` block tag (rendered as its body).

Every failure (template syntax, a `raise_exception` call such as "roles must alternate", an
undefined name used wrongly, a sandbox violation) is a `ChatTemplateError`, which the server
turns into a 400 response.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np

__all__ = ["ChatTemplate", "ChatTemplateError", "compile_chat_template", "render_chat"]


class ChatTemplateError(ValueError):
    """The chat template could not be compiled or rendered for these messages.

    `reason` is one of "syntax" (the template itself is malformed), "raised" (the template
    called raise_exception, e.g. on an unsupported role order: a problem with the request),
    "render" (any other failure while rendering).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """Raised by the template's own raise_exception() call."""


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes (<, >, &, '), which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore-prefixed attribute names (no dunder tricks)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set underscore attributes ({name!r})")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks in
    transformers); for serving it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _new_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    return env


def _plain(value: Any) -> Any:
    """A copy of `value` built only from JSON types (str, int, float, bool, None, dict, list,
    tuple). Objects with methods (pydantic models, dataclasses) are converted to dicts; anything
    else becomes an inert "<TypeName>" string, so a template can never call into it."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):  # np.bool_(False) must not become a truthy string
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


# Older names under which clients send a message's reasoning; templates read `reasoning_content`
# (and gpt-oss templates `thinking`). Same aliasing as transformers.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


class ChatTemplate:
    """A compiled chat template; compile once per model, render per request (thread-safe:
    rendering does not mutate the compiled template)."""

    def __init__(self, source: str) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError("the model has no chat template (empty template string)", "syntax")
        self.source = source
        try:
            self._template = _new_environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template syntax error at line {e.lineno}: {e.message}", "syntax") from e
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template cannot be compiled: {e}", "syntax") from e

    def render(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] | None = None,
               add_generation_prompt: bool = True, bos_token: str | None = None, eos_token: str | None = None,
               **kwargs: Any) -> str:
        """The prompt string. Extra keyword arguments reach the template as variables (e.g.
        `enable_thinking=False`, `documents=[...]`, `pad_token`)."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}", "render")
        chat = []
        for i, m in enumerate(messages):
            plain = _plain(m)
            if not isinstance(plain, dict):
                raise ChatTemplateError(f"message {i} must be a dict, got {type(m).__name__}", "render")
            chat.append(_alias_reasoning(plain))
        variables = {k: _plain(v) for k, v in kwargs.items()}
        variables.setdefault("documents", None)
        try:
            return self._template.render(
                messages=chat,
                tools=_plain(list(tools)) if tools is not None else None,
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token,
                eos_token=eos_token,
                **variables,
            )
        except _TemplateRaised as e:
            raise ChatTemplateError(f"chat template rejected the conversation: {e.message}", "raised") from e
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"chat template attempted an unsafe operation: {e}", "render") from e
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template failed to render: {e}", "render") from e
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError) as e:
            # Python errors raised inside the template's expressions (e.g. `'a' + 1`).
            raise ChatTemplateError(f"chat template failed to render: {type(e).__name__}: {e}", "render") from e


def compile_chat_template(source: str) -> ChatTemplate:
    return ChatTemplate(source)


def render_chat(template: str, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
                add_generation_prompt: bool = True, bos_token: str | None = None, eos_token: str | None = None,
                **kwargs: Any) -> str:
    """Compile `template` and render `messages` with it (see ChatTemplate.render). Servers that
    render many requests should compile once with `ChatTemplate(template)` instead."""
    return ChatTemplate(template).render(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token, **kwargs)
