"""Retrieval-augmented answers over a small local document set, documents as the shared prefix.

All documents go into the system message, which is identical for every question, so it is the
prefix every request shares: `run_batch` computes it once (the first program's first request)
and the other questions find it in the radix cache; the printed `cached` counts show it. After
answering, the model names its source with `select` over the document titles.

    python examples/rag.py [--url http://127.0.0.1:8000]
"""

from __future__ import annotations

import argparse
import sys

from radixserve.lang import Endpoint, Runtime, assistant, function, gen, select, system, user

DOCUMENTS = {
    "Harbor Library": (
        "The Harbor Library opened in 1912 on the east pier of Port Aldren. It holds about "
        "40,000 books, most of them about ships, navigation and the sea. It is open from "
        "Tuesday to Saturday, 10 am to 6 pm, and entry is free."
    ),
    "Aldren Ferry": (
        "The Aldren Ferry crosses the bay between Port Aldren and Gull Island every 45 minutes "
        "from 6 am to 11 pm. A single ticket costs 4 euros for adults and 2 euros for children. "
        "Bicycles travel free of charge."
    ),
    "Gull Island Lighthouse": (
        "The lighthouse on Gull Island is 38 meters tall and was built in 1874. Visitors can "
        "climb its 212 steps between April and October. The light can be seen from 30 "
        "kilometers away on a clear night."
    ),
    "Fish Market": (
        "The Port Aldren fish market runs every morning except Monday from 5 am to noon. Most "
        "stalls sell cod, mackerel and crab caught the same night. Payment by card is accepted "
        "at all stalls since 2021."
    ),
}
QUESTIONS = [
    "How tall is the lighthouse on Gull Island?",
    "When does the fish market open?",
    "How much is a ferry ticket for a child?",
]


def _context() -> str:
    return "\n\n".join(f"[{title}]\n{text}" for title, text in DOCUMENTS.items())


@function
def rag(s, question, max_tokens):
    s += system("Answer the question using only these documents. Be brief.\n\n" + _context())
    s += user(question)
    s += assistant(gen("answer", max_tokens=max_tokens, stop="\n"))
    s += user("Which document did you use?")
    s += assistant(select("source", choices=list(DOCUMENTS)))


def main(backend=None, max_tokens: int = 48, questions: list[str] | None = None, out=sys.stdout) -> list[dict]:
    """Answer `questions`; print answers, sources and cache use; return them as dicts."""
    questions = QUESTIONS if questions is None else questions
    own = backend is None
    backend = backend or Runtime(model="default")
    try:
        states = rag.run_batch([{"question": q, "max_tokens": max_tokens} for q in questions],
                               backend=backend, sampling={"temperature": 0}, progress_bar=False)
        results = []
        for q, st in zip(questions, states):
            meta = st.meta("answer")
            row = {"question": q, "answer": st["answer"].strip(), "source": st["source"],
                   "prompt_tokens": meta.prompt_tokens, "cached_tokens": meta.cached_tokens}
            print(f"Q: {q}\nA: {row['answer']}  [source: {row['source']}; "
                  f"cached {meta.cached_tokens}/{meta.prompt_tokens} prompt tokens]\n", file=out)
            results.append(row)
        return results
    finally:
        if own:
            backend.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a radixserve server (default: an in-process engine)")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    main(Endpoint(args.url) if args.url else None, args.max_tokens)
