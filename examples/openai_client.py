"""Talk to a running radixserve server with the official OpenAI SDK.

Start a server first (`make serve`, or `radixserve serve --model default --port 8000`), then:

    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1

It lists the model, runs a multi-turn chat (watch `cached_tokens` grow: each turn reuses the
previous turns' KV cache), streams a reply, asks for JSON that follows a schema, forces a
tool call, and scores a prompt through the legacy completions API.
"""

from __future__ import annotations

import argparse
import json
import os

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("RADIXSERVE_API_KEY", "none"))
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)

    model = client.models.list().data[0].id
    print(f"model: {model}\n")

    # Multi-turn: every request resends the whole conversation; the prefix cache serves it.
    messages = [{"role": "system", "content": "You are a concise assistant."}]
    for question in ["Name a primary color.", "Name another one.", "And a third?"]:
        messages.append({"role": "user", "content": question})
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
        answer = reply.choices[0].message.content
        messages.append({"role": "assistant", "content": answer})
        usage = reply.usage
        print(f"user: {question}\nassistant: {answer}")
        print(f"  prompt tokens {usage.prompt_tokens}, of which cached {usage.prompt_tokens_details.cached_tokens}\n")

    # Streaming, with a final usage chunk.
    print("streamed: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Write one sentence about the sea."}],
        max_tokens=40, stream=True, stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        elif chunk.usage is not None:
            print(f"\n  ({chunk.usage.completion_tokens} tokens)\n")

    # Structured output: the reply is guaranteed to parse and follow the schema.
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Name a large city and its country, as JSON."}],
        max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
    )
    print("json:", json.loads(reply.choices[0].message.content), "\n")

    # A forced tool call: the arguments are valid JSON for the tool's parameters.
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What's the weather in Lisbon?"}],
        tools=[weather], tool_choice="required", max_tokens=48, temperature=0,
    )
    for call in reply.choices[0].message.tool_calls or []:
        print(f"tool call: {call.function.name}({call.function.arguments})\n")

    # Legacy completions: echo the prompt with per-token logprobs, generating nothing.
    scored = client.completions.create(model=model, prompt="The sky is blue.", max_tokens=0, echo=True, logprobs=0)
    logprobs = scored.choices[0].logprobs
    for token, logprob in zip(logprobs.tokens, logprobs.token_logprobs):
        print(f"  {token!r:>12} {'' if logprob is None else f'{logprob:.3f}'}")


if __name__ == "__main__":
    main()
