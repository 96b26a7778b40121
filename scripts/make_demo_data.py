"""Generate the bundled demo data: multi-step arithmetic word problems as reasoning traces.

Writes, deterministically from a seed:
  datasets/arith_train.jsonl   training set in the backend's `trace` export format
  evalsets/arith_eval.jsonl    held-out items in the backend's eval-set format

Every problem is a short story with a starting amount and two changes; the trace's steps are the
two operations, so a model must read the numbers off the prompt and do the arithmetic in order.
Eval prompts are disjoint from training prompts.

    python scripts/make_demo_data.py [--seed 1234] [--train 4000] [--eval 50]
"""

from __future__ import annotations

import argparse
import json
import random
import uuid
from pathlib import Path

NAMES = ["Mia", "Tom", "Ana", "Ben", "Lea", "Sam", "Ivy", "Max", "Zoe", "Leo", "Eva", "Kai"]
THINGS = ["apples", "stickers", "marbles", "coins", "books", "cards", "shells", "pencils"]
GAIN = ["finds", "buys", "gets", "wins"]
LOSS = ["gives away", "loses", "sells", "uses"]
QUESTION = "How many {thing} does {name} have now?"


def make_problem(rng: random.Random) -> tuple[str, list[str], int]:
    """Return (prompt, steps, answer) for one two-step story; every amount stays in 0..9.

    One-digit amounts keep the arithmetic learnable by the tiny model in a few hundred CPU steps;
    the model still has to read three numbers and two operations off the story and chain them.
    """
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    total = rng.randint(1, 9)
    sentences = [f"{name} has {total} {thing}."]
    steps = []
    for position in ("First", "Then"):
        if total == 9 or (total > 0 and rng.random() < 0.5):
            change = rng.randint(1, total)
            verb, new_total, op = rng.choice(LOSS), total - change, "-"
        else:
            change = rng.randint(1, 9 - total)
            verb, new_total, op = rng.choice(GAIN), total + change, "+"
        sentences.append(f"{position} {name} {verb} {change} {thing}.")
        steps.append(f"{total} {op} {change} = {new_total}")
        total = new_total
    sentences.append(QUESTION.format(thing=thing, name=name))
    return " ".join(sentences), steps, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--eval", type=int, default=50)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    ids = random.Random(args.seed + 1)
    seen: set[str] = set()

    def fresh_problem() -> tuple[str, list[str], int]:
        while True:
            prompt, steps, answer = make_problem(rng)
            if prompt not in seen:
                seen.add(prompt)
                return prompt, steps, answer

    eval_items = []
    for n in range(args.eval):
        prompt, _, answer = fresh_problem()
        eval_items.append({"id": f"arith-{n + 1:03d}", "prompt": prompt, "expected_answer": str(answer),
                           "category": "word_problem", "difficulty": "easy"})
    traces = []
    for n in range(args.train):
        prompt, steps, answer = fresh_problem()
        traces.append({
            "id": str(uuid.UUID(int=ids.getrandbits(128), version=4)),
            "prompts": prompt,
            "trace_steps": steps,
            "final_answer": str(answer),
            "metadata": {"created_at": f"2026-01-01T00:00:{n % 60:02d}Z", "trace_version": "1.0",
                         "source": "demo-arith", "index": n},
        })

    for path, rows in ((args.root / "datasets" / "arith_train.jsonl", traces),
                       (args.root / "evalsets" / "arith_eval.jsonl", eval_items)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        print(f"wrote {len(rows)} records to {path}")


if __name__ == "__main__":
    main()
