"""The import lands each batch exactly once, or says plainly which batches it cannot vouch for.

Every way an answer to `POST /api/traces/batch` can go (the backend's, or whatever stands in front
of it) is played by the backend stub (tests/backend_stub.py, `Answer`), with the answers of each
class drawn by hypothesis. IMPORT_TABLE is the README's import table (scripts/reliability_table.py
renders it); each row names the test that tries it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path

import pytest
from backend_stub import BATCH_PATH, Answer, BackendStub, write_import_batches
from hypothesis import given, settings
from hypothesis import strategies as st

from job.errors import BadInput, JobError, Retriable
from job.formats import EvalItem
from job.lease import Lease, LeaseHeld
from job.outputs import eval_trace, import_run
from job.score import ItemResult, score_output

REPO = Path(__file__).resolve().parent.parent

UNKNOWN = "unknown: recorded with the reason, exit 2 naming it and what to do; not sent again unless `--resend-unknown`"
IMPORT_TABLE = [  # (answer, inputs tried, outcome, test)
    ("201 whose body shows the batch stored", "the backend stub: `created_count` = batch size, one id per trace",
     "posted, with the trace ids; a rerun skips it", "test_outputs.py::test_import_posts_every_batch_once"),
    ("a redirect", "301, 302, 303, 307, 308, any other 3xx; Location relative, absolute, back to the endpoint "
     "or none; any body", "exit 2 \"the API answered a redirect to …; give the backend's base URL\"; never "
     "followed, nothing recorded", "test_a_redirect_is_refused_and_never_followed"),
    ("another 2xx", "200, 202, 204, any 2xx but 201, with any body (HTML, the backend's own 201 body), "
     "stored or not", UNKNOWN, "test_a_2xx_other_than_201_is_unknown"),
    ("201 whose body is not JSON", "any bytes that do not parse, an empty body, a body cut short", UNKNOWN,
     "test_a_201_whose_body_is_not_json_is_unknown"),
    ("201 with JSON that is not an object", "arrays, strings, numbers, null, nested", UNKNOWN,
     "test_a_201_whose_body_is_not_an_object_is_unknown"),
    ("201 with a wrong `created_count`", "any other integer, a float, a bool, null, text, missing", UNKNOWN,
     "test_a_201_with_a_wrong_created_count_is_unknown"),
    ("201 with missing or short trace ids", "`traces` missing, not a list, too few or many, ids missing, "
     "empty, not strings, repeated", UNKNOWN, "test_a_201_without_an_id_per_trace_is_unknown"),
    ("no answer once the request was sent", "connection closed or reset, bytes that are not HTTP; "
     "stored or not", UNKNOWN, "test_a_lost_connection_after_sending_is_unknown"),
    ("no answer in time", "the backend answers (and stores) after the client's timeout, or never", UNKNOWN,
     "test_a_timeout_is_unknown_and_sent_once"),
    ("5xx, 408 or 429 before anything was stored", "any 5xx, 408, 429, with any body, up to the retries",
     "sent again; posted exactly once", "test_an_answer_that_nothing_was_stored_is_sent_again"),
    ("5xx that lasts; connection refused", "503 every time; a closed port",
     "exit 75 once the retries are spent (6 attempts), nothing recorded; the rerun posts it once",
     "test_outputs.py::test_import_gives_up_as_retriable"),
    ("another 4xx", "400, 401, 403, 404, 413, 422, any other 4xx, with any body",
     "exit 2 with the backend's detail; nothing recorded", "test_another_4xx_is_bad_input"),
    ("any mix of the answers above, rerun until done", "3 batches, up to 6 imports without `--resend-unknown`",
     "no batch stored twice; each stored one posted with its ids, or unknown",
     "test_any_answers_store_no_batch_twice_and_name_what_is_unknown"),
    ("two imports of a run at once", "a second `tunix-job import` while the first posts",
     "the second exits 75 naming the holder; each batch stored once; a training attempt's lease does not block",
     "test_two_imports_at_once_post_each_batch_once"),
    ("the import killed while a batch is in flight", "SIGKILL once the backend has the request",
     "unknown on the rerun (the record said \"sending\"); not sent again",
     "test_an_import_killed_mid_post_leaves_the_batch_unknown"),
    ("a rerun while batches are unknown", "`tunix-job import` again, then with `--resend-unknown`",
     "posted batches skipped, unknown ones reported again, exit 2; with the flag they are sent again",
     "test_cli.py::test_import_reports_unknown_batches_until_told_to_resend_them"),
]

ITEMS_PER_BATCH = 2
QUICK = {"timeout": 2.0, "retries": 3, "backoff": 0.0}


def traces(n: int) -> list[dict]:
    """n traces, each told apart by its eval item id."""
    out = []
    for k in range(n):
        item = EvalItem(f"eval-{k:03d}", f"What is {k} + 1?", str(k + 1), "arithmetic", "easy")
        text = f"Reasoning:\n1. add\nAnswer: {k + 1}"
        out.append(eval_trace(ItemResult(item, text, True, score_output(text, item.expected_answer)), "after", "run-1"))
    return out


@contextlib.contextmanager
def scene(batches: int = 2):
    """A run with `batches` batches of two traces, and a fresh backend stub."""
    with tempfile.TemporaryDirectory() as tmp, BackendStub() as stub:
        run = Path(tmp) / "run"
        write_import_batches(str(run), traces(batches * ITEMS_PER_BATCH), ITEMS_PER_BATCH)
        yield run, stub


def attempt(run: Path, stub: BackendStub, **kw) -> dict | JobError:
    """One import: its summary, or the error it ended with."""
    try:
        return import_run(str(run), stub.url, log=lambda m: None, **{**QUICK, **kw})
    except JobError as e:
        return e


def recorded(run: Path) -> dict:
    path = run / "import" / "posted.json"
    return json.loads(path.read_text())["batches"] if path.exists() else {}


def batch_of(trace: dict) -> str:
    """The batch file a stored trace came from (batch k holds eval items 2k and 2k+1)."""
    return f"traces-{int(trace['meta']['eval_item_id'][5:]) // ITEMS_PER_BATCH + 1:05d}.json"


def stored_per_batch(stub: BackendStub) -> dict[str, int]:
    """How many times the stub stored each batch."""
    return {name: n // ITEMS_PER_BATCH for name, n in Counter(batch_of(t) for t in stub.traces).items()}


def stored_ids(stub: BackendStub, name: str) -> list[str]:
    return [t["id"] for t in stub.traces if batch_of(t) == name]


def good_201(n: int = ITEMS_PER_BATCH) -> dict:
    return {"created_count": n, "traces": [{"id": f"id-{k}", "created_at": "2026-01-01T00:00:00+00:00",
                                            "trace_version": "tunix-rt-job-eval/1"} for k in range(n)]}


def assert_first_batch_unknown(answer: Answer) -> None:
    """The first batch, answered so, is recorded unknown; the second is posted; a rerun sends nothing."""
    with scene() as (run, stub):
        stub.answer_next(answer)
        summary = attempt(run, stub)
        assert isinstance(summary, dict), summary
        assert summary["unknown_batches"] == ["traces-00001.json"] and summary["posted"] == 1
        assert "--resend-unknown" in summary["what_to_do"]
        entry = recorded(run)["traces-00001.json"]
        assert entry["state"] == "unknown" and entry["reason"]
        assert stored_per_batch(stub).get("traces-00001.json", 0) == (1 if answer.store else 0)

        again = attempt(run, stub)
        assert stub.requests == 2, "an unknown batch is not sent again unasked"
        assert again["unknown_batches"] == ["traces-00001.json"] and again["skipped"] == 1


# ------------------------------------------------------------------------------------- strategies

STORED = st.booleans()
BODY = st.binary(max_size=200)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=10)
HEADER_TEXT = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)


def _not_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except (ValueError, RecursionError):
        return True
    return False


def _has_an_id_per_trace(traces_: object) -> bool:
    return (isinstance(traces_, list) and len(traces_) == ITEMS_PER_BATCH
            and all(isinstance(t, dict) and isinstance(t.get("id"), str) and t["id"] for t in traces_)
            and len({t["id"] for t in traces_}) == ITEMS_PER_BATCH)


def answer_201(body: bytes, store: bool) -> Answer:
    return Answer(201, body, (("Content-Type", "application/json"),), store=store)


REDIRECT = st.builds(
    lambda status, location, body: Answer(status, body, (("Location", location),) if location is not None else ()),
    st.sampled_from([301, 302, 303, 307, 308]) | st.integers(300, 399),
    st.none() | st.sampled_from(["/login", BATCH_PATH, "https://sso.example.com/login?next=%2Fapi"]) | HEADER_TEXT,
    BODY)
OTHER_2XX = st.builds(
    lambda status, body, kind, store: Answer(status, body, (("Content-Type", kind),) if kind else (), store=store),
    st.sampled_from([200, 202, 204]) | st.integers(200, 299).filter(lambda s: s != 201),
    BODY | st.just(b"<html><body>Sign in</body></html>") | st.just(json.dumps(good_201()).encode()),
    st.sampled_from([None, "text/html", "application/json"]), STORED)
NOT_JSON_201 = st.builds(answer_201, BODY.filter(_not_json), STORED) | st.builds(
    lambda store: Answer(201, b'{"created_count": 2, "tra', (("Content-Length", "500"),), store=store), STORED)
NOT_OBJECT_201 = st.builds(answer_201, JSON.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
                           STORED)
WRONG_COUNT = st.integers().filter(lambda n: n != ITEMS_PER_BATCH) | st.floats() | st.booleans() | st.none() \
    | st.text(max_size=5) | st.just(str(ITEMS_PER_BATCH)) | st.just("missing")
WRONG_COUNT_201 = st.builds(
    lambda count, store: answer_201(json.dumps({k: v for k, v in {**good_201(), "created_count": count}.items()
                                                if v != "missing"}).encode(), store),
    WRONG_COUNT, STORED)
TRACE_ENTRY = st.fixed_dictionaries({}, optional={"id": st.text(max_size=3) | st.integers() | st.none(),
                                                  "created_at": st.text(max_size=5)}) | JSON
SHORT_IDS = (st.lists(TRACE_ENTRY, max_size=4) | JSON | st.just("missing")).filter(lambda t: not _has_an_id_per_trace(t))
SHORT_IDS_201 = st.builds(
    lambda traces_, store: answer_201(json.dumps({k: v for k, v in {**good_201(), "traces": traces_}.items()
                                                  if v != "missing"}).encode(), store),
    SHORT_IDS, STORED)
NO_ANSWER = st.builds(lambda body, reset, store: Answer(None, body, reset=reset, store=store),
                      st.just(b"") | BODY.filter(lambda b: not b.startswith(b"HTTP/")), st.booleans(), STORED)
NOT_STORED = st.builds(lambda status, body: Answer(status, body),
                       st.integers(500, 599) | st.sampled_from([408, 429]), BODY)
OTHER_4XX = st.builds(lambda status, body: Answer(status, body),
                      st.sampled_from([400, 401, 403, 404, 413, 422]) | st.integers(400, 499).filter(lambda s: s not in (408, 429)),
                      BODY | st.just(b'{"detail": "Not authenticated"}'))
EXAMPLES = settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------------------------------- classes


def refused(answer: Answer) -> tuple[str, str]:
    """The first batch, answered so, stops the import with exit 2, stores and records nothing, and no
    other request follows; (the message, the stub's URL)."""
    with scene() as (run, stub):
        stub.answer_next(answer)
        error = attempt(run, stub)
        assert isinstance(error, BadInput), error
        assert stub.requests == 1 and stub.elsewhere == [], "nothing is followed or sent after it"
        assert stub.traces == [] and recorded(run) == {}
        return str(error), stub.url


@EXAMPLES
@given(REDIRECT)
def test_a_redirect_is_refused_and_never_followed(answer):
    message, url = refused(answer)
    assert "the API answered a redirect to" in message and "give the backend's base URL" in message
    location = dict(answer.headers).get("Location")
    if location is not None:
        assert urllib.parse.urljoin(url + BATCH_PATH, location) in message


@EXAMPLES
@given(OTHER_2XX)
def test_a_2xx_other_than_201_is_unknown(answer):
    assert_first_batch_unknown(answer)


@EXAMPLES
@given(NOT_JSON_201)
def test_a_201_whose_body_is_not_json_is_unknown(answer):
    assert_first_batch_unknown(answer)


@EXAMPLES
@given(NOT_OBJECT_201)
def test_a_201_whose_body_is_not_an_object_is_unknown(answer):
    assert_first_batch_unknown(answer)


@EXAMPLES
@given(WRONG_COUNT_201)
def test_a_201_with_a_wrong_created_count_is_unknown(answer):
    assert_first_batch_unknown(answer)


@EXAMPLES
@given(SHORT_IDS_201)
def test_a_201_without_an_id_per_trace_is_unknown(answer):
    assert_first_batch_unknown(answer)


@EXAMPLES
@given(NO_ANSWER)
def test_a_lost_connection_after_sending_is_unknown(answer):
    assert_first_batch_unknown(answer)


@pytest.mark.parametrize("answer", [Answer(as_backend=True, delay_s=0.6), Answer(delay_s=0.6)],
                         ids=["stored-late", "never-answered"])
def test_a_timeout_is_unknown_and_sent_once(answer):
    with scene() as (run, stub):
        stub.answer_next(answer)
        summary = attempt(run, stub, timeout=0.2)
        assert summary["unknown_batches"] == ["traces-00001.json"] and summary["posted"] == 1
        assert "no answer came within 0.2 s" in recorded(run)["traces-00001.json"]["reason"]
        assert stub.requests == 2, "a timed-out batch is not sent again"
        time.sleep(0.6)  # the stub stores the late one now
        assert stored_per_batch(stub).get("traces-00001.json", 0) == (1 if answer.as_backend else 0)


@EXAMPLES
@given(st.lists(NOT_STORED, min_size=1, max_size=QUICK["retries"]))
def test_an_answer_that_nothing_was_stored_is_sent_again(answers):
    with scene() as (run, stub):
        stub.answer_next(*answers)
        summary = attempt(run, stub)
        assert summary["posted"] == 2 and summary["unknown"] == 0
        assert stored_per_batch(stub) == {"traces-00001.json": 1, "traces-00002.json": 1}
        assert stub.requests == len(answers) + 2
        assert recorded(run)["traces-00001.json"]["trace_ids"] == stored_ids(stub, "traces-00001.json")


@EXAMPLES
@given(OTHER_4XX)
def test_another_4xx_is_bad_input(answer):
    message, _ = refused(answer)
    assert f"rejected the batch with HTTP {answer.status}" in message


# A backend that answers a redirect, a 4xx or a 5xx has stored nothing: the import relies on it. For
# everything else, whether it stored the batch is drawn.
ANY_ANSWER = (st.just(Answer(as_backend=True)) | REDIRECT | NOT_STORED | OTHER_4XX | OTHER_2XX | NOT_JSON_201
              | NOT_OBJECT_201 | WRONG_COUNT_201 | SHORT_IDS_201 | NO_ANSWER)


@settings(max_examples=50, deadline=None)
@given(st.lists(ANY_ANSWER, max_size=12))
def test_any_answers_store_no_batch_twice_and_name_what_is_unknown(answers):
    with scene(batches=3) as (run, stub):
        stub.answer_next(*answers)
        for _ in range(6):
            outcome = attempt(run, stub, retries=2)
            if isinstance(outcome, dict):
                break
        stored, entries = stored_per_batch(stub), recorded(run)
        assert max(stored.values(), default=0) <= 1, "no batch is stored twice"
        for name, entry in entries.items():
            if entry["state"] == "posted":
                assert entry["trace_ids"] == stored_ids(stub, name)
        assert all(entries.get(name, {}).get("state") in ("posted", "unknown") for name in stored), \
            "every batch stored is posted or unknown"
        if isinstance(outcome, dict):
            assert sorted(outcome["unknown_batches"]) == sorted(n for n, e in entries.items() if e["state"] == "unknown")
            assert outcome["skipped"] + outcome["posted"] + outcome["unknown"] == 3


# ------------------------------------------------------------------------------ one at a time, kills


def test_two_imports_at_once_post_each_batch_once():
    with scene() as (run, stub):
        stub.delay_next(1, 1.0)  # the first import is mid-POST for a second
        first: list = []
        thread = threading.Thread(target=lambda: first.append(attempt(run, stub)))
        thread.start()
        while stub.requests == 0:
            time.sleep(0.01)
        second = attempt(run, stub)
        thread.join()
        assert isinstance(second, LeaseHeld) and "importing this run's batches" in str(second)
        assert "pid" in str(second) and "posted nothing" in str(second)
        assert first[0]["posted"] == 2
        assert stored_per_batch(stub) == {"traces-00001.json": 1, "traces-00002.json": 1}

        with Lease(str(run)):  # a training attempt holds the run's own lease: the import goes on
            assert attempt(run, stub)["skipped"] == 2


def test_an_import_killed_mid_post_leaves_the_batch_unknown():
    with scene() as (run, stub):
        stub.delay_next(1, 30.0)
        code = f"from job.outputs import import_run; import_run({str(run)!r}, {stub.url!r}, timeout=60)"
        child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while stub.requests == 0 and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert stub.requests == 1, "the child never sent the batch"
        finally:
            child.kill()
            child.wait()
        assert recorded(run)["traces-00001.json"]["state"] == "sending"

        summary = attempt(run, stub)
        assert summary["unknown_batches"] == ["traces-00001.json"] and summary["posted"] == 1
        assert "stopped (killed or interrupted)" in recorded(run)["traces-00001.json"]["reason"]
        assert stub.requests == 2, "the batch in flight is not sent again unasked"


def test_resend_unknown_sends_them_again_and_posts_them():
    with scene() as (run, stub):
        stub.answer_next(Answer(200, b"<html>", (("Content-Type", "text/html"),)))
        assert attempt(run, stub)["unknown"] == 1
        summary = attempt(run, stub, resend_unknown=True)
        assert summary == {"posted": 1, "skipped": 1, "created_count": 2, "unknown": 0, "unknown_batches": []}
        assert recorded(run)["traces-00001.json"]["trace_ids"] == stored_ids(stub, "traces-00001.json")


def test_a_failed_resend_leaves_the_batch_unknown():
    with scene(batches=1) as (run, stub):
        stub.answer_next(Answer(store=True, reset=True))
        assert attempt(run, stub)["unknown"] == 1
        stub.answer_next(*[Answer(503)] * (QUICK["retries"] + 1))
        error = attempt(run, stub, resend_unknown=True)
        assert isinstance(error, Retriable)
        assert recorded(run)["traces-00001.json"]["state"] == "unknown", "the first send may still have stored it"


def test_a_record_of_the_first_format_is_read_as_posted():
    with scene() as (run, stub):
        (run / "import" / "posted.json").write_text(json.dumps(
            {"posted": {"traces-00001.json": {"created_count": 2, "trace_ids": ["a", "b"], "posted_at": "then"}}}))
        summary = attempt(run, stub)
        assert summary["skipped"] == 1 and summary["posted"] == 1 and stub.requests == 1


def test_an_unreadable_record_is_bad_input():
    with scene() as (run, stub):
        (run / "import" / "posted.json").write_text('{"batches": {"traces-00001.json": {"state": "maybe"}}}')
        error = attempt(run, stub)
        assert isinstance(error, BadInput) and "posted.json" in str(error) and stub.requests == 0


def test_every_row_of_the_import_table_names_a_test():
    for _, _, _, test in IMPORT_TABLE:
        module, _, name = test.rpartition("::")
        source = (REPO / "tests" / (module or "test_import.py")).read_text()
        assert f"def {name}(" in source, test
