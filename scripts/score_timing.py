"""How long `tunix-job score` takes per output, by output length and kind of text: a Markdown table.

    python scripts/score_timing.py [--lengths 20000,200000,1000000] [--repeat 3]

Each kind of output is one that once made scoring slow, or could: plain prose, prose ending in an
answer line, many "Answer:" markers, a long digit run, many commas or numbers, nested parentheses,
an answer wrapped in many layers of quotes, bold markers, spaces and full stops. Each output is
scored against a number, a word, a comma list and an " or " answer, as `score` does; the figure is
the mean over those four answers, best of `--repeat` runs.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from job.cli import add_count_option  # noqa: E402
from job.score import score_output  # noqa: E402

EXPECTED = ("42", "Paris", "red, blue, yellow", "0.5 or 50%")
WORDS = "the answer is not yet clear so let us add 15 and 27 , then check ( again ) : total".split()


def _prose(n: int) -> str:
    rng = random.Random(n)
    words, size = [], 0
    while size < n:
        words.append(rng.choice(WORDS))
        size += len(words[-1]) + 1
    return " ".join(words)[:n]


def _repeated(unit: str, n: int) -> str:
    return (unit * (n // len(unit) + 1))[:n]


KINDS: dict[str, Callable[[int], str]] = {
    "prose": _prose,
    "prose, then an answer line": lambda n: _prose(n - 11) + "\nAnswer: 42",
    "\"Answer:\" on every line": lambda n: _repeated("Answer:\n", n),
    "one digit run": lambda n: "7" * n,
    "answer line of a comma list": lambda n: "Answer: " + _repeated("red, ", n - 8),
    "answer line of distinct numbers": lambda n: "Answer: " + ",".join(map(str, range(n // 7)))[:n - 8],
    "nested parentheses": lambda n: "Answer: " + "(" * ((n - 8) // 2) + ")" * ((n - 8) // 2),
    "answer in nested quotes and bold": lambda n: "Answer: " + "*\"" * ((n - 10) // 4) + "42" + "\"*" * ((n - 10) // 4),
    "answer in quotes, spaces and full stops": lambda n: "Answer: " + "*'\" " * (n // 8) + "42" + " \"'*." * (n // 8),
}


def seconds_to_score(output: str, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for expected in EXPECTED:
            score_output(output, expected)
        best = min(best, time.perf_counter() - started)
    return best / len(EXPECTED)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="20000,200000,1000000", help="output lengths in characters, comma-separated")
    add_count_option(p, "--repeat", default=3, help="runs per figure; the best is shown")
    args = p.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    print("| output | " + " | ".join(f"{n:,} chars" for n in lengths) + " |")
    print("|---|" + "---:|" * len(lengths))
    for kind, make in KINDS.items():
        cells = [f"{seconds_to_score(make(n), args.repeat) * 1000:,.1f} ms" for n in lengths]
        print(f"| {kind} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
