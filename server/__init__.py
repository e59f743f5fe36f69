"""radixserve.server: the OpenAI-compatible HTTP server (starlette + uvicorn).

`radixserve serve` (server/cli.py) builds an engine and serves `create_app(engine, settings)`
(server/app.py): OpenAI chat and text completions, the native `/generate` endpoint, tokenizer
utilities, health, Prometheus metrics and an OpenAPI document. This package init stays empty
so the CLI can parse its flags before anything heavy is imported.
"""
