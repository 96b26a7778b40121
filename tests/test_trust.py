"""The run directory keeps faith, end to end: Ctrl-C is a preemption, a rerun is the same run or no run,
and no byte written anywhere holds a secret while every record keeps the real paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from e2e import DEMO, ROOT, Attempt, outcome, run_job, same_result

from job import io
from job.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_RETRIABLE

SECRET = "hunter2-db-password-77"
DATASET = ROOT / "datasets" / "arith_train.jsonl"


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*")
            if p.is_file() and p.name != "_LEASE" and "checkpoints" not in p.parts}


def refused(output: Path, *overrides: str) -> str:
    """A rerun that must be turned away (exit 2) without changing a byte of the run directory."""
    before = snapshot(output / "base")
    done = run_job(str(DEMO), f"output.uri={output}", "run_id=base", *overrides, timeout=180)
    assert done.returncode == EXIT_BAD_INPUT, done.stderr[-3000:]
    assert "holds another run" in done.stderr and "Traceback" not in done.stderr
    assert snapshot(output / "base") == before
    errors = [json.loads(line)["message"] for line in done.stderr.splitlines() if '"ERROR"' in line]
    return errors[-1]


def test_ctrl_c_stops_like_a_preemption_and_a_changed_rerun_is_refused(baseline, tmp_path):
    run_dir = tmp_path / "base"
    first = Attempt(tmp_path)
    first.wait(lambda: first.logged("train", step=lambda s: s is not None and s >= 2), "training step 2")
    assert first.stop(signal.SIGINT) == EXIT_RETRIABLE, first.stderr[-3000:]
    status = io.read_json(str(run_dir / "status.json"))
    assert status["state"] == "preempted" and "SIGINT" in status["error"], status
    assert "Traceback" not in first.stderr and "press Ctrl-C again to stop at once" in first.stderr

    # The same run directory, another run: refused field by field, nothing written.
    message = refused(tmp_path, "training.learning_rate=0.01")
    assert "training.learning_rate: 0.005 → 0.01" in message and "new run_id" in message
    changed = tmp_path / "changed.jsonl"
    changed.write_bytes(b"".join(DATASET.read_bytes().splitlines(keepends=True)[1:]))
    assert "dataset_sha256 changed" in refused(tmp_path, f"dataset.uri={changed}")

    # A second Ctrl-C stops at once (a kill's safety: the last complete checkpoint stands).
    second = Attempt(tmp_path)
    second.wait(lambda: second.logged("resuming from checkpoint"), "the resume")
    second.proc.send_signal(signal.SIGINT)
    second.wait(lambda: second.logged("SIGINT: stopping at the next safe point (during training: after the current "
                                      "step, with a checkpoint); press Ctrl-C again to stop at once"), "the first SIGINT")
    started = time.monotonic()
    assert second.stop(signal.SIGINT) == EXIT_RETRIABLE, second.stderr[-3000:]
    assert time.monotonic() - started < 30

    # Moved, identical data is the same run: it resumes and ends exactly as the uninterrupted run.
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(DATASET.read_bytes())
    done = run_job(str(DEMO), f"output.uri={tmp_path}", "run_id=base", f"dataset.uri={moved}")
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    same_result(outcome(str(baseline)), outcome(str(run_dir)))

    # A finished run: the same manifest finds it done; another one is refused, data included.
    again = run_job(str(DEMO), f"output.uri={tmp_path}", "run_id=base")
    assert again.returncode == EXIT_OK and "already succeeded" in again.stderr
    assert "training.steps: 8 → 9" in refused(tmp_path, "training.steps=9")
    assert "dataset_sha256 changed" in refused(tmp_path, f"dataset.uri={changed}")


def test_no_byte_written_holds_a_secret_and_every_record_keeps_its_paths(tmp_path):
    """Run from its output folder ($PWD is a path, not a secret) with credentials in the environment."""
    env = {**os.environ, "PWD": str(tmp_path), "OLDPWD": "/", "DB_PASSWORD": SECRET, "BACKEND_API_TOKEN": SECRET + "x"}
    command = [sys.executable, "-m", "job", "run", "--manifest", str(DEMO), "--set", f"output.uri={tmp_path}",
               "--set", "run_id=base", "--set", "training.steps=2", "--set", "training.batch_size=4",
               "--set", "training.warmup_steps=1", "--set", "dataset.limit=100", "--set", "dataset.holdout=4",
               "--set", "eval.limit=3", "--set", "eval.max_new_tokens=8", "--set", "training.max_seq_len=160",
               "--set", f"template.system_instruction=\"Never say {SECRET}.\""]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    written = snapshot(tmp_path / "base")
    assert len(written) > 10
    for name, data in written.items():
        assert SECRET.encode() not in data, name
    assert SECRET not in done.stderr + done.stdout
    record = json.loads(written["run_manifest.json"])
    assert record["manifest"]["output"]["uri"] == str(tmp_path)  # $PWD itself, kept
    assert record["manifest"]["dataset"]["uri"] == str(DATASET)
    assert "REDACTED" in record["manifest"]["template"]["system_instruction"]
    assert f'"run_dir": "{tmp_path / "base"}"' in done.stderr

    # Command output (stdout) goes through the same redaction: a signed URL's signature never shows.
    signed = f"{DATASET}?X-Goog-Signature=deadbeefsignature&token=ya29.tokenvalue"
    validate = subprocess.run([sys.executable, "-m", "job", "validate", "--manifest", str(DEMO), "--set",
                               f"dataset.uri=\"file://{signed}\""], cwd="/", env=env, capture_output=True, text=True,
                              timeout=120)
    for secret in ("deadbeefsignature", "ya29.tokenvalue", SECRET):
        assert secret not in validate.stdout + validate.stderr
    assert "X-Goog-Signature=REDACTED" in validate.stdout + validate.stderr
