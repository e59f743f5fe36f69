"""Tree of thought with `fork`: propose several ideas in parallel, judge each, expand the best.

`s.fork(n)` commits the conversation so far and prefills it once; the n branches then run
concurrently (the engine batches their requests) and each finds the shared prefix in the radix
cache. Each branch samples its own idea (a different seed per branch), then `select` asks the
model whether the idea is sound; the idea with the most confident "yes" is continued.

    python examples/tree_of_thought.py [--url http://127.0.0.1:8000]
"""

from __future__ import annotations

import argparse
import sys

from radixserve.lang import Endpoint, Runtime, assistant, function, gen, select, system, user

QUESTION = "A farmer has 3 fields with 4 cows in each field. He buys 5 more cows. How many cows does he have?"


@function
def tree_of_thought(s, question, branches, max_tokens):
    s += system("You solve problems by reasoning step by step.")
    s += user(question + "\nPropose a first step towards the answer.")
    forks = s.fork(branches)
    for i, f in enumerate(forks):
        f += assistant(gen("idea", max_tokens=max_tokens, temperature=0.8, seed=i))
        f += user("Is this step correct? Answer yes or no.")
        f += assistant(select("verdict", choices=["yes", "no"]))
    forks.join()
    # Rank the ideas by the normalized log-probability the model gave "yes".
    confidence = [f.meta("verdict").scores["yes"] for f in forks]
    best = max(range(branches), key=lambda i: confidence[i])
    s += assistant(forks[best]["idea"])
    s += user("Good. Now give the final answer in one sentence.")
    s += assistant(gen("answer", max_tokens=max_tokens))
    return {"ideas": forks["idea"], "confidence": confidence, "best": best,
            "prefix_cached": [f.meta("idea").cached_tokens for f in forks]}


def main(backend=None, branches: int = 3, max_tokens: int = 48, out=sys.stdout) -> dict:
    """Run the search; print the ideas and the answer; return a summary dict."""
    own = backend is None
    backend = backend or Runtime(model="default")
    try:
        state = tree_of_thought.run(question=QUESTION, branches=branches, max_tokens=max_tokens,
                                    backend=backend, sampling={"temperature": 0})
        summary = dict(state.return_value, answer=state["answer"])
        for i, (idea, conf) in enumerate(zip(summary["ideas"], summary["confidence"])):
            mark = "*" if i == summary["best"] else " "
            print(f"{mark} idea {i} (yes={conf:.2f}, cached {summary['prefix_cached'][i]}): {idea!r}", file=out)
        print(f"answer: {summary['answer']}", file=out)
        return summary
    finally:
        if own:
            backend.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a radixserve server (default: an in-process engine)")
    parser.add_argument("--branches", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    main(Endpoint(args.url) if args.url else None, args.branches, args.max_tokens)
