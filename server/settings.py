"""Server settings: one frozen, validated value built by the CLI (or a test) and read by the app.

Engine settings (model, page size, context length, queue limits) live in the engine's own
`EngineConfig`; this holds only what the HTTP layer decides: where to listen, who may call,
how large a body may be, how long a graceful shutdown may take, the names the model is
served under, and the per-request limits the server enforces before anything reaches the
engine (prompt tokens, n, max_tokens, constraint size and compile time).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")

# The protocol's own upper bound on n (the OpenAPI schema states it); max_n may only lower it.
MAX_N = 128

# Sizes given on the command line: "1048576", "512KiB", "16MiB", "16MB", "1G".
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse a byte count with an optional K/M/G suffix (binary multiples: 1K == 1024)."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (use e.g. 1048576, 512KiB, 16MiB)")
    number, unit = int(match.group(1)), match.group(2).lower()
    return number * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit]


@dataclass(frozen=True)
class ServerSettings:
    """What the HTTP layer is configured with.

    `served_model_name` is the name clients must send in `model` (None: the engine's model
    name); `model_aliases` are further accepted names ("default" is always accepted).
    `api_key` None disables authentication. `graceful_shutdown_s` bounds how long in-flight
    requests may run after SIGTERM before they are cancelled. `default_max_tokens` caps
    chat completions that send no max_tokens (None: the rest of the context window).
    `shutdown_engine` False leaves the engine running when the app stops (a test that shares
    one engine between several apps).

    Per-request limits (each a 400 naming the field when exceeded): `max_prompt_tokens`
    bounds a prompt after templating and tokenization (None: only the context length does);
    `max_n` bounds `n` (at most MAX_N, the schema's bound); `max_tokens_limit` bounds the
    completion budget a request may ask for, and caps the budget of requests that send none
    (None: the context length does); `max_constraint_bytes` bounds the text of a regex,
    grammar, JSON schema or choice list; `constraint_timeout_s` bounds how long the server
    waits for a constraint to compile (llguidance's own fuel limits bound the work itself).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    model_aliases: tuple[str, ...] = ()
    max_body_bytes: int = 16 << 20
    graceful_shutdown_s: float = 30.0
    log_level: str = "info"
    default_max_tokens: int | None = None
    shutdown_engine: bool = True
    max_prompt_tokens: int | None = None
    max_n: int = MAX_N
    max_tokens_limit: int | None = None
    max_constraint_bytes: int = 1 << 20
    constraint_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_aliases", tuple(self.model_aliases))
        if not self.host:
            raise ValueError("host must not be empty")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be blank (leave it unset to disable auth)")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("served_model_name must not be blank")
        if any(not alias.strip() for alias in self.model_aliases):
            raise ValueError("model aliases must not be blank")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.graceful_shutdown_s < 0:
            raise ValueError("graceful_shutdown_s must be non-negative")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        object.__setattr__(self, "log_level", self.log_level.lower())
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be positive")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be positive, got {self.max_prompt_tokens}")
        if not isinstance(self.max_n, int) or not 1 <= self.max_n <= MAX_N:
            raise ValueError(f"max_n must be in [1, {MAX_N}], got {self.max_n!r}")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be positive, got {self.max_tokens_limit}")
        if self.max_constraint_bytes < 1:
            raise ValueError(f"max_constraint_bytes must be positive, got {self.max_constraint_bytes}")
        if not self.constraint_timeout_s > 0:
            raise ValueError(f"constraint_timeout_s must be positive, got {self.constraint_timeout_s}")
