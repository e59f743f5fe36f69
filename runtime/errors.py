"""Errors the engine raises at submission time, each mapped by the server to a 4xx.

They are raised synchronously by `Engine.submit` / `Engine.stream` before a request is
queued, so a rejected request never holds engine resources.
"""

from __future__ import annotations


class RequestRejected(Exception):
    """Base class: the request was not accepted. `param` names the offending field if any."""

    status_code = 400

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLong(RequestRejected):
    """Prompt plus max_tokens exceed the model's context length (the message gives numbers)."""

    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int) -> None:
        super().__init__(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} "
            f"for the completion). Please reduce the prompt or max_tokens.",
            param="messages",
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.limit = limit


class QueueFull(RequestRejected):
    """The waiting queue is at its limit; the client should retry later."""

    status_code = 503

    def __init__(self, limit: int, retry_after_s: float = 1.0) -> None:
        super().__init__(f"The server is overloaded: {limit} requests are already waiting.")
        self.retry_after_s = retry_after_s


class EngineDead(RequestRejected):
    """The engine loop has stopped (crashed or shut down); nothing can be served."""

    status_code = 503
