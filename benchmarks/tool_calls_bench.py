"""Tool calls with tool_choice "required": do all requests return calls with valid arguments?

A real server (uvicorn on 127.0.0.1, `create_app(engine, settings)` around
`Engine(model="default")`, started in this process) is called with the official `openai` SDK:
`--requests` chat completions (default 50) with three tools whose parameter schemas differ
(strings with an enum and a pattern, a date format and an integer range, an array of objects
and a boolean) and varied user questions, `tool_choice="required"`, greedy; once not streamed
and once streamed (`stream=True`), several requests in flight at a time so the engine batches.

A request counts as a success when its choice ends with finish_reason "tool_calls" and every
tool call names one of the tools and has `arguments` that `json.loads` and validate with
`jsonschema` (the validator of the schema's draft, with its format checker) against that
tool's `parameters`. Streamed responses are reassembled as OpenAI clients do: tool-call
deltas grouped by `index`, the first carrying `id` and `function.name`, `function.arguments`
fragments concatenated in order; the finish_reason is the one of the last chunk that has one.

Greedy, the default model (135M parameters) sometimes repeats itself inside the arguments (the
same cart item with quantity 1, 2, 3, ...) until max_tokens ends the call unfinished
(finish_reason "length": a failure here). `--max-string-length`, `--max-items`,
`--max-properties`, `--max-integer-digits` turn on the optional JSON bounds of `ConstraintLimits` for the tool-call
constraint (`tighten_schema`: bounds added to each tool's schema, never loosened, so arguments
still validate against the tool's schema as given), set on the engine this script starts
(`Engine(constraints=ConstraintLimits(...))`, as `radixserve serve --json-max-items ...` does).

Run:  python -m benchmarks.tool_calls_bench [--requests 50] [--concurrency 8] [--max-tokens 256]
      [--max-string-length 128 --max-items 8 --max-properties 8 --max-integer-digits 12]
      [--url http://host:port/v1 --api-key KEY]   (an already running server instead)

Exit status: 1 unless every request in both modes succeeded.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

API_KEY = "bench-key"

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city name, e.g. Paris"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"},
                },
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "book_flight",
            "description": "Book a flight between two airports on a date.",
            "parameters": {
                "type": "object",
                "properties": {
                    "origin": {"type": "string", "pattern": "^[A-Z]{3}$", "description": "IATA code of the departure airport"},
                    "destination": {"type": "string", "pattern": "^[A-Z]{3}$", "description": "IATA code of the arrival airport"},
                    "date": {"type": "string", "format": "date", "description": "Departure date, YYYY-MM-DD"},
                    "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["origin", "destination", "date"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add_to_cart",
            "description": "Add products to the shopping cart.",
            "parameters": {
                "type": "object",
                "properties": {
                    "items": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "properties": {
                                "product": {"type": "string"},
                                "quantity": {"type": "integer", "minimum": 1},
                            },
                            "required": ["product", "quantity"],
                            "additionalProperties": False,
                        },
                    },
                    "express_delivery": {"type": "boolean"},
                },
                "required": ["items"],
                "additionalProperties": False,
            },
        },
    },
]

_CITIES = ["Paris", "Tokyo", "New York", "Berlin", "Cairo", "Sydney", "Lima", "Toronto", "Mumbai", "Oslo",
           "Madrid", "Nairobi", "Seoul", "Rome", "Chicago", "Lisbon", "Dublin"]
_WEATHER = [
    "What's the weather like in {city} right now?",
    "Is it raining in {city}?",
    "How hot is it in {city} today, in fahrenheit?",
    "Tell me the temperature in {city} in celsius.",
    "Do I need an umbrella in {city}?",
]
_ROUTES = [("CDG", "JFK"), ("LHR", "NRT"), ("SFO", "BOS"), ("FRA", "MAD"), ("SYD", "AKL"), ("DXB", "BOM"),
           ("ORD", "MIA"), ("AMS", "OSL"), ("YYZ", "LAX"), ("GRU", "LIM"), ("ICN", "HND"), ("FCO", "ATH"),
           ("DUB", "LIS"), ("SEA", "DEN"), ("CAI", "NBO"), ("BER", "VIE"), ("MEX", "BOG")]
_FLIGHTS = [
    "Book me a flight from {a} to {b} on 2025-0{m}-1{d}.",
    "I need {n} seats from {a} to {b} on 2025-0{m}-2{d}.",
    "Please reserve a flight {a} -> {b}, departing 2025-1{d2}-0{m}, for {n} passengers.",
    "Can you get me on a plane from {a} to {b} on 2026-0{m}-1{d}?",
]
_PRODUCTS = ["apples", "a phone charger", "coffee beans", "running shoes", "notebooks", "a desk lamp", "tea",
             "batteries", "a yoga mat", "headphones", "pasta", "light bulbs", "socks", "a water bottle",
             "printer paper", "dog food"]
_CART = [
    "Add {q} {p} to my cart.",
    "Put {p} in my shopping cart, {q} of them, with express delivery.",
    "I want to buy {q} {p} and 1 {p2}.",
    "Order {p} for me (quantity {q}), no rush on delivery.",
]


def questions(count: int) -> list[str]:
    """`count` user questions, deterministic, cycling over the three tools' topics."""
    out: list[str] = []
    for i in range(count):
        k, topic = divmod(i, 3)
        if topic == 0:
            out.append(_WEATHER[k % len(_WEATHER)].format(city=_CITIES[k % len(_CITIES)]))
        elif topic == 1:
            a, b = _ROUTES[k % len(_ROUTES)]
            out.append(_FLIGHTS[k % len(_FLIGHTS)].format(a=a, b=b, m=1 + k % 9, d=k % 10, d2=k % 3, n=1 + k % 4))
        else:
            p, p2 = _PRODUCTS[k % len(_PRODUCTS)], _PRODUCTS[(k + 5) % len(_PRODUCTS)]
            out.append(_CART[k % len(_CART)].format(p=p, p2=p2, q=2 + k % 5))
    return out


def tool_validators(tools: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Tool name -> jsonschema validator of its parameters (own draft, with formats)."""
    import jsonschema

    validators = {}
    for tool in tools:
        schema = tool["function"]["parameters"]
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        validators[tool["function"]["name"]] = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return validators


@dataclass
class Outcome:
    question: str
    ok: bool
    finish_reason: str | None
    calls: list[tuple[str | None, str]] = field(default_factory=list)  # (name, arguments)
    problem: str = ""
    seconds: float = 0.0
    content: str | None = None


def check_calls(finish_reason: str | None, calls: list[tuple[str | None, str]], validators: dict[str, Any]) -> str:
    """Why a response is not a success ("" when it is)."""
    import jsonschema

    if finish_reason != "tool_calls":
        return f"finish_reason {finish_reason!r}"
    if not calls:
        return "no tool calls"
    for name, arguments in calls:
        if name not in validators:
            return f"unknown tool {name!r}"
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError as exc:
            return f"{name}: arguments are not JSON ({exc}): {arguments[:120]!r}"
        error = jsonschema.exceptions.best_match(validators[name].iter_errors(value))
        if error is not None:
            return f"{name}: arguments invalid: {error.message}"
    return ""


def request_kwargs(model: str, question: str, max_tokens: int) -> dict[str, Any]:
    return dict(
        model=model,
        messages=[{"role": "user", "content": question}],
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=max_tokens,
    )


def call_plain(client: Any, model: str, question: str, max_tokens: int, validators: dict[str, Any]) -> Outcome:
    t0 = time.perf_counter()
    try:
        response = client.chat.completions.create(**request_kwargs(model, question, max_tokens))
    except Exception as exc:  # noqa: BLE001 - counted as a failure
        return Outcome(question, False, None, problem=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - t0)
    choice = response.choices[0]
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    problem = check_calls(choice.finish_reason, calls, validators)
    return Outcome(question, not problem, choice.finish_reason, calls, problem, time.perf_counter() - t0, choice.message.content)


def reassemble(chunks: Any) -> tuple[str | None, list[tuple[str | None, str]], str, list[str | None]]:
    """(finish_reason, [(name, arguments)], content, ids) from streamed chat chunks, the way
    OpenAI clients fold tool-call deltas: by `index`, id and name from the deltas that carry
    them (names concatenated, as the SDK's accumulator does), arguments concatenated."""
    finish: str | None = None
    content = ""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            if delta is not None:
                content += delta.content or ""
                for tc in delta.tool_calls or []:
                    call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                    if tc.id:
                        call["id"] = tc.id
                    if tc.function is not None:
                        if tc.function.name:
                            call["name"] = (call["name"] or "") + tc.function.name
                        if tc.function.arguments:
                            call["arguments"] += tc.function.arguments
            if choice.finish_reason is not None:
                finish = choice.finish_reason
    ordered = [calls[i] for i in sorted(calls)]
    return finish, [(c["name"], c["arguments"]) for c in ordered], content, [c["id"] for c in ordered]


def call_streamed(client: Any, model: str, question: str, max_tokens: int, validators: dict[str, Any]) -> Outcome:
    t0 = time.perf_counter()
    try:
        stream = client.chat.completions.create(**request_kwargs(model, question, max_tokens), stream=True)
        finish, calls, content, ids = reassemble(stream)
    except Exception as exc:  # noqa: BLE001 - counted as a failure
        return Outcome(question, False, None, problem=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - t0)
    problem = check_calls(finish, calls, validators)
    if not problem and any(not (i and i.startswith("call_")) for i in ids):
        problem = f"tool call without an id: {ids}"
    return Outcome(question, not problem, finish, calls, problem, time.perf_counter() - t0, content or None)


def run_mode(client: Any, model: str, qs: Sequence[str], max_tokens: int, concurrency: int, streamed: bool) -> tuple[list[Outcome], float]:
    validators = tool_validators(TOOLS)
    fn = call_streamed if streamed else call_plain
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        outcomes = list(pool.map(lambda q: fn(client, model, q, max_tokens, validators), qs))
    return outcomes, time.perf_counter() - t0


class LocalServer:
    """uvicorn serving `create_app(engine, settings)` on 127.0.0.1 (a free port, bound before
    start) from a daemon thread."""

    def __init__(self, engine: Any) -> None:
        import uvicorn

        from radixserve.server.app import create_app
        from radixserve.server.settings import ServerSettings

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        app = create_app(engine, ServerSettings(api_key=API_KEY))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> "LocalServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


def summarize(outcomes: Sequence[Outcome], seconds: float) -> dict[str, Any]:
    by_tool: dict[str, int] = {}
    for o in outcomes:
        for name, _ in o.calls:
            by_tool[str(name)] = by_tool.get(str(name), 0) + 1
    latencies = [o.seconds for o in outcomes]
    return {
        "requests": len(outcomes),
        "ok": sum(o.ok for o in outcomes),
        "finish_tool_calls": sum(o.finish_reason == "tool_calls" for o in outcomes),
        "calls": sum(len(o.calls) for o in outcomes),
        "calls_by_tool": dict(sorted(by_tool.items())),
        "seconds": seconds,
        "latency_p50_s": statistics.median(latencies) if latencies else 0.0,
        "latency_max_s": max(latencies) if latencies else 0.0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--url", default=None, help="use this server (…/v1) instead of starting one")
    parser.add_argument("--api-key", default=API_KEY)
    parser.add_argument("--model", default="default", help="engine model (local server) or the served name (--url)")
    parser.add_argument("--max-string-length", type=int, default=None, help="ConstraintLimits.json_max_string_length (default: off)")
    parser.add_argument("--max-items", type=int, default=None, help="ConstraintLimits.json_max_items (default: off)")
    parser.add_argument("--max-properties", type=int, default=None, help="ConstraintLimits.json_max_properties (default: off)")
    parser.add_argument("--max-integer-digits", type=int, default=None,
                        help="ConstraintLimits.json_max_integer_digits (default: off)")
    parser.add_argument("--verbose", action="store_true", help="print every request's calls")
    args = parser.parse_args(argv)

    import openai

    server = engine = None
    bounds = {"json_max_string_length": args.max_string_length, "json_max_items": args.max_items,
              "json_max_properties": args.max_properties,
              "json_max_integer_digits": args.max_integer_digits}
    bounded = any(v is not None for v in bounds.values())
    if bounded and args.url is not None:
        parser.error("the JSON bounds apply to the server this script starts, not to --url")
    if args.url is None:
        from radixserve.runtime import Engine

        from radixserve.runtime.constraints import ConstraintLimits

        engine = Engine(args.model, constraints=ConstraintLimits(**bounds))
        server = LocalServer(engine).start()
        url, model = server.url, engine.model_name
    else:
        url, model = args.url, args.model
    client = openai.OpenAI(base_url=url, api_key=args.api_key, max_retries=0, timeout=600)
    qs = questions(args.requests)
    results: dict[str, tuple[list[Outcome], float]] = {}
    try:
        for mode in ("non-streamed", "streamed"):
            results[mode] = run_mode(client, model, qs, args.max_tokens, args.concurrency, mode == "streamed")
    finally:
        if server is not None:
            server.stop()  # the app's lifespan shuts the engine down

    print(f"tool_choice=\"required\": {len(qs)} requests per mode, {len(TOOLS)} tools, model {model},"
          f" greedy, max_tokens {args.max_tokens}, {args.concurrency} in flight, openai SDK {openai.__version__}")
    print("JSON bounds: " + (", ".join(f"{k} {v}" for k, v in bounds.items() if v is not None) if bounded else "off"))
    exit_code = 0
    for mode, (outcomes, seconds) in results.items():
        s = summarize(outcomes, seconds)
        print(f"{mode:>13}: {s['ok']}/{s['requests']} requests returned tool calls whose arguments validate"
              f" (finish_reason tool_calls: {s['finish_tool_calls']}; calls: {s['calls']} {s['calls_by_tool']});"
              f" {seconds:.1f} s, latency p50 {s['latency_p50_s']:.1f} s, max {s['latency_max_s']:.1f} s")
        for o in outcomes:
            if not o.ok:
                got = "; ".join(f"{n}({a})" for n, a in o.calls) or repr(o.content)
                print(f"    FAILED {o.question!r}: {o.problem}; got {got[:100]}...{got[-60:]}")
            elif args.verbose:
                print(f"    {o.question!r} -> " + "; ".join(f"{n}({a})" for n, a in o.calls))
        if s["ok"] != s["requests"]:
            exit_code = 1
    plain, streamed = results["non-streamed"][0], results["streamed"][0]
    same = sum(a.calls == b.calls for a, b in zip(plain, streamed))
    print(f"streamed calls identical to the non-streamed ones: {same}/{len(qs)} (greedy; batching may change float rounding)")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
