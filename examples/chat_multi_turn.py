"""Multi-turn chat with radixserve.lang, streaming each reply as it is generated.

Every turn re-sends the whole conversation, but the engine's radix cache already holds it
(the previous turn's prompt and reply), so only the new user message is prefilled: the
printed `cached` count grows turn by turn.

    python examples/chat_multi_turn.py                     # in-process engine, default model
    python examples/chat_multi_turn.py --url http://127.0.0.1:8000   # a running server
"""

from __future__ import annotations

import argparse
import sys

from radixserve.lang import Endpoint, Runtime, assistant, function, gen, system, user

TURNS = [
    "Hi! Can you suggest a name for a small orange cat?",
    "Nice. Why does that name suit it?",
    "Thanks! Now write a one-line poem about the cat.",
]


@function
def chat(s, turns, max_tokens):
    s += system("You are a friendly and concise assistant.")
    for i, question in enumerate(turns):
        s += user(question)
        s += assistant(gen(f"reply{i}", max_tokens=max_tokens))


def main(backend=None, max_tokens: int = 64, turns: list[str] | None = None, out=sys.stdout) -> list[dict]:
    """Run the conversation; print it as it streams; return the chat messages."""
    turns = TURNS if turns is None else turns
    own = backend is None
    backend = backend or Runtime(model="default")
    try:
        state = chat.run(turns=turns, max_tokens=max_tokens, backend=backend, stream=True,
                         sampling={"temperature": 0})
        for i, question in enumerate(turns):
            print(f"user: {question}\nassistant: ", end="", file=out, flush=True)
            for piece in state.text_iter(f"reply{i}"):
                print(piece, end="", file=out, flush=True)
            meta = state.meta(f"reply{i}")
            print(f"\n  [prompt {meta.prompt_tokens} tokens, cached {meta.cached_tokens}]\n", file=out)
        return state.messages()
    finally:
        if own:
            backend.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a radixserve server (default: an in-process engine)")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    main(Endpoint(args.url) if args.url else None, args.max_tokens)
