"""Few-shot sentiment classification with `select`.

The instructions and labelled examples form a prefix that every review shares; `run_batch`
computes it once and then classifies the reviews concurrently. `select` scores each label by
the mean log-probability of its tokens after the prompt, in one batched engine call, and picks
the best (the labels start with a space, as the next word after "Sentiment:" would).

    python examples/few_shot_classification.py [--url http://127.0.0.1:8000]
"""

from __future__ import annotations

import argparse
import sys

from radixserve.lang import Endpoint, Runtime, function, select

LABELS = [" positive", " negative", " neutral"]
EXAMPLES = [
    ("The pasta was perfect and the staff were lovely.", "positive"),
    ("We waited an hour and the soup was cold.", "negative"),
    ("The restaurant is on the corner of Main Street.", "neutral"),
    ("Best dessert I have had in years!", "positive"),
    ("Rude service, never coming back.", "negative"),
]
REVIEWS = [
    "Absolutely delicious, I loved every bite.",
    "The room was dirty and smelled bad.",
    "The cafe opens at nine in the morning.",
    "A wonderful evening with great music.",
]


@function
def classify(s, review):
    s += "Classify the sentiment of each review as positive, negative or neutral.\n\n"
    for text, label in EXAMPLES:
        s += f"Review: {text}\nSentiment: {label}\n\n"
    s += f"Review: {review}\nSentiment:"
    s += select("label", choices=LABELS)


def main(backend=None, reviews: list[str] | None = None, out=sys.stdout) -> list[str]:
    """Classify `reviews`; print and return their labels."""
    reviews = REVIEWS if reviews is None else reviews
    own = backend is None
    backend = backend or Runtime(model="default")
    try:
        states = classify.run_batch([{"review": r} for r in reviews], backend=backend, progress_bar=False)
        labels = []
        for review, st in zip(reviews, states):
            label = st["label"].strip()
            scores = ", ".join(f"{k.strip()}={v:.2f}" for k, v in st.meta("label").scores.items())
            print(f"{label:>8}  {review}   ({scores}; cached {st.meta('label').cached_tokens} tokens)", file=out)
            labels.append(label)
        return labels
    finally:
        if own:
            backend.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a radixserve server (default: an in-process engine)")
    args = parser.parse_args()
    main(Endpoint(args.url) if args.url else None)
