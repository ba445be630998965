"""A workflow: fan-out -> fan-in -> chain, with the values passed by reference (docs/workflows.md).

    python examples/workflow.py                  # on a private local cluster
    python examples/workflow.py tcp://host:5555  # or on a running dispatcher

Counts the words of a few texts in parallel (fan-out), merges the counts in one job that waits for all
of them (fan-in), then picks the most common words and formats them (a chain). The client submits all
of it at once, in one batch, and waits only for the last job: every intermediate result goes from the
dispatcher to the worker that needs it, never through this process. Then one text fails on purpose:
the jobs that need it end with DependencyFailed, which names the job that failed.
"""

from __future__ import annotations

import sys
from collections import Counter

from conveyor import Client, DependencyFailed

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "the dog barks and the fox runs",
    "a lazy afternoon for the dog",
    "quick quick said the fox",
]


def count_words(text: str) -> dict[str, int]:
    if not text:
        raise ValueError("an empty text")
    return dict(Counter(text.split()))


def merge(counts: list[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    return dict(total)


def most_common(counts: dict[str, int], n: int) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def report(top: list[tuple[str, int]]) -> str:
    return ", ".join(f"{word}={n}" for word, n in top)


def main(address: str | None) -> None:
    with Client(address, local_mode="threads", local_concurrency=4) as client:
        with client.batch():  # one message, accepted all or none
            counts = [client.submit(count_words, text) for text in TEXTS]  # fan-out
            merged = client.submit(merge, counts)  # fan-in: a list of futures becomes a list of results
            summary = merged.then(most_common, 3).then(report)  # chain: fn(previous result, *args)
        print(f"top words: {summary.result(timeout=60)}")

        broken = [client.submit(count_words, text) for text in ["some words", ""]]
        final = client.submit(merge, broken).then(report)
        try:
            final.result(timeout=60)
        except DependencyFailed as exc:
            bad = broken[1].job_id
            print(f"failed as expected: root is the empty text's job: {exc.root == bad}; cause: {exc.__cause__!r}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
