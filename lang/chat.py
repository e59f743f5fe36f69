"""Role markers derived from a model's chat template.

A program builds its chat text incrementally (`s += user(...)`, then `assistant(gen(...))`),
so it needs each role's prefix and suffix as plain text, not a renderer of whole message
lists. `ChatFormat.from_template` derives them once per template by rendering conversations
that contain marker strings and cutting the output around the markers:

    render([system(M)])                      = first["system"] + M + suffix["system"]
    render([user(M)])                        = first["user"]   + M + suffix["user"]
    render([sys A, user B, asst C, user(M)]) = render([sys A, user B, asst C])
                                               + prefix["user"] + M + suffix["user"]
    render([sys A, user B], gen_prompt=True) = render([sys A, user B]) + prefix["assistant"]

`first[role]` is used for the conversation's first message: it carries whatever the template
emits once (a BOS token, a default system prompt when the first message is not a system one).
The assistant prefix is exactly what `add_generation_prompt=True` appends, so a generated
assistant turn sees the same text as a chat-completions request would.
"""

from __future__ import annotations

from dataclasses import dataclass

from radixserve.lang.errors import ChatTemplateError

_MARK = "RADIXSERVEMARK{}X"


def render_chat(
    template: str,
    messages: list[dict[str, str]],
    *,
    add_generation_prompt: bool,
    bos_token: str | None,
    eos_token: str | None,
) -> str:
    """Render `messages` with the runtime's renderer (radixserve.runtime.chat_template)."""
    try:
        from radixserve.runtime.chat_template import render_chat as _render
    except ImportError:  # the runtime's renderer is not installed: a sandboxed Jinja fallback
        _render = _jinja_render
    return _render(
        template,
        messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token or "",
        eos_token=eos_token or "",
    )


def _jinja_render(template, messages, *, add_generation_prompt, bos_token, eos_token) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
    )


def _split(text: str, marker: str, what: str) -> tuple[str, str]:
    if text.count(marker) != 1:
        raise ChatTemplateError(f"cannot derive the {what} markers: the template does not render message content verbatim")
    before, after = text.split(marker)
    return before, after


def _delta(longer: str, shorter: str, what: str) -> str:
    if not longer.startswith(shorter):
        raise ChatTemplateError(
            f"cannot derive the {what} markers: the template is not prefix-stable (adding a "
            f"message changes the text rendered before it)"
        )
    return longer[len(shorter) :]


@dataclass(frozen=True)
class ChatFormat:
    """Each role's prefix (`first` for the conversation's first message, `prefix` after
    that) and suffix, as text. Invariant: concatenating them around message contents
    reproduces the template's rendering of the same conversation."""

    first: dict[str, str]
    prefix: dict[str, str]
    suffix: dict[str, str]

    def role_prefix(self, role: str, is_first: bool) -> str:
        return (self.first if is_first else self.prefix)[role]

    def role_suffix(self, role: str) -> str:
        return self.suffix[role]

    @classmethod
    def from_template(
        cls, template: str, *, bos_token: str | None = None, eos_token: str | None = None
    ) -> ChatFormat:
        def render(msgs: list[tuple[str, str]], gen: bool = False) -> str:
            try:
                return render_chat(
                    template,
                    [{"role": r, "content": c} for r, c in msgs],
                    add_generation_prompt=gen,
                    bos_token=bos_token,
                    eos_token=eos_token,
                )
            except ChatTemplateError:
                raise
            except Exception as e:  # a template's raise_exception, or a Jinja error
                raise ChatTemplateError(f"the chat template failed to render: {e}") from e

        m = [_MARK.format(i) for i in range(5)]
        first, prefix, suffix = {}, {}, {}

        first["system"], suffix["system"] = _split(render([("system", m[0])]), m[0], "system")
        first["user"], suffix["user"] = _split(render([("user", m[0])]), m[0], "user")

        base2 = [("system", m[0]), ("user", m[1])]
        plain2 = render(base2)
        prefix["assistant"] = _delta(render(base2, gen=True), plain2, "assistant")
        with_reply = render(base2 + [("assistant", m[2])])
        _, suffix["assistant"] = _split(_delta(with_reply, plain2, "assistant"), m[2], "assistant")
        first["assistant"] = prefix["assistant"]

        base3 = base2 + [("assistant", m[2])]
        later_user = _delta(render(base3 + [("user", m[3])]), with_reply, "user")
        prefix["user"], later_suffix = _split(later_user, m[3], "user")
        if later_suffix != suffix["user"]:
            raise ChatTemplateError("the template closes user messages differently by position")
        try:
            later_sys = _delta(render(base3 + [("system", m[3])]), with_reply, "system")
            prefix["system"], _ = _split(later_sys, m[3], "system")
        except ChatTemplateError:
            # Templates that forbid a system message after the first: reuse the user layout's
            # structure is impossible to guess, so fall back to the first-position prefix.
            prefix["system"] = first["system"]
        return cls(first=first, prefix=prefix, suffix=suffix)
