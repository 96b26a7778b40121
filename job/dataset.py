"""Dataset: stream records, render and tokenize them, count and keep every reject, order them by the seed.

One pass (`scan`) validates the whole dataset before any accelerator time is spent: it counts
records read / accepted / rejected / truncated, writes each reject with its reason, hashes what it
read and keeps the first `dataset.holdout` accepted examples aside for the eval loss. Training then
streams the file again, epoch after epoch, through a bounded shuffle buffer seeded by
(seed, epoch): memory stays flat whatever the file size, and the same seed gives the same batches,
which is what lets a resumed run skip exactly the batches it already trained on.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterator

import numpy as np

from job.formats import Example, Reject, read_examples
from job.manifest import Manifest
from job.template import Rendered, render_example
from job.tokens import Batch, TokenizedExample, Tokenizer, batches, tokenize

SHUFFLE_BUFFER = 10_000  # examples held while shuffling: bounds memory, mixes well beyond it
FIRST_REJECTS_SHOWN = 5


@dataclasses.dataclass(frozen=True)
class Prepared:
    """An accepted record: what was read, what the model sees, and its tokens."""

    example: Example
    rendered: Rendered
    tokens: TokenizedExample


@dataclasses.dataclass
class DataCounts:
    """The books for one pass over the dataset: read = accepted + rejected; accepted = trained + held out."""

    read: int = 0
    accepted: int = 0
    rejected: int = 0
    truncated: int = 0
    held_out: int = 0
    sha256: str = ""
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first_rejects: list[Reject] = dataclasses.field(default_factory=list)
    lengths: list[int] = dataclasses.field(default_factory=list)  # token lengths of accepted examples
    loss_tokens: int = 0

    @property
    def trained(self) -> int:
        return self.accepted - self.held_out

    @property
    def reject_fraction(self) -> float:
        return self.rejected / self.read if self.read else 0.0

    def as_dict(self) -> dict:
        lengths = np.asarray(self.lengths or [0])
        return {
            "read": self.read, "accepted": self.accepted, "rejected": self.rejected,
            "trained": self.trained, "held_out": self.held_out, "truncated": self.truncated,
            "sha256": self.sha256, "reject_reasons": dict(self.reasons.most_common()),
            "token_length": {f"p{p}": int(np.percentile(lengths, p)) for p in (50, 90, 99, 100)},
            "loss_tokens": self.loss_tokens,
        }


def unusable(counts: DataCounts, m: Manifest) -> list[str]:
    """Why a scanned dataset cannot be trained on (too many rejects, nothing left to train); [] when it can."""
    problems = []
    if counts.reject_fraction > m.dataset.max_reject_fraction:
        problems.append(f"{m.dataset.uri}: {counts.rejected} of {counts.read} records rejected "
                        f"({counts.reject_fraction:.1%} > dataset.max_reject_fraction={m.dataset.max_reject_fraction}); "
                        f"reasons: {dict(counts.reasons.most_common(5))}")
    if counts.trained < 1:
        problems.append(f"{m.dataset.uri}: no records left to train on ({counts.accepted} accepted, "
                        f"{counts.held_out} held out by dataset.holdout)")
    return problems


def reason_kind(reason: str) -> str:
    """A short key to group reasons by: the text before the first colon or parenthesis, numbers as N."""
    return re.sub(r"\d+", "N", reason.split(":")[0].split("(")[0]).strip()[:80]


def prepare(m: Manifest, tokenizer: Tokenizer, on_reject: Callable[[Reject], None] | None = None,
            digest=None, counts: DataCounts | None = None) -> Iterator[Prepared]:
    """Stream the dataset in file order as Prepared examples; every unusable record goes to on_reject."""
    counts = counts if counts is not None else DataCounts()

    def reject(record: Reject) -> None:
        counts.rejected += 1
        counts.reasons[reason_kind(record.reason)] += 1
        if len(counts.first_rejects) < FIRST_REJECTS_SHOWN:
            counts.first_rejects.append(record)
        if on_reject:
            on_reject(record)

    for record in read_examples(m.dataset.uri, m.dataset.format, m.dataset.limit, digest):
        counts.read += 1
        if isinstance(record, Reject):
            reject(record)
            continue
        raw = f"(record id {record.id})"
        try:
            rendered = render_example(record, m.template.recipe, m.template.system_instruction,
                                      m.template.step_instruction)
        except ValueError as err:
            reject(Reject(m.dataset.uri, record.line, f"cannot render: {err}", raw))
            continue
        tokens = tokenize(record.id, rendered, tokenizer, m.training.max_seq_len, m.training.length_policy)
        if isinstance(tokens, str):
            reject(Reject(m.dataset.uri, record.line, tokens, raw))
            continue
        counts.accepted += 1
        counts.truncated += tokens.truncated
        counts.lengths.append(len(tokens.ids))
        counts.loss_tokens += tokens.loss_tokens
        yield Prepared(record, rendered, tokens)


def scan(m: Manifest, tokenizer: Tokenizer, on_reject: Callable[[Reject], None] | None = None
         ) -> tuple[DataCounts, list[TokenizedExample]]:
    """One full validating pass: the counts (with the sha256 of what was read) and the held-out examples."""
    counts, digest, held_out = DataCounts(), hashlib.sha256(), []
    for prepared in prepare(m, tokenizer, on_reject, digest, counts):
        if len(held_out) < m.dataset.holdout:
            held_out.append(prepared.tokens)
    counts.held_out = len(held_out)
    counts.sha256 = digest.hexdigest()
    return counts, held_out


def training_examples(m: Manifest, tokenizer: Tokenizer, seed: int) -> Iterator[TokenizedExample]:
    """Training examples forever (epoch after epoch), the held-out ones skipped, shuffled by (seed, epoch)."""
    epoch = 0
    while True:
        stream = (p.tokens for i, p in enumerate(prepare(m, tokenizer)) if i >= m.dataset.holdout)
        if m.dataset.shuffle:
            stream = shuffled(stream, np.random.default_rng([seed, epoch]))
        produced = False
        for example in stream:
            produced = True
            yield example
        if not produced:
            return
        epoch += 1


def shuffled(items: Iterator, rng: np.random.Generator, buffer_size: int = SHUFFLE_BUFFER) -> Iterator:
    """A bounded-buffer shuffle: fill the buffer, then emit a random slot and refill it."""
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        slot = int(rng.integers(len(buffer)))
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def training_batches(m: Manifest, tokenizer: Tokenizer, seed: int) -> Iterator[Batch]:
    """Fixed-shape batches for the trainer: one per micro-step, as many as the run needs."""
    needed = m.training.steps * m.training.grad_accum_steps
    stream = batches(training_examples(m, tokenizer, seed), m.training.batch_size, m.training.max_seq_len,
                     m.training.packing)
    for _, batch in zip(range(needed), stream):
        yield batch


def eval_batches(m: Manifest, held_out: list[TokenizedExample]) -> list[Batch]:
    return list(batches(held_out, m.training.batch_size, m.training.max_seq_len, m.training.packing))
