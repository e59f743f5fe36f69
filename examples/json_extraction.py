"""Structured extraction: turn free text into JSON that follows a JSON Schema.

`gen(json_schema=...)` constrains decoding with the schema (the engine masks every token that
would break it), so the output parses and validates whenever generation finishes (it can only
fall short when `max_tokens` cuts it off, which `finish_reason == "length"` reports).

    python examples/json_extraction.py [--url http://127.0.0.1:8000]
"""

from __future__ import annotations

import argparse
import json
import sys

from radixserve.lang import Endpoint, Runtime, assistant, function, gen, system, user

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
TEXTS = [
    "Maria Lopez, 34, moved to Valencia last spring to open a bakery.",
    "At 71, retired sailor Tom Hughes still lives by the harbor in Bristol.",
]


@function
def extract(s, text, max_tokens):
    s += system("Extract the person's name, age and city from the text as JSON.")
    s += user(text)
    s += assistant(gen("person", json_schema=SCHEMA, max_tokens=max_tokens))


def main(backend=None, max_tokens: int = 64, texts: list[str] | None = None, out=sys.stdout) -> list[dict | None]:
    """Extract a record from each text; print and return them (None where cut off)."""
    texts = TEXTS if texts is None else texts
    own = backend is None
    backend = backend or Runtime(model="default")
    try:
        states = extract.run_batch([{"text": t, "max_tokens": max_tokens} for t in texts],
                                   backend=backend, sampling={"temperature": 0}, progress_bar=False)
        records: list[dict | None] = []
        for text, st in zip(texts, states):
            raw, meta = st["person"], st.meta("person")
            record = json.loads(raw) if meta.finish_reason == "stop" else None
            shown = record if record is not None else f"(cut off at {max_tokens} tokens) {raw!r}"
            print(f"{text}\n  -> {shown}", file=out)
            records.append(record)
        return records
    finally:
        if own:
            backend.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a radixserve server (default: an in-process engine)")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    main(Endpoint(args.url) if args.url else None, args.max_tokens)
