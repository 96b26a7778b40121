"""Eval traces the backend accepts, import batches, _SUCCESS, and the import client against a stub backend."""

import copy
import json
import urllib.error
import urllib.request

import pytest
from backend_stub import BackendStub, write_import_batches
from backend_validation import validate_trace

from job.errors import BadInput, Retriable
from job.formats import EvalItem
from job.outputs import (
    eval_trace,
    import_batches,
    import_run,
    reasoning_steps,
)
from job.score import ItemResult, score_output

ITEM = EvalItem("eval-001", "What is 15 + 27?", "42", "arithmetic", "easy")


def result(output: str, finished: bool = True, item: EvalItem = ITEM) -> ItemResult:
    return ItemResult(item, output, finished, score_output(output, item.expected_answer))


# ----------------------------------------------------------------------------------- eval traces


def test_trace_from_trained_format():
    trace = eval_trace(result("Reasoning:\n1. 15 + 27 = 42\n2. Check: 42 - 27 = 15\nAnswer: 42<end_of_turn>"), "after", "run-1")
    assert validate_trace(trace) == []
    assert trace["trace_version"] == "tunix-rt-job-eval/1"
    assert trace["prompt"] == "What is 15 + 27?"
    assert trace["final_answer"] == "42"
    assert trace["steps"] == [
        {"i": 0, "type": "reasoning", "content": "15 + 27 = 42"},
        {"i": 1, "type": "reasoning", "content": "Check: 42 - 27 = 15"},
    ]
    assert trace["meta"] == {
        "source": "tunix-rt-job", "run_id": "run-1", "phase": "after", "eval_item_id": "eval-001",
        "category": "arithmetic", "difficulty": "easy", "expected_answer": "42", "extracted_answer": "42",
        "strict_correct": True, "flexible_correct": True, "has_answer_line": True, "finished": True,
        "raw_output": "Reasoning:\n1. 15 + 27 = 42\n2. Check: 42 - 27 = 15\nAnswer: 42<end_of_turn>",
    }


@pytest.mark.parametrize(
    "output, final_answer, steps",
    [
        ("", "(no answer)", ["(empty output)"]),
        ("   \n\n ", "(no answer)", ["(empty output)"]),
        ("I am not sure about this one", "(no answer)", ["I am not sure about this one"]),
        ("First add.\n\nThen it is 42", "42", ["First add.", "Then it is 42"]),
        ("Answer: 42", "42", ["Answer: 42"]),
        ("Add them.\nAnswer: 42\n<end_of_turn><start_of_turn>user\nmore", "42", ["Add them."]),
        ("Reasoning:\n1. multi\nline step\n2) second\n\nAnswer: 42", "42", ["multi\nline step", "second"]),
        ("Reasoning:\n\nAnswer: 42", "42", ["Reasoning:"]),
        ("<start_of_turn>model\nAnswer:", "(no answer)", ["<start_of_turn>model", "Answer:"]),
    ],
)
def test_odd_outputs_give_valid_traces(output, final_answer, steps):
    trace = eval_trace(result(output, finished=False), "before", "run-1")
    assert validate_trace(trace) == []
    assert trace["final_answer"] == final_answer
    assert [s["content"] for s in trace["steps"]] == steps
    assert [s["i"] for s in trace["steps"]] == list(range(len(steps)))


def test_huge_output_is_clipped_to_the_limits():
    output = "x" * 30_000 + "\n" + "\n".join(f"{k}. step {k}" for k in range(1, 1500)) + "\nAnswer: " + "y" * 60_000
    long_prompt_item = EvalItem("eval-9", "p" * 60_000, "42")
    trace = eval_trace(result(output, item=long_prompt_item), "after", "run-1")
    assert validate_trace(trace) == []
    assert len(trace["prompt"]) == 50_000 and len(trace["final_answer"]) == 50_000
    assert len(trace["steps"]) == 1000
    assert len(trace["steps"][0]["content"]) == 20_000
    assert trace["steps"][-1]["content"].endswith("step 1499")  # the overflow is kept in the last step
    assert len(trace["meta"]["raw_output"]) == 50_000


def test_phase_must_be_before_or_after():
    with pytest.raises(ValueError):
        eval_trace(result("Answer: 42"), "during", "run-1")


def test_reasoning_steps_ignore_text_after_the_answer():
    assert reasoning_steps("Reasoning:\n1. a\nAnswer: 1\nReasoning:\n1. b") == ["a"]


# ------------------------------------------------------------------------------------ validation

VALID = {
    "trace_version": "v1",
    "prompt": "q",
    "final_answer": "a",
    "steps": [{"i": 0, "type": "reasoning", "content": "c"}],
    "meta": None,
}


def mutated(path, value):
    trace = copy.deepcopy(VALID)
    target = trace
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return trace


DELETE = object()


@pytest.mark.parametrize(
    "path, value, problem",
    [
        (("trace_version",), "", "trace_version: String should have at least 1 character"),
        (("trace_version",), "v" * 65, "trace_version: String should have at most 64 characters"),
        (("prompt",), "", "prompt: String should have at least 1 character"),
        (("prompt",), "p" * 50_001, "prompt: String should have at most 50000 characters"),
        (("final_answer",), "", "final_answer: String should have at least 1 character"),
        (("final_answer",), "a" * 50_001, "final_answer: String should have at most 50000 characters"),
        (("final_answer",), None, "final_answer: Input should be a valid string"),
        (("final_answer",), DELETE, "final_answer: Field required"),
        (("steps",), [], "steps: List should have at least 1 item after validation, not 0"),
        (("steps",), [{"i": k, "type": "t", "content": "c"} for k in range(1001)],
         "steps: List should have at most 1000 items after validation, not 1001"),
        (("steps",), [{"i": 0, "type": "t", "content": "c"}] * 2, "steps: Value error, Step indices must be unique"),
        (("steps", 0, "i"), -1, "steps.0.i: Input should be greater than or equal to 0"),
        (("steps", 0, "i"), "zero", "steps.0.i: Input should be a valid integer"),
        (("steps", 0, "type"), "", "steps.0.type: String should have at least 1 character"),
        (("steps", 0, "type"), "t" * 65, "steps.0.type: String should have at most 64 characters"),
        (("steps", 0, "content"), "", "steps.0.content: String should have at least 1 character"),
        (("steps", 0, "content"), "c" * 20_001, "steps.0.content: String should have at most 20000 characters"),
        (("steps", 0, "content"), DELETE, "steps.0.content: Field required"),
        (("meta",), "not an object", "meta: Input should be a valid dictionary"),
    ],
)
def test_validate_trace_catches_each_violation(path, value, problem):
    assert validate_trace(mutated(path, value)) == [problem]


def test_validate_trace_accepts_the_edges():
    edge = {
        "trace_version": "v" * 64,
        "prompt": "p" * 50_000,
        "final_answer": "a" * 50_000,
        "steps": [{"i": k, "type": "t" * 64, "content": "c" * (20_000 if k == 0 else 1)} for k in range(1000)],
        "meta": {"anything": [1, 2]},
        "unknown_extra_field": "dropped by the backend",
    }
    assert validate_trace(edge) == []
    assert validate_trace({k: v for k, v in VALID.items() if k != "meta"}) == []
    assert validate_trace("not a trace") != []


# ------------------------------------------------------------------------------------- batches


def test_import_batches():
    traces = [{"n": k} for k in range(2500)]
    batches = import_batches(traces)
    assert [len(b) for b in batches] == [1000, 1000, 500]
    assert [t for b in batches for t in b] == traces
    assert import_batches([]) == []
    assert [len(b) for b in import_batches(traces[:5], max_per_batch=2)] == [2, 2, 1]
    with pytest.raises(ValueError):
        import_batches(traces, max_per_batch=1001)


# ---------------------------------------------------------------------------------- import client


def traces(n: int) -> list[dict]:
    return [eval_trace(result(f"Reasoning:\n1. step {k}\nAnswer: {k}"), "after", "run-1") for k in range(n)]


@pytest.fixture
def stub():
    with BackendStub() as server:
        yield server


def quick(run, stub, **kw):
    messages = []
    kw = {"timeout": 2, "retries": 3, "backoff": 0.01, "log": messages.append, **kw}
    return import_run(str(run), stub.url, **kw), messages


def recorded(run) -> dict:
    """import/posted.json's entry for each batch, by file name."""
    path = run / "import" / "posted.json"
    return json.loads(path.read_text())["batches"] if path.exists() else {}


def post(url: str, body: object) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/api/traces/batch", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_stub_enforces_the_contract(stub):
    assert post(stub.url, []) == (400, {"detail": "Batch must contain at least one trace"})
    assert post(stub.url, traces(1) * 1001) == (400, {"detail": "Batch size (1001) exceeds maximum (1000)"})
    bad = traces(3)
    bad[2]["final_answer"] = ""
    status, body = post(stub.url, bad)
    assert status == 422
    assert body["detail"][0]["type"] == "string_too_short"
    assert body["detail"][0]["loc"] == ["body", 2, "final_answer"]
    assert stub.traces == []
    status, body = post(stub.url, traces(2))
    assert status == 201 and body["created_count"] == 2
    assert [t["trace_version"] for t in body["traces"]] == ["tunix-rt-job-eval/1"] * 2
    assert len(stub.traces) == 2


def test_import_posts_every_batch_once(tmp_path, stub):
    run = tmp_path / "run"
    uris = write_import_batches(str(run), traces(2500))
    assert [u.rsplit("/", 1)[1] for u in uris] == ["traces-00001.json", "traces-00002.json", "traces-00003.json"]

    summary, _ = quick(run, stub)
    assert summary == {"posted": 3, "skipped": 0, "created_count": 2500, "unknown": 0, "unknown_batches": []}
    assert len(stub.traces) == 2500 and stub.requests == 3
    posted = recorded(run)
    assert sorted(posted) == ["traces-00001.json", "traces-00002.json", "traces-00003.json"]
    assert {e["state"] for e in posted.values()} == {"posted"}
    assert posted["traces-00003.json"]["created_count"] == 500
    assert posted["traces-00003.json"]["trace_ids"] == [t["id"] for t in stub.traces[2000:]]

    summary, _ = quick(run, stub)  # a rerun stores nothing twice
    assert summary == {"posted": 0, "skipped": 3, "created_count": 0, "unknown": 0, "unknown_batches": []}
    assert len(stub.traces) == 2500 and stub.requests == 3


def test_import_retries_503(tmp_path, stub):
    run = tmp_path / "run"
    write_import_batches(str(run), traces(3))
    stub.fail_next(2, 503)
    summary, messages = quick(run, stub)
    assert summary["posted"] == 1 and summary["created_count"] == 3
    assert stub.requests == 3 and len(stub.traces) == 3
    assert sum("retrying" in m for m in messages) == 2


def test_import_gives_up_as_retriable(tmp_path, stub):
    run = tmp_path / "run"
    write_import_batches(str(run), traces(3))
    stub.fail_next(3, 503)  # every attempt of the first import
    with pytest.raises(Retriable, match="traces-00001.json"):
        quick(run, stub, retries=2)
    assert stub.requests == 3
    assert recorded(run) == {}  # certainly not stored: the rerun sends it
    assert quick(run, stub)[0]["posted"] == 1
    assert len(stub.traces) == 3 and recorded(run)["traces-00001.json"]["state"] == "posted"


def test_import_never_resends_a_timed_out_batch_unasked(tmp_path, stub):
    run = tmp_path / "run"
    write_import_batches(str(run), traces(2))
    stub.delay_next(1, 1.0)  # stored after the client gave up
    summary, messages = quick(run, stub, timeout=0.3)
    assert summary["posted"] == 0 and summary["unknown_batches"] == ["traces-00001.json"]
    assert "--resend-unknown" in summary["what_to_do"] and "idempotency" in summary["what_to_do"]
    assert stub.requests == 1
    assert recorded(run)["traces-00001.json"]["state"] == "unknown"
    assert any("no answer came within 0.3 s" in m for m in messages)


def test_import_connection_refused_is_retriable(tmp_path):
    run = tmp_path / "run"
    write_import_batches(str(run), traces(1))
    with BackendStub() as gone:
        url = gone.url
    with pytest.raises(Retriable, match="Connection refused"):
        import_run(str(run), url, timeout=1, retries=1, backoff=0.01, log=lambda m: None)


def test_import_stops_on_422_with_the_detail(tmp_path, stub):
    run = tmp_path / "run"
    good = traces(5)
    write_import_batches(str(run), good, max_per_batch=2)  # 3 files: the last one will be bad
    bad_file = run / "import" / "traces-00003.json"
    bad = json.loads(bad_file.read_text())
    bad[0]["steps"] = []
    bad_file.write_text(json.dumps(bad))

    quick_run = lambda: quick(run, stub)  # noqa: E731
    with pytest.raises(BadInput) as err:
        quick_run()
    assert "422" in str(err.value) and "body.0.steps" in str(err.value) and "at least 1 item" in str(err.value)
    posted_file = run / "import" / "posted.json"
    before = posted_file.read_bytes()
    assert sorted(recorded(run)) == ["traces-00001.json", "traces-00002.json"]

    with pytest.raises(BadInput):
        quick_run()
    assert posted_file.read_bytes() == before  # the rejected batch is never recorded
    assert len(stub.traces) == 4 and stub.requests == 4  # the good batches were not posted again


def test_import_without_batches_is_bad_input(tmp_path, stub):
    with pytest.raises(BadInput, match="import"):
        quick(tmp_path / "nothing", stub)
