"""The run directory: writes only on the writing process, _SUCCESS lists what was written, metrics in segments."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from job import io
from job.rundir import METRICS, METRICS_SEGMENTS, RUN_FORMAT, SUCCESS_FILE, Metrics, RunDir, RunRecord, Status


def record(**fields) -> RunRecord:
    base = dict(format=RUN_FORMAT, identity={}, run_id="r", seed=7, manifest_uri="m.json", manifest={}, versions={}, settings={}, image=None,
                devices=["cpu:0"], backend="cpu", compile_cache=None, processes=1, started_at="t")
    return RunRecord(**{**base, **fields})


def files(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names}


def test_success_lists_every_artifact_written_and_nothing_else(tmp_path):
    run = RunDir(str(tmp_path / "run"), writer=True)
    run.write_text("delta_report.md", "# report\n")
    run.write_json("eval/x.json", {"id": 1})
    run.write_json("cache.json", {"k": 1}, artifact=False)  # kept for the run itself
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "events").write_bytes(b"e")
    run.upload(str(tmp_path / "tb"), "tensorboard")
    run.write_with("plot.png", lambda path: open(path, "wb").write(b"png"))
    os.makedirs(tmp_path / "run" / "final" / "params" / "0")  # as Orbax leaves it, written by every process
    (tmp_path / "run" / "final" / "params" / "0" / "w").write_bytes(b"w")
    run.register_tree("final")
    run.write_success()
    success = io.read_json(run.path(SUCCESS_FILE))
    listed = {a["path"]: a for a in success["artifacts"]}
    assert list(listed) == ["delta_report.md", "eval/x.json", "tensorboard/events", "plot.png", "final/params/0/w"]
    assert listed["delta_report.md"] == {"path": "delta_report.md", "size": 9,
                                         "sha256": hashlib.sha256(b"# report\n").hexdigest()}
    for path, entry in listed.items():
        assert io.sha256(run.path(path)) == entry["sha256"]
    assert success["written_at"]


def test_a_process_that_is_not_the_writer_writes_nothing(tmp_path):
    run = RunDir(str(tmp_path / "run"), writer=False)
    run.write_text("a.txt", "a")
    run.write_json("b.json", {})
    run.write_record(record())
    Status(run, 8).set(state="training")
    metrics = Metrics(run)
    metrics.add({"step": 1, "loss": 1.0})
    metrics.write_whole()
    run.write_with("c.png", lambda path: (_ for _ in ()).throw(AssertionError("not produced off the writer")))
    run.write_success()
    run.clear()
    assert not (tmp_path / "run").exists()


def test_the_record_is_redacted_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_API_TOKEN", "s3cr3t-value-123")
    run = RunDir(str(tmp_path / "run"), writer=True)
    assert run.read_record() is None
    run.write_record(record(manifest_uri="gs://b/m.json?token=s3cr3t-value-123", seed=99))
    text = (tmp_path / "run" / "run_manifest.json").read_text()
    assert "s3cr3t" not in text
    recorded = RunDir(str(tmp_path / "run"), writer=False).read_record()
    assert recorded["seed"] == 99 and recorded["format"] == RUN_FORMAT


def test_every_text_file_written_is_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("DB_PASSWORD", "s3cr3t-value-123")
    run = RunDir(str(tmp_path / "run"), writer=True)
    run.write_text("a.md", "say s3cr3t-value-123")
    run.write_json("b.json", {"nested": ["https://u:pw@host/x", "s3cr3t-value-123"]})
    run.write_jsonl("c.jsonl", [{"x": "s3cr3t-value-123"}])
    for path in (tmp_path / "run").iterdir():
        assert b"s3cr3t" not in path.read_bytes() and b"pw@" not in path.read_bytes()


def read_segments(run: RunDir) -> list[dict]:
    folder = run.path(METRICS_SEGMENTS)
    return [json.loads(line) for uri in sorted(io.listdir(folder)) for line in io.read_text(uri).splitlines()]


def test_metrics_are_appended_in_segments_so_bytes_grow_linearly(tmp_path):
    run = RunDir(str(tmp_path / "run"), writer=True)
    metrics = Metrics(run)
    for step in range(1, 201):
        metrics.add({"step": step, "loss": 1.0 / step})
        if step % 10 == 0:
            metrics.flush()
    segments = sorted(io.listdir(run.path(METRICS_SEGMENTS)))
    assert len(segments) == 20
    # Each line is written once: the segments together are the size of the lines themselves.
    line_bytes = sum(len(json.dumps({"step": s, "loss": 1.0 / s}) + "\n") for s in range(1, 201))
    assert sum(io.size(uri) for uri in segments) == line_bytes
    assert [x["step"] for x in read_segments(run)] == list(range(1, 201))
    metrics.write_whole()
    assert [json.loads(x)["step"] for x in io.read_text(run.path(METRICS)).splitlines()] == list(range(1, 201))


def test_a_step_reported_again_replaces_its_line(tmp_path):
    run = RunDir(str(tmp_path / "run"), writer=True)
    metrics = Metrics(run)
    metrics.add({"step": 0, "eval_loss": 3.0})
    metrics.add({"step": 1, "loss": 2.0, "elapsed_s": 1})
    metrics.flush()
    metrics.add({"step": 1, "loss": 2.0, "elapsed_s": 2})  # Tunix's own report after the early one
    metrics.add({"step": 2, "loss": 1.5})
    metrics.flush()
    assert metrics.lines == [{"step": 0, "eval_loss": 3.0}, {"step": 1, "loss": 2.0, "elapsed_s": 2}, {"step": 2, "loss": 1.5}]
    # A reader of the segments takes the last line for a step and kind.
    latest = {(x["step"], "loss" in x): x for x in read_segments(run)}
    assert list(latest.values()) == metrics.lines


def test_resume_keeps_lines_up_to_the_restored_step_and_drops_the_killed_attempts_later_ones(tmp_path):
    run = RunDir(str(tmp_path / "run"), writer=True)
    first = Metrics(run)
    for step in range(1, 8):
        first.add({"step": step, "loss": float(step)})
        if step in (4, 6):
            first.add({"step": step, "eval_loss": float(step)})
        first.flush()  # killed after step 7; its checkpoint is at step 4
    resumed = Metrics(run)
    resumed.resume_from(4)
    assert [(x["step"], "loss" in x) for x in resumed.lines] == [(s, True) for s in range(1, 5)]
    assert read_segments(run) == resumed.lines  # the killed attempt's later lines are gone from storage
    resumed.add({"step": 5, "loss": 5.0})
    resumed.flush()
    assert [x["step"] for x in read_segments(run)] == [1, 2, 3, 4, 5]
    fresh = Metrics(run)
    fresh.resume_from(0)  # nothing restored: nothing kept
    assert fresh.lines == [] and not io.listdir(run.path(METRICS_SEGMENTS))


def test_clear_keeps_only_the_lease(tmp_path):
    run = RunDir(str(tmp_path / "run"), writer=True)
    run.write_text("a.txt", "a")
    run.write_text("sub/b.txt", "b")
    (tmp_path / "run" / "_LEASE").write_text("{}")
    run.clear()
    assert files(tmp_path / "run") == {"_LEASE"}


def test_a_damaged_metrics_segment_is_exit_2_naming_it(tmp_path):
    from job.errors import BadInput

    run = RunDir(str(tmp_path / "run"), writer=True)
    run.write_text(f"{METRICS_SEGMENTS}/segment-000000.jsonl", '{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    with pytest.raises(BadInput, match="segment-000000.jsonl:2: not a metrics line"):
        Metrics(run).resume_from(2)
