"""Tests for job.train.Prefetch: the background thread that reads batches ahead of the step."""

from __future__ import annotations

import threading
import time

import pytest

from job.train import Prefetch


def test_prefetch_keeps_the_order_and_ends_with_the_source():
    assert list(Prefetch(iter(range(100)), depth=3)) == list(range(100))
    assert list(Prefetch(iter([]))) == []


def test_prefetch_runs_ahead_of_the_consumer_by_at_most_depth():
    produced = []

    def source():
        for k in range(50):
            produced.append(k)
            yield k

    stream = Prefetch(source(), depth=4)
    time.sleep(0.3)
    # started before anyone asked: `depth` queued, one more waiting to be put
    assert 5 <= len(produced) <= 6
    assert next(stream) == 0
    time.sleep(0.3)
    # one taken, `depth` queued, one more waiting to be put
    assert 4 <= len(produced) <= 6
    stream.close()


def test_an_error_in_the_producer_is_raised_in_the_consumer_after_the_items_before_it():
    def source():
        yield 1
        yield 2
        raise ValueError("bad record")

    stream = Prefetch(source())
    assert next(stream) == 1 and next(stream) == 2
    with pytest.raises(ValueError, match="bad record"):
        next(stream)
    assert list(stream) == []  # ended: no further items, no hang


def test_closing_early_stops_the_producer_thread():
    before = threading.active_count()
    def endless():
        k = 0
        while True:
            yield k
            k += 1

    stream = Prefetch(endless(), depth=2)
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    stream.close()
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())
    assert threading.active_count() <= before


def test_leaving_the_with_block_stops_the_producer_even_if_nothing_was_taken():
    def endless():
        while True:
            yield 0

    with Prefetch(endless(), depth=2) as stream:
        time.sleep(0.1)
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())
    assert list(stream) == []
