"""Kill anywhere, resume identically.

One run directory is killed again and again, each attempt at a later point of the run — while the
dataset is scanned, during the eval before training, mid-training at a (seeded) random step, while
a checkpoint is being written, during the eval after training, while the outputs are written —
and after every kill the same manifest is simply started again. The attempt that finally
completes must give the uninterrupted baseline's losses, eval losses, generations and final
weights bit for bit. Once with SIGKILL (nothing can be saved) at every point, once with SIGTERM
(the job stops cleanly, exit 75) at a few.

Points are found from what the job emits anyway: its JSON log lines on stderr and the files it
writes; no test-only code path.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
from e2e import DEMO, Attempt, outcome, run_job, same_result

from job import io
from job.errors import EXIT_OK, EXIT_RETRIABLE
from job.rundir import EVAL_BEFORE_GENERATIONS

KILL_SEED = 20261125  # the random training step is drawn from this seed: a failure can be replayed
TMP_MARK = "orbax-checkpoint-tmp"  # Orbax writes a step to "<step>.orbax-checkpoint-tmp-*" and renames it when complete


# (point, how the test finds it, signals tried there): the README's kill table.
KILL_TABLE = [
    ("dataset scan", 'log line "scanning the dataset"', "SIGKILL, SIGTERM"),
    ("eval before training", 'log line "eval before starting"', "SIGKILL"),
    ("mid-training (seeded random step 2, 4 or 6 of 8)", 'log line "train" at that step', "SIGKILL"),
    ("inside a checkpoint write", 'log line "saving checkpoint", then Orbax\'s `*.orbax-checkpoint-tmp-*` folder', "SIGKILL, SIGTERM"),
    ("eval after training", 'log line "eval after starting"', "SIGKILL, SIGTERM"),
    ("writing the outputs", 'log line "writing outputs", then `final/` appearing', "SIGKILL, SIGTERM"),
]


def checkpoint_entries(run_dir: Path) -> list[str]:
    try:
        return os.listdir(run_dir / "checkpoints")
    except FileNotFoundError:
        return []


def writing_checkpoint(run_dir: Path) -> bool:
    return any(TMP_MARK in name for name in checkpoint_entries(run_dir))


def kill_points(sig: int) -> list[tuple[str, object]]:
    """(name, function(attempt, run_dir) that returns once the attempt is at that point)."""
    step = random.Random(KILL_SEED + sig).choice([2, 4, 6])

    def scanning(a, d):
        a.wait(lambda: a.logged("scanning the dataset"), "the dataset scan")

    def eval_before(a, d):
        a.wait(lambda: a.logged("eval before starting"), "the eval before training")

    def training(a, d):
        a.wait(lambda: a.logged("train", step=lambda s: s is not None and s >= step), f"training step {step}")

    def checkpoint_save(a, d):
        a.wait(lambda: a.logged("saving checkpoint"), "a checkpoint save")
        # Orbax writes the step under a temporary name and renames it when complete: be inside that.
        with_deadline = time.monotonic() + 5
        while not writing_checkpoint(d) and time.monotonic() < with_deadline and a.proc.poll() is None:
            time.sleep(0.002)

    def eval_after(a, d):
        a.wait(lambda: a.logged("eval after starting"), "the eval after training")

    def outputs(a, d):
        a.wait(lambda: a.logged("writing outputs"), "the output writing")
        a.wait(lambda: (d / "final").exists(), "final/ being written")

    points = [("dataset scan", scanning), ("eval before", eval_before), (f"training step {step}", training),
              ("checkpoint save", checkpoint_save), ("eval after", eval_after), ("outputs", outputs)]
    if sig == signal.SIGTERM:  # SIGTERM's own paths: a clean stop at a phase boundary or after a step
        points = [p for p in points if p[0] in ("dataset scan", "checkpoint save", "eval after", "outputs")]
    return points


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_at_every_point_and_rerun_ends_identically(baseline, tmp_path, sig):
    run_dir = tmp_path / "base"
    log, complete = [], None
    for name, reach in kill_points(sig):
        eval_before_kept = (run_dir / EVAL_BEFORE_GENERATIONS).exists()
        attempt = Attempt(tmp_path)
        reach(attempt, run_dir)
        # An attempt after one that finished the eval before training reads its generations back.
        assert attempt.logged("eval before reused") == eval_before_kept, (name, attempt.stderr[-3000:])
        if complete:  # the attempt after a kill inside a checkpoint write resumed from the last complete one
            assert attempt.logged("resuming from checkpoint", step=max(complete)), attempt.stderr[-3000:]
            complete = None
        if name == "eval before" and sig == signal.SIGKILL:
            # A second process on the same run directory (a retry overlapping a live pod) is turned away.
            second = run_job(str(DEMO), f"output.uri={tmp_path}", "run_id=base", timeout=120)
            assert second.returncode == EXIT_RETRIABLE, second.stderr[-3000:]
            assert "another process is running this run" in second.stderr and "Traceback" not in second.stderr
            assert attempt.proc.poll() is None and "base" in str(run_dir)
        caught_tmp = writing_checkpoint(run_dir)
        code = attempt.stop(sig)
        log.append((name, code, caught_tmp))
        assert not (run_dir / "_SUCCESS").exists() or code == EXIT_OK, f"{name}: _SUCCESS left by a killed run"
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL, (name, attempt.stderr[-3000:])
        elif code != EXIT_OK:  # SIGTERM while the last outputs are written may simply let the run finish
            assert code == EXIT_RETRIABLE, (name, attempt.stderr[-3000:])
            assert "Traceback" not in attempt.stderr, attempt.stderr[-3000:]
            status = io.read_json(str(run_dir / "status.json"))
            assert status["state"] == "preempted" and "SIGTERM" in status["error"], (name, status)
        if name == "checkpoint save" and sig == signal.SIGKILL:
            # The half-written step is there, under Orbax's temporary name, and is never restored.
            assert caught_tmp, f"the kill did not land inside a checkpoint write: {checkpoint_entries(run_dir)}"
            complete = [int(n) for n in checkpoint_entries(run_dir) if n.isdigit()]
            assert complete, checkpoint_entries(run_dir)
    done = run_job(str(DEMO), f"output.uri={tmp_path}", "run_id=base")
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    assert (run_dir / "_SUCCESS").exists()
    same_result(outcome(str(baseline)), outcome(str(run_dir)))
    assert not any(TMP_MARK in n for n in checkpoint_entries(run_dir))  # Orbax cleaned the partial step up
    print(log)
