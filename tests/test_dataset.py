"""Tests for job.dataset: the validating scan and its books, rejects with line numbers, the data hash,
seeded shuffling over epochs, the batch stream, and streaming the data from gs://."""

from __future__ import annotations

import hashlib
import itertools
import json
import os

import numpy as np
import pytest

from job import io
from job.dataset import prepare, scan, shuffled, training_batches, training_examples
from job.formats import Reject
from job.manifest import Manifest, parse_manifest
from job.tokens import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MANIFEST = os.path.join(REPO, "manifests", "local_tiny.json")
DEMO_DATA = os.path.join(REPO, "datasets", "arith_train.jsonl")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def demo(*overrides: str, data: dict | None = None) -> Manifest:
    """The demo manifest (its relative URIs resolved as when loaded from its file), with overrides."""
    with open(DEMO_MANIFEST, encoding="utf-8") as f:
        raw = json.load(f)
    return parse_manifest(data or raw, base_uri=DEMO_MANIFEST, overrides=overrides)


def trace_line(n: int, **changes) -> str:
    record = {"id": f"r{n}", "prompts": f"Tom has {n} pens. He gets 1 more. How many now?",
              "trace_steps": [f"{n} + 1 = {n + 1}"], "final_answer": str(n + 1)}
    record.update(changes)
    return json.dumps(record, ensure_ascii=False)


def ids_of(examples) -> list[str]:
    return [e.id for e in examples]


# ---------------------------------------------------------------------------------------- scan


def test_scan_of_the_demo_balances_its_books(tok):
    m = demo("dataset.limit=60", "dataset.holdout=8")
    rejects: list[Reject] = []
    counts, held_out = scan(m, tok, rejects.append)

    assert counts.read == 60
    assert counts.read == counts.accepted + counts.rejected
    assert counts.accepted == counts.trained + counts.held_out
    assert counts.rejected == len(rejects) == 0
    assert counts.held_out == len(held_out) == 8
    assert len(counts.lengths) == counts.accepted
    assert max(counts.lengths) <= m.training.max_seq_len
    assert counts.loss_tokens == sum(p.tokens.loss_tokens for p in prepare(m, tok)) > 0

    # The held-out examples are the first accepted records of the file, in file order.
    with open(DEMO_DATA, encoding="utf-8") as f:
        first_ids = [json.loads(next(f))["id"] for _ in range(8)]
    assert ids_of(held_out) == first_ids

    report = counts.as_dict()
    assert report["read"] == 60 and report["trained"] == 52 and report["held_out"] == 8
    assert set(report["token_length"]) == {"p50", "p90", "p99", "p100"}
    assert report["token_length"]["p100"] == max(counts.lengths)


def test_broken_lines_are_each_rejected_with_their_line_and_reason(tmp_path, tok):
    lines = [
        trace_line(1).encode(),                                           # 1 ok
        b'{"id": "r2", "prompts": "unterminated',                         # 2 bad JSON
        b'[{"id": "r3"}]',                                                # 3 a JSON array
        trace_line(4).encode()[:-2] + b'\xff\xfe"}',                      # 4 invalid UTF-8
        b"",                                                              # 5 blank: not a record
        trace_line(6, final_answer="").encode(),                          # 6 empty final_answer
        trace_line(7, prompts="Say <end_of_turn> now").encode(),          # 7 reserved marker
        trace_line(8, prompts="word " * 200).encode(),                    # 8 too long
        trace_line(9).encode(),                                           # 9 ok
    ]
    path = tmp_path / "broken.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    m = demo(f"dataset.uri={path}", "dataset.holdout=0", "dataset.limit=null")
    rejects: list[Reject] = []
    counts, _ = scan(m, tok, rejects.append)

    by_line = {r.line: r for r in rejects}
    assert sorted(by_line) == [2, 3, 4, 6, 7, 8]
    assert "invalid JSON" in by_line[2].reason
    assert "JSON array" in by_line[3].reason
    assert "invalid UTF-8" in by_line[4].reason
    assert "'final_answer'" in by_line[6].reason and "empty" in by_line[6].reason
    assert "<end_of_turn>" in by_line[7].reason
    assert "training.max_seq_len=72" in by_line[8].reason
    assert all(r.uri == str(path) for r in rejects)
    assert by_line[2].raw == '{"id": "r2", "prompts": "unterminated'

    assert (counts.read, counts.accepted, counts.rejected) == (8, 2, 6)
    assert counts.trained == 2
    assert [f"{r.uri}:{r.line}" for r in counts.first_rejects] == [f"{path}:{n}" for n in (2, 3, 4, 6, 7)]
    assert sum(counts.reasons.values()) == 6
    in_order = demo(f"dataset.uri={path}", "dataset.holdout=0", "dataset.shuffle=false")
    assert ids_of(itertools.islice(training_examples(in_order, tok, 0), 4)) == ["r1", "r9", "r1", "r9"]


def test_sha256_is_the_hash_of_the_file_bytes(tmp_path, tok):
    data = ("\n".join(trace_line(n) for n in range(1, 6)) + "\n\n" + trace_line(6) + "\r\n").encode()
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + data)  # a BOM, a blank line and CRLF are hashed as they are
    counts, _ = scan(demo(f"dataset.uri={path}", "dataset.holdout=1"), tok)
    assert counts.read == 6 and counts.accepted == 6
    assert counts.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()

    path.write_bytes(b"\xef\xbb\xbf" + data.replace(b"Tom", b"Tim", 1))
    assert scan(demo(f"dataset.uri={path}", "dataset.holdout=1"), tok)[0].sha256 != counts.sha256


def test_reject_reasons_group_records_of_one_kind(tmp_path, tok):
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join([trace_line(1), trace_line(2, prompts="word " * 100),
                               trace_line(3, prompts="word " * 150)]) + "\n")
    counts, _ = scan(demo(f"dataset.uri={path}", "dataset.holdout=0"), tok)
    assert counts.rejected == 2
    assert len(counts.reasons) == 1 and list(counts.reasons.values()) == [2], dict(counts.reasons)


# -------------------------------------------------------------------------- order and epochs


def test_training_examples_are_seeded_skip_the_holdout_and_loop_over_epochs(tok):
    m = demo("dataset.limit=40", "dataset.holdout=6")
    _, held_out = scan(m, tok)
    in_order = ids_of(itertools.islice(training_examples(demo("dataset.limit=40", "dataset.holdout=6",
                                                              "dataset.shuffle=false"), tok, 0), 34))
    assert set(in_order).isdisjoint(ids_of(held_out))
    assert len(in_order) == len(set(in_order)) == 34

    first = ids_of(itertools.islice(training_examples(m, tok, 7), 34 * 3))
    again = ids_of(itertools.islice(training_examples(m, tok, 7), 34 * 3))
    other = ids_of(itertools.islice(training_examples(m, tok, 8), 34 * 3))
    assert first == again, "the same seed must give the same order"
    assert first != other, "another seed must give another order"

    epochs = [first[k:k + 34] for k in range(0, 34 * 3, 34)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(in_order), "each epoch is every trained example once, held-out ones skipped"
    assert epochs[0] != in_order, "shuffled"
    assert epochs[0] != epochs[1] != epochs[2], "each epoch has its own order"


def test_all_examples_held_out_ends_the_stream(tok):
    m = demo("dataset.limit=5", "dataset.holdout=5")
    assert list(training_examples(m, tok, 0)) == []


@pytest.mark.parametrize("buffer_size", [1, 7, 1000])
def test_shuffled_is_a_permutation(buffer_size):
    items = list(range(100))
    out = list(shuffled(iter(items), np.random.default_rng(3), buffer_size))
    assert sorted(out) == items
    if buffer_size > 1:
        assert out != items
    assert out == list(shuffled(iter(items), np.random.default_rng(3), buffer_size))


def test_training_batches_give_exactly_the_micro_steps_needed(tok):
    # 20 records, 4 held out: 16 trained = 4 batches of 4 per epoch; 3 x 2 = 6 micro-steps need 2 epochs.
    m = demo("dataset.limit=20", "dataset.holdout=4", "training.steps=3", "training.warmup_steps=0",
             "training.grad_accum_steps=2", "training.batch_size=4")
    out = list(training_batches(m, tok, seed=1))
    assert len(out) == 6
    for batch in out:
        assert batch.input_tokens.shape == (4, 72)
        assert (batch.segment_ids[:, 0] == 1).all(), "every row holds an example"
    assert out[0].input_tokens.tolist() == list(training_batches(m, tok, seed=1))[0].input_tokens.tolist()


def test_packed_training_batches_are_deterministic_and_fill_rows(tok):
    # Demo examples are 60-69 tokens: three fit in a row of 216.
    m = demo("dataset.limit=40", "dataset.holdout=4", "training.steps=4", "training.warmup_steps=0",
             "training.batch_size=4", "training.max_seq_len=216", "training.packing=true")
    out = list(training_batches(m, tok, seed=5))
    again = list(training_batches(m, tok, seed=5))
    assert len(out) == 4
    for a, b in zip(out, again):
        for field in ("input_tokens", "input_mask", "segment_ids", "positions"):
            assert np.array_equal(getattr(a, field), getattr(b, field))
    assert all(batch.input_tokens.shape == (4, 216) for batch in out)
    per_row = [int(row.max()) for batch in out for row in batch.segment_ids]
    assert min(per_row) >= 2 and max(per_row) == 3
    unpacked = list(training_batches(m.model_copy(update={"training": m.training.model_copy(update={"packing": False})}),
                                     tok, seed=5))
    assert all(int(row.max()) == 1 for batch in unpacked for row in batch.segment_ids)


# ------------------------------------------------------------------------------------ gs://


def test_the_dataset_streams_from_gcs(gcs_bucket, tok):
    data = ("\n".join(trace_line(n) for n in range(1, 9)) + "\n" + "{broken\n").encode()
    uri = io.join(gcs_bucket, "data", "train.jsonl")
    io.write_bytes(uri, data)
    m = demo(f"dataset.uri={uri}", "dataset.holdout=2", "dataset.limit=null")
    assert m.dataset.uri == uri

    rejects: list[Reject] = []
    counts, held_out = scan(m, tok, rejects.append)
    assert (counts.read, counts.accepted, counts.rejected, counts.held_out) == (9, 8, 1, 2)
    assert [(r.uri, r.line) for r in rejects] == [(uri, 9)]
    assert counts.sha256 == hashlib.sha256(data).hexdigest()
    assert ids_of(held_out) == ["r1", "r2"]
    assert sorted(ids_of(itertools.islice(training_examples(m, tok, 0), 6))) == [f"r{n}" for n in range(3, 9)]
