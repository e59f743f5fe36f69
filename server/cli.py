"""The `radixserve` command line: `radixserve serve --model default --port 8000`.

`serve` builds the engine (it loads the model and starts its thread), wraps it in the app
and runs uvicorn. SIGTERM / Ctrl-C stop accepting connections, let in-flight requests finish
for up to `--graceful-shutdown-timeout` seconds (then cancel them, which aborts their
engine requests), and stop the engine in the app's lifespan shutdown.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from radixserve.runtime.constraints.config import ConstraintLimits
from radixserve.server.settings import LOG_LEVELS, MAX_N, ServerSettings, parse_size

logger = logging.getLogger("radixserve.server")

API_KEY_ENV = "RADIXSERVE_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radixserve", description="radixserve: a prefix-caching LLM server.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")

    model = serve.add_argument_group("model and engine")
    model.add_argument("--model", default="default", help="model name or path ('default': the bundled small model)")
    model.add_argument("--served-model-name", default=None, help="name clients send as `model` (default: the model's own name)")
    model.add_argument("--model-alias", action="append", default=[], help="another accepted model name (repeatable)")
    model.add_argument("--page-size", type=int, default=None, help="tokens per KV page (1..64)")
    model.add_argument("--context-length", "--max-model-len", dest="max_model_len", type=int, default=None,
                       help="maximum prompt + completion tokens (default: the model's)")
    model.add_argument("--max-running", type=int, default=None, help="requests computed concurrently")
    model.add_argument("--max-waiting", type=int, default=None, help="queued requests before new ones get 503")
    model.add_argument("--max-batch-tokens", type=int, default=None,
                       help="token budget of one engine step (default: 2048 on the CPU, 8192 or 16384 on a GPU)")
    model.add_argument("--num-pages", type=int, default=None, help="KV pages in the pool (default: sized from memory)")
    model.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N")
    model.add_argument("--dtype", default=None, help="auto, float32, bfloat16, float16")
    model.add_argument("--decode-burst", type=int, default=None,
                       help="decode steps per launch for large decode batches on CUDA (default 8; 1: off)")
    model.add_argument("--decode-burst-min-batch", type=int, default=None,
                       help="running requests from which decode bursts apply (default 128)")
    model.add_argument("--disable-prefix-cache", action="store_true", help="turn the radix prefix cache off")
    model.add_argument("--stall-timeout", dest="stall_timeout_s", type=float, default=None,
                       help="seconds one engine step may take before /health reports the engine stuck")

    http = serve.add_argument_group("HTTP server")
    http.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                      help=f"require this bearer token (default: ${API_KEY_ENV}; unset: no auth)")
    http.add_argument("--max-body-size", type=parse_size, default=parse_size("16MiB"),
                      help="largest accepted request body, e.g. 16MiB")
    http.add_argument("--default-max-tokens", type=int, default=None,
                      help="completion budget of chat requests that send none (default: rest of the context)")
    http.add_argument("--graceful-shutdown-timeout", type=float, default=30.0,
                      help="seconds in-flight requests may run after SIGTERM")

    limits = serve.add_argument_group("per-request limits (a request over one gets a 400 naming the field)")
    limits.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="largest prompt, in tokens after the chat template (default: the context length)")
    limits.add_argument("--max-n", type=int, default=MAX_N, help=f"largest n, completions per prompt (1..{MAX_N})")
    limits.add_argument("--max-tokens-limit", type=int, default=None,
                        help="largest max_tokens a request may ask for; also caps requests that send none")
    limits.add_argument("--max-constraint-size", dest="max_constraint_bytes", type=parse_size, default=parse_size("1MiB"),
                        help="largest regex / grammar / JSON schema / choice list, e.g. 64KiB")
    limits.add_argument("--constraint-timeout", dest="constraint_timeout_s", type=float, default=10.0,
                        help="seconds a request's output constraint may take to compile")
    json_opts = serve.add_argument_group(
        "structured outputs (bounds added to every JSON schema and tool schema, never loosening it)")
    json_opts.add_argument("--json-max-string-length", type=int, default=None,
                           help="longest JSON string a constrained output may hold, in characters (default: no bound)")
    json_opts.add_argument("--json-max-items", type=int, default=None,
                           help="most items of a JSON array in a constrained output (default: no bound)")
    json_opts.add_argument("--json-max-properties", type=int, default=None,
                           help="most properties of a JSON object in a constrained output (default: no bound)")
    json_opts.add_argument("--json-max-integer-digits", type=int, default=None,
                           help="most digits of a JSON integer (or a number's integer part) in a constrained output")
    json_opts.add_argument("--json-max-whitespace", type=int, default=None,
                           help="most whitespace characters at any place JSON allows it (default: 20; 0 = compact)")
    http.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    return parser


def constraint_limits_from_args(args: argparse.Namespace) -> ConstraintLimits | None:
    """The engine's ConstraintLimits when any structured-output option is given, else None
    (the engine's defaults)."""
    names = ("json_max_string_length", "json_max_items", "json_max_properties", "json_max_integer_digits",
             "json_max_whitespace")
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return ConstraintLimits(**given) if given else None


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Only the engine options given on the command line: the engine's defaults stay its own."""
    options = {
        "page_size": args.page_size,
        "max_model_len": args.max_model_len,
        "max_running": args.max_running,
        "max_waiting": args.max_waiting,
        "max_batch_tokens": args.max_batch_tokens,
        "num_pages": args.num_pages,
        "device": args.device,
        "dtype": args.dtype,
        "stall_timeout_s": args.stall_timeout_s,
        "decode_burst": args.decode_burst,
        "decode_burst_min_batch": args.decode_burst_min_batch,
    }
    kwargs = {key: value for key, value in options.items() if value is not None}
    if args.disable_prefix_cache:
        kwargs["enable_prefix_cache"] = False
    limits = constraint_limits_from_args(args)
    if limits is not None:
        kwargs["constraints"] = limits
    return kwargs


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        model_aliases=tuple(args.model_alias),
        max_body_bytes=args.max_body_size,
        graceful_shutdown_s=args.graceful_shutdown_timeout,
        log_level=args.log_level,
        default_max_tokens=args.default_max_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        max_n=args.max_n,
        max_tokens_limit=args.max_tokens_limit,
        max_constraint_bytes=args.max_constraint_bytes,
        constraint_timeout_s=args.constraint_timeout_s,
    )


def run_server(app: Any, settings: ServerSettings) -> None:
    """Run `app` under uvicorn until SIGTERM/SIGINT (blocking; signals need the main thread)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
    )
    uvicorn.Server(config).run()


def serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    level = "DEBUG" if settings.log_level == "trace" else settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from radixserve.runtime import Engine, EngineConfig  # heavy (torch): only when serving
    from radixserve.server.app import create_app

    try:
        config = EngineConfig(model=args.model, **engine_kwargs(args))
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    try:
        engine = Engine.from_config(config)
    except Exception as exc:  # noqa: BLE001 - report a failed start without a traceback wall
        logger.error("could not start the engine for %r: %s", args.model, exc)
        logger.debug("engine start failure", exc_info=True)
        return 1
    run_server(create_app(engine, settings), settings)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args, parser)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
