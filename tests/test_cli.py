"""Tests for job.cli, run in-process: each command's output and its exit code (0 ok, 2 bad input,
1 unexpected), which is the contract operators and Kubernetes rely on."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
from backend_stub import Answer, BackendStub, write_import_batches
from hypothesis import given, settings
from hypothesis import strategies as st

import job.manifest
from job import cli
from job.formats import EvalItem
from job.lease import Lease
from job.manifest import derive_run_id, load_manifest, parse_manifest
from job.outputs import IMPORT_DIR, POSTED_FILE, eval_trace
from job.score import ItemResult, score_output

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MANIFEST = os.path.join(REPO, "manifests", "local_tiny.json")
DEMO_DATA = os.path.join(REPO, "datasets", "arith_train.jsonl")
DEMO_EVAL = os.path.join(REPO, "evalsets", "arith_eval.jsonl")
SCHEMA_FILE = os.path.join(REPO, "manifests", "run_manifest.schema.json")


def run(capsys, *argv: str) -> tuple[int, str, list[dict]]:
    """Exit code, stdout, and the stderr log records (one JSON object per line off a terminal)."""
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, [json.loads(line) for line in err.splitlines() if line.strip()]


def errors(logs: list[dict]) -> str:
    return "\n".join(r["message"] for r in logs if r["severity"] == "ERROR")


def demo_data() -> dict:
    """The demo manifest with absolute URIs, so that a copy works from any folder."""
    with open(DEMO_MANIFEST, encoding="utf-8") as f:
        data = json.load(f)
    data["dataset"]["uri"] = DEMO_DATA
    data["eval"]["uri"] = DEMO_EVAL
    data["output"]["uri"] = os.path.join(REPO, "runs")
    return data


def write_manifest(tmp_path, data: dict, name: str = "manifest.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


# ------------------------------------------------------------------------------------ validate


def test_validate_the_demo(capsys):
    existed = os.path.exists(os.path.join(REPO, "runs", "local-tiny"))
    code, out, _ = run(capsys, "validate", "--manifest", DEMO_MANIFEST, "--limit", "100")
    assert code == 0
    report = json.loads(out)
    assert report["ok"] is True and report["problems"] == []
    assert report["records_read"] == 100
    assert report["accepted"] + report["rejected"] == 100
    assert report["accepted"] == report["held_out"] + report["would_train_on"]
    assert report["held_out"] == 32
    assert report["dataset"] == DEMO_DATA
    assert report["run_dir"] == os.path.join(REPO, "runs", "local-tiny")
    assert report["eval_items"] == 50
    assert report["max_seq_len"] == 72
    assert set(report["token_length"]) == {"p50", "p90", "p99", "p100"}
    assert 0 < report["token_length"]["p50"] <= report["token_length"]["p100"] <= 72
    assert os.path.exists(report["run_dir"]) == existed, "validate writes nothing"


@pytest.mark.parametrize("change, field", [
    (lambda d: d["training"].update(stpes=10), "training.stpes"),
    (lambda d: d["training"].update(steps=-5), "training.steps"),
    (lambda d: d.update(run_id="../x"), "run_id"),
], ids=["misspelt-field", "negative-steps", "run-id-with-path"])
def test_bad_manifest_exits_2_naming_the_field(capsys, tmp_path, change, field):
    data = demo_data()
    change(data)
    path = write_manifest(tmp_path, data)
    code, out, logs = run(capsys, "validate", "--manifest", path)
    assert code == 2
    assert out == ""
    message = errors(logs)
    assert path in message
    assert f"\n{field}: " in message
    assert logs[-1]["exit_code"] == 2 and logs[-1]["error"] == "BadInput"
    assert "Traceback" not in message


def test_misspelt_field_suggests_the_right_one(capsys, tmp_path):
    data = demo_data()
    data["training"]["stpes"] = data["training"].pop("steps")
    code, _, logs = run(capsys, "validate", "--manifest", write_manifest(tmp_path, data))
    assert code == 2
    assert "did you mean training.steps?" in errors(logs)


def test_validate_fails_when_too_many_records_are_rejected(capsys, tmp_path):
    with open(DEMO_DATA, encoding="utf-8") as f:
        good = [next(f).rstrip("\n") for _ in range(8)]
    data_path = tmp_path / "mostly_bad.jsonl"
    data_path.write_text("\n".join(good + ["{oops", "[1]"]) + "\n")  # 2 of 10 rejected: 20% > 10%
    data = demo_data()
    data["dataset"].update(uri=str(data_path), holdout=2)
    code, out, _ = run(capsys, "validate", "--manifest", write_manifest(tmp_path, data))
    assert code == 2
    report = json.loads(out)
    assert report["ok"] is False
    assert (report["records_read"], report["rejected"]) == (10, 2)
    assert len(report["problems"]) == 1
    assert str(data_path) in report["problems"][0] and "dataset.max_reject_fraction=0.1" in report["problems"][0]
    assert report["first_rejects"][0].startswith(f"{data_path}:9: invalid JSON")

    # Within the allowed fraction the same data passes.
    code, out, _ = run(capsys, "validate", "--manifest", write_manifest(tmp_path, data),
                       "--set", "dataset.max_reject_fraction=0.25")
    assert code == 0 and json.loads(out)["ok"] is True


def test_manifest_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("RUN_MANIFEST", DEMO_MANIFEST)
    code, out, _ = run(capsys, "validate", "--limit", "40")
    assert code == 0
    assert json.loads(out)["manifest"] == DEMO_MANIFEST

    monkeypatch.delenv("RUN_MANIFEST")
    code, out, logs = run(capsys, "validate")
    assert code == 2 and out == ""
    assert "--manifest" in errors(logs) and "RUN_MANIFEST" in errors(logs)


def test_set_reaches_the_manifest(capsys):
    # The demo warms up for 20 steps: 10 steps make that invalid, which only the override can cause.
    code, _, logs = run(capsys, "validate", "--manifest", DEMO_MANIFEST, "--set", "training.steps=10")
    assert code == 2
    assert "training.warmup_steps: more than training.steps (10)" in errors(logs)

    # With a derived run id the run directory follows the overridden content.
    overrides = ["run_id=null", "training.steps=10", "training.warmup_steps=5"]
    argv = [arg for o in overrides for arg in ("--set", o)]
    code, out, _ = run(capsys, "validate", "--manifest", DEMO_MANIFEST, "--all", *argv)
    assert code == 0
    with open(DEMO_MANIFEST, encoding="utf-8") as f:
        expected = parse_manifest(json.load(f), base_uri=DEMO_MANIFEST, overrides=overrides)
    assert expected.training.steps == 10
    assert json.loads(out)["run_dir"] == os.path.join(REPO, "runs", derive_run_id(expected))
    assert json.loads(out)["records_read"] == 4000


def _derived_id_manifest(tmp_path, **dataset) -> str:
    data = demo_data()
    data["run_id"] = None
    data["dataset"].update(dataset)
    return write_manifest(tmp_path, data)


def test_validate_reports_the_run_dir_the_run_will_use(capsys, tmp_path):
    path = _derived_id_manifest(tmp_path)
    code, out, _ = run(capsys, "validate", "--manifest", path, "--limit", "40")
    assert code == 0
    assert json.loads(out)["run_dir"] == os.path.join(REPO, "runs", derive_run_id(load_manifest(path)))


def test_validate_reads_no_more_than_the_manifests_limit(capsys, tmp_path):
    path = _derived_id_manifest(tmp_path, limit=5, holdout=1)
    code, out, _ = run(capsys, "validate", "--manifest", path)
    assert code == 0
    report = json.loads(out)
    assert report["records_read"] == 5 and report["would_train_on"] == 4


def _small_run(tmp_path, records: int = 30) -> tuple[str, dict]:
    """A manifest over the first `records` demo records, writing under tmp_path; its path and its data."""
    data_path = tmp_path / "data.jsonl"
    with open(DEMO_DATA, encoding="utf-8") as f:
        data_path.write_text("".join(next(f) for _ in range(records)))
    data = demo_data()
    data["dataset"].update(uri=str(data_path), holdout=2)
    data["output"]["uri"] = str(tmp_path / "runs")
    return write_manifest(tmp_path, data), data


def _record_this_run(path: str) -> None:
    """The run record an earlier attempt of this manifest would have left, data hashes included."""
    import hashlib

    from job.dataset import scan
    from job.formats import read_eval_items
    from job.identity import of_config
    from job.rundir import RUN_FORMAT, RUN_RECORD
    from job.tokens import load_tokenizer

    m = load_manifest(path)
    digest = hashlib.sha256()
    read_eval_items(m.eval.uri, m.eval.limit, digest)
    counts, _ = scan(m, load_tokenizer(m.model.tokenizer_uri))
    identity = {**of_config(m, m.seed), "dataset_sha256": counts.sha256, "eval_sha256": digest.hexdigest()}
    record = os.path.join(job.manifest.run_dir(m, derive_run_id(m)), RUN_RECORD)
    os.makedirs(os.path.dirname(record))
    with open(record, "w", encoding="utf-8") as f:
        json.dump({"format": RUN_FORMAT, "seed": m.seed, "identity": identity}, f)


@pytest.mark.parametrize("scanned", [["--all"], ["--limit", "100"], ["--limit", "10"]])
def test_validate_accepts_a_run_directory_holding_this_run(capsys, tmp_path, scanned):
    path, _ = _small_run(tmp_path)
    _record_this_run(path)
    code, out, logs = run(capsys, "validate", "--manifest", path, *scanned)
    assert code == 0, errors(logs)


def test_validate_names_what_differs_from_the_run_the_directory_holds(capsys, tmp_path):
    path, data = _small_run(tmp_path)
    _record_this_run(path)
    with open(data["dataset"]["uri"], "a", encoding="utf-8") as f, open(DEMO_DATA, encoding="utf-8") as demo:
        f.write(demo.readlines()[-1])  # one record more: other data, the same manifest
    code, out, logs = run(capsys, "validate", "--manifest", path, "--all", "--set", "training.steps=70")
    assert code == 2
    (problem,) = json.loads(out)["problems"]
    assert "holds another run: dataset_sha256 changed; training.steps: 350 → 70" in problem
    # Reading only part of the data, validate cannot tell the data changed, and does not say so.
    code, out, _ = run(capsys, "validate", "--manifest", path, "--limit", "10")
    assert code == 0


def test_validate_reports_every_problem_at_once_and_writes_nothing(capsys, tmp_path):
    path, data = _small_run(tmp_path)
    (tmp_path / "runs").write_text("a file where the runs go")
    before = sorted(os.listdir(tmp_path))
    # (A Gemma marker in a template instruction is a manifest error, reported alone: tests/test_hostile.py.)
    code, out, _ = run(capsys, "validate", "--manifest", path, "--set", 'training.mesh={"fsdp": 3, "tp": 1}',
                       "--set", "model.weights_uri=nowhere")
    assert code == 2 and sorted(os.listdir(tmp_path)) == before
    problems = "\n".join(json.loads(out)["problems"])
    for says in ("is a file, not a folder", "model.weights_uri"):
        assert says in problems, problems


# -------------------------------------------------------------------------------------- render


def test_render_prints_the_backend_rendering(capsys):
    code, out, logs = run(capsys, "render", "--manifest", DEMO_MANIFEST, "--limit", "3")
    assert code == 0
    assert not [r for r in logs if r["severity"] != "INFO"]
    lines = out.splitlines()
    assert len(lines) == 3

    with open(DEMO_DATA, encoding="utf-8") as f:
        traces = [json.loads(next(f)) for _ in range(3)]
    for line, trace in zip(lines, traces):
        row = json.loads(line)
        assert list(row) == ["id", "text", "completion"]
        model_turn = ("Reasoning:\n"
                      + "".join(f"{k}. {step}\n" for k, step in enumerate(trace["trace_steps"], 1))
                      + f"Answer: {trace['final_answer']}<end_of_turn>")
        expected = "<start_of_turn>user\n" + trace["prompts"] + "<end_of_turn>\n<start_of_turn>model\n" + model_turn
        assert row["id"] == trace["id"]
        assert row["text"].encode("utf-8") == expected.encode("utf-8")
        assert row["completion"] == model_turn


def test_render_sends_rejects_to_stderr(capsys, tmp_path):
    with open(DEMO_DATA, encoding="utf-8") as f:
        good = [next(f).rstrip("\n") for _ in range(2)]
    data_path = tmp_path / "data.jsonl"
    data_path.write_text("\n".join([good[0], '{"id": "x", "prompts": "Hi é 🙂", "trace_steps": [], "final_answer": ""}',
                                    good[1]]) + "\n")
    data = demo_data()
    data["dataset"]["uri"] = str(data_path)
    code, out, logs = run(capsys, "render", "--manifest", write_manifest(tmp_path, data))
    assert code == 0
    assert [json.loads(line)["id"] for line in out.splitlines()] == [json.loads(g)["id"] for g in good]
    warnings = [r for r in logs if r["severity"] == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0]["where"] == f"{data_path}:2"
    assert "final_answer" in warnings[0]["reason"]


# -------------------------------------------------------------------------------------- schema


def test_schema_matches_the_file_in_the_repo(capsys):
    code, out, _ = run(capsys, "schema")
    assert code == 0
    with open(SCHEMA_FILE, encoding="utf-8") as f:
        assert json.loads(out) == json.load(f)


def test_schema_is_the_manifest_schema(capsys):
    code, out, _ = run(capsys, "schema")
    assert code == 0
    schema = json.loads(out)
    assert schema == json.loads(json.dumps(job.manifest.json_schema()))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert "job" in schema["$defs"]["ModelSpec"]["properties"]["weights_format"]["enum"]
    assert set(schema["required"]) == {"dataset", "eval", "output"}


# --------------------------------------------------------------------------------------- score


def test_score_prints_one_row_per_eval_item(capsys, tmp_path):
    with open(DEMO_EVAL, encoding="utf-8") as f:
        items = [json.loads(line) for line in f if line.strip()]
    outputs = {}
    for k, item in enumerate(items):
        if k % 3 == 0:
            outputs[item["id"]] = f"Reasoning:\n1. done\nAnswer: {item['expected_answer']}"
        elif k % 3 == 1:
            outputs[item["id"]] = "Answer: 99999"
        else:
            outputs[item["id"]] = f"I think it is {item['expected_answer']}"
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("\n".join(json.dumps({"id": i, "output": o}) for i, o in reversed(outputs.items())) + "\n")

    code, out, _ = run(capsys, "score", "--eval", DEMO_EVAL, "--predictions", str(predictions))
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in rows] == [item["id"] for item in items]  # eval-set order
    for k, (row, item) in enumerate(zip(rows, items)):
        assert list(row) == ["id", "extracted", "strict", "flexible"]
        if k % 3 == 0:
            assert row == {"id": item["id"], "extracted": item["expected_answer"], "strict": True, "flexible": True}
        elif k % 3 == 1:
            assert row == {"id": item["id"], "extracted": "99999", "strict": False, "flexible": False}
        else:
            assert row["strict"] is False


def test_score_with_an_unknown_prediction_id_exits_2(capsys, tmp_path):
    with open(DEMO_EVAL, encoding="utf-8") as f:
        ids = [json.loads(line)["id"] for line in f if line.strip()]
    predictions = tmp_path / "predictions.jsonl"
    rows = [{"id": i, "output": "Answer: 1"} for i in ids] + [{"id": "not-an-item", "output": "Answer: 1"}]
    predictions.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, out, logs = run(capsys, "score", "--eval", DEMO_EVAL, "--predictions", str(predictions))
    assert code == 2 and out == ""
    assert "'not-an-item'" in errors(logs)


def test_score_with_a_broken_predictions_line_exits_2(capsys, tmp_path):
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text('{"id": "arith-001", "output": "Answer: 2"}\n{nope\n')
    code, _, logs = run(capsys, "score", "--eval", DEMO_EVAL, "--predictions", str(predictions))
    assert code == 2
    assert f"{predictions}:2" in errors(logs)


def test_score_matches_numeric_prediction_ids_to_eval_ids(capsys, tmp_path):
    evalset = tmp_path / "eval.jsonl"
    evalset.write_text('{"id": 7, "prompt": "1 + 1?", "expected_answer": 2}\n'
                       '{"id": "8", "prompt": "2 + 2?", "expected_answer": "4"}\n')
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text('{"id": "7", "output": "Answer: 2"}\n{"id": 8, "output": "Answer: 5"}\n')
    code, out, _ = run(capsys, "score", "--eval", str(evalset), "--predictions", str(predictions))
    assert code == 0
    assert [(r["id"], r["strict"]) for r in map(json.loads, out.splitlines())] == [("7", True), ("8", False)]


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('{"id": "arith-002", "output": "\\ud800"}', "output: a string holds a lone UTF-16 surrogate"),
        ('{"id": ' + "9" * 5000 + ', "output": "x"}', "id: a number of 5,000 characters"),
        ('{"id": "arith-002", "output": "x", "output": "y"}', "duplicate key 'output'"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"id": "arith-002", "output": 1e999}', "output: the number 1e999 is beyond the range of a float"),
        ('{"id": "arith-002", "output": 42}', "field 'output' must be a string"),
    ],
    ids=["surrogate", "huge-number", "duplicate-key", "deep-nesting", "huge-float", "output-not-text"],
)
def test_score_with_a_hostile_predictions_line_exits_2_naming_it(capsys, tmp_path, line, says):
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text('{"id": "arith-001", "output": "Answer: 2"}\n' + line + "\n")
    code, out, logs = run(capsys, "score", "--eval", DEMO_EVAL, "--predictions", str(predictions))
    assert code == 2 and out == ""
    assert f"{predictions}:2: " in errors(logs) and says in errors(logs)
    assert not any("traceback" in r for r in logs)


def test_a_hostile_set_value_exits_2_naming_the_field_from_the_command_line(tmp_path):
    import subprocess
    import sys

    manifest = write_manifest(tmp_path, demo_data())
    for value, says in [(b"run_id=a\xffb", "--set run_id: the text holds a lone UTF-16 surrogate"),  # not UTF-8
                        (b"training.steps=" + b"9" * 5000, "--set training.steps: a number of 5,000 characters"),
                        (b"eval.batch_size=1000000000", "eval.batch_size: too large")]:
        done = subprocess.run([sys.executable, "-m", "job", "validate", "--manifest", manifest, "--set", value],
                              capture_output=True, cwd=REPO, timeout=120)
        stderr = done.stderr.decode("utf-8", "replace")
        assert done.returncode == 2 and says in stderr and "Traceback" not in stderr, stderr[-2000:]


# -------------------------------------------------------------------------------------- import


def _run_dir_with_traces(tmp_path) -> tuple[str, list[dict]]:
    run_dir = str(tmp_path / "runs" / "run-1")
    items = [EvalItem(f"eval-{k:03d}", f"What is {k} + {k}?", str(2 * k), "arithmetic", "easy") for k in range(1, 6)]
    traces = []
    for k, item in enumerate(items):
        output = f"Reasoning:\n1. {item.id} adds\nAnswer: {2 * (k + 1)}" if k % 2 else "no idea"
        result = ItemResult(item, output, True, score_output(output, item.expected_answer))
        traces.append(eval_trace(result, "after", "run-1"))
    uris = write_import_batches(run_dir, traces)
    assert [os.path.basename(u) for u in uris] == ["traces-00001.json"]
    return run_dir, traces


def test_import_posts_the_batch_once(capsys, tmp_path):
    run_dir, traces = _run_dir_with_traces(tmp_path)
    with BackendStub() as stub:
        code, out, _ = run(capsys, "import", "--run", run_dir, "--api", stub.url)
        assert code == 0
        assert stub.requests == 1
        assert [t["prompt"] for t in stub.traces] == [t["prompt"] for t in traces]
        assert [t["meta"]["eval_item_id"] for t in stub.traces] == [t["meta"]["eval_item_id"] for t in traces]
        assert json.loads(out.splitlines()[-1]) == {"posted": 1, "skipped": 0, "created_count": 5,
                                                    "unknown": 0, "unknown_batches": []}
        assert os.path.exists(os.path.join(run_dir, IMPORT_DIR, POSTED_FILE))

        code, out, _ = run(capsys, "import", "--run", run_dir, "--api", stub.url + "/")
        assert code == 0
        assert stub.requests == 1, "a second import must post nothing"
        assert len(stub.traces) == 5
        assert json.loads(out.splitlines()[-1]) == {"posted": 0, "skipped": 1, "created_count": 0,
                                                    "unknown": 0, "unknown_batches": []}


def test_import_of_a_run_without_batches_exits_2(capsys, tmp_path):
    with BackendStub() as stub:
        code, _, logs = run(capsys, "import", "--run", str(tmp_path / "empty-run"), "--api", stub.url)
        assert code == 2
        assert stub.requests == 0
    assert "traces-NNNNN.json" in errors(logs)


def test_import_with_an_api_url_without_scheme_exits_2(capsys, tmp_path):
    # (--api localhost:8000 is worse: urllib reads "localhost" as the scheme, the URLError is retried
    # as a connection failure for 31 s, and the job exits 75, "retriable".)
    run_dir, _ = _run_dir_with_traces(tmp_path)
    code, _, logs = run(capsys, "import", "--run", run_dir, "--api", "backend.internal")
    assert code == 2
    assert "backend.internal" in errors(logs)


def test_import_stdout_is_only_the_summary(capsys, tmp_path):
    run_dir, _ = _run_dir_with_traces(tmp_path)
    with BackendStub() as stub:
        code, out, _ = run(capsys, "import", "--run", run_dir, "--api", stub.url)
    assert code == 0
    assert json.loads(out) == {"posted": 1, "skipped": 0, "created_count": 5, "unknown": 0, "unknown_batches": []}


def test_import_reports_unknown_batches_until_told_to_resend_them(capsys, tmp_path):
    run_dir, _ = _run_dir_with_traces(tmp_path)
    with BackendStub() as stub:
        stub.answer_next(Answer(200, b"<html>Sign in</html>", (("Content-Type", "text/html"),), store=True))
        code, out, logs = run(capsys, "import", "--run", run_dir, "--api", stub.url)
        assert code == 2
        summary = json.loads(out)
        assert summary["unknown"] == 1 and summary["unknown_batches"] == ["traces-00001.json"]
        assert "--resend-unknown" in summary["what_to_do"]
        assert "traces-00001.json" in errors(logs) and "--resend-unknown" in errors(logs)

        code, out, _ = run(capsys, "import", "--run", run_dir, "--api", stub.url)
        assert code == 2 and stub.requests == 1, "a rerun does not send an unknown batch again"
        assert json.loads(out)["unknown_batches"] == ["traces-00001.json"]

        code, out, _ = run(capsys, "import", "--run", run_dir, "--api", stub.url, "--resend-unknown")
        assert code == 0 and stub.requests == 2
        assert json.loads(out) == {"posted": 1, "skipped": 0, "created_count": 5, "unknown": 0, "unknown_batches": []}
        assert len(stub.traces) == 10  # the user's choice: the backend had stored it already


def test_import_answered_a_redirect_exits_2(capsys, tmp_path):
    run_dir, _ = _run_dir_with_traces(tmp_path)
    with BackendStub() as stub:
        stub.answer_next(Answer(302, b"", (("Location", "/login?next=/api/traces/batch"),)))
        code, out, logs = run(capsys, "import", "--run", run_dir, "--api", stub.url)
        assert code == 2 and out == ""
        assert f"the API answered a redirect to {stub.url}/login?next=/api/traces/batch" in errors(logs)
        assert stub.requests == 1 and stub.elsewhere == [] and stub.traces == []


def test_a_second_import_of_a_run_exits_75(capsys, tmp_path):
    run_dir, _ = _run_dir_with_traces(tmp_path)
    with BackendStub() as stub, Lease(os.path.join(run_dir, IMPORT_DIR)):
        code, _, logs = run(capsys, "import", "--run", run_dir, "--api", stub.url)
        assert code == 75 and stub.requests == 0
    assert "another process is importing this run's batches" in errors(logs)


# ------------------------------------------------------------------------------- count options


def _count_options() -> list[tuple[str, str]]:
    """(command, option) for every option of every command that takes a count."""
    commands = cli.parser()._subparsers._group_actions[0].choices
    return [(name, action.option_strings[0]) for name, command in commands.items()
            for action in command._actions if isinstance(action, cli.CountOption)]


COUNT_OPTIONS = _count_options()
NOT_COUNTS = st.one_of(
    st.integers(max_value=0).map(str), st.integers(min_value=cli.MAX_COUNT + 1).map(str),
    st.sampled_from(["", " ", "abc", "1.5", "1e3", "0x10", "ten", "--", "٠", "-0"]),
    st.text(max_size=12).filter(lambda t: not t.strip().lstrip("+").isdigit()),
)


def _exit_and_stderr(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_every_count_option_takes_a_count():
    assert {("validate", "--limit"), ("render", "--limit")} <= set(COUNT_OPTIONS)
    commands = cli.parser()._subparsers._group_actions[0].choices
    # Whole numbers are counts here: each goes through the one parser that bounds them.
    assert not [(name, a.dest) for name, c in commands.items() for a in c._actions
                if a.type is int or (a.type is cli.count) != isinstance(a, cli.CountOption)]


@pytest.mark.parametrize("command, option", COUNT_OPTIONS)
@given(value=NOT_COUNTS)
@settings(max_examples=60, deadline=None)
def test_a_count_option_refuses_what_is_not_a_count_naming_it(command, option, value):
    # `--limit 0` once printed everything (render) or blamed the data (validate).
    code, out, err = _exit_and_stderr(command, "--manifest", DEMO_MANIFEST, f"{option}={value}")
    assert code == 2 and out == ""
    assert f"argument {option}: must be a whole number from 1 to" in err and "Traceback" not in err


@pytest.mark.parametrize("command, option", COUNT_OPTIONS)
def test_a_count_option_takes_its_bounds(command, option):
    assert cli.count("1") == 1 and cli.count(str(cli.MAX_COUNT)) == cli.MAX_COUNT
    args = cli.parser().parse_args([command, option, "1"])
    assert getattr(args, option.lstrip("-").replace("-", "_")) == 1


# ------------------------------------------------------------------------------ unexpected errors


def test_an_unexpected_error_exits_1_with_its_traceback_logged(capsys, monkeypatch):
    def broken():
        raise RuntimeError("schema generator broke")

    monkeypatch.setattr(job.manifest, "json_schema", broken)
    code, out, logs = run(capsys, "schema")
    assert code == 1 and out == ""
    assert "unexpected error: RuntimeError: schema generator broke" in errors(logs)
    assert "Traceback" in logs[-1]["traceback"]


def test_the_job_starts_without_tunix_rl_stack():
    # tunix's package __init__ imports its RL and distillation trainers (and pandas): seconds of every start.
    import subprocess
    import sys

    code = "import sys, job.cli, job.run; print(sorted(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "'tunix.sft.peft_trainer'" in loaded and "'tunix.generate.sampler'" in loaded
    assert "'pandas'" not in loaded and "'tunix.rl" not in loaded and "'tunix.distillation" not in loaded
