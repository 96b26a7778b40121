"""End-to-end helpers shared by the test modules that run the real job in subprocesses.

The small test configuration (SMALL) on the demo manifest (DEMO), ways to run it (run_job, and
Attempt, which follows the job's JSON log lines as they come), and what two runs must agree on bit for
bit (outcome, same_result).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from job import io

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "manifests" / "local_tiny.json"
SMALL = [
    "training.steps=8", "training.batch_size=4", "training.warmup_steps=2", "training.checkpoint_every_steps=2",
    "training.log_every_steps=2", "training.eval_every_steps=4", "dataset.limit=200", "dataset.holdout=4",
    "eval.limit=6", "eval.batch_size=6", "eval.max_new_tokens=24",
    "training.max_seq_len=144",  # two examples per row: the runs train packed batches
]


def job_command(manifest: str, *overrides: str) -> list[str]:
    args = [sys.executable, "-m", "job", "run", "--manifest", manifest]
    for override in [*SMALL, *overrides]:
        args += ["--set", override]
    return args


def run_job(manifest: str, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(job_command(manifest, *overrides), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def wait_for(condition, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def state_of(run_uri: str) -> dict:
    try:
        return io.read_json(io.join(run_uri, "status.json"))
    except Exception:  # not written yet, or being replaced
        return {}


def outcome(run_uri: str) -> dict:
    """What must not depend on how the run got there: losses, eval losses, generations, final weights' bytes."""
    lines = [json.loads(x) for x in io.read_text(io.join(run_uri, "metrics.jsonl")).splitlines()]
    generations = {phase: [json.loads(x)["meta"]["raw_output"]
                           for x in io.read_text(io.join(run_uri, f"eval_{phase}.jsonl")).splitlines()]
                   for phase in ("before", "after")}
    return {
        "losses": [(x["step"], x["loss"]) for x in lines if "loss" in x],
        "eval_losses": [(x["step"], x["eval_loss"]) for x in lines if "eval_loss" in x],
        "generations": generations,
        "final_params": final_params(run_uri),
    }


def final_params(run_uri: str) -> dict:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    path = io.join(run_uri, "final", "params")
    path = path if "://" in path else os.path.abspath(path)
    checkpointer = ocp.StandardCheckpointer()
    # Onto this process's one device, whatever the device layout the weights were written from.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(path).item_metadata.tree)
    restored = checkpointer.restore(path, target)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(restored)}


def same_result(a: dict, b: dict) -> None:
    assert a["losses"] == b["losses"]
    assert a["eval_losses"] == b["eval_losses"]
    assert a["generations"] == b["generations"]
    assert a["final_params"] and a["final_params"].keys() == b["final_params"].keys()
    for name, value in a["final_params"].items():
        assert value.dtype == b["final_params"][name].dtype
        assert value.tobytes() == b["final_params"][name].tobytes(), name


class Attempt:
    """One run of the job whose JSON log lines are followed as they come."""

    def __init__(self, output_uri: Path | None, manifest: str = str(DEMO), env: dict | None = None):
        overrides = [f"output.uri={output_uri}"] if output_uri else []
        self.proc = subprocess.Popen(job_command(manifest, *overrides, "run_id=base"), cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def logged(self, message: str, **fields) -> bool:
        for line in list(self.lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("message") == message and all(record.get(k) == v if not callable(v) else v(record.get(k))
                                                         for k, v in fields.items()):
                return True
        return False

    def wait(self, condition, what: str, timeout: float = 180, poll: float = 0.005) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.proc.poll() is not None:
                self.reader.join(5)
                raise AssertionError(f"the job ended (exit {self.proc.returncode}) before {what}:\n"
                                     + "".join(self.lines)[-3000:])
            time.sleep(poll)
        raise AssertionError(f"timed out waiting for {what}")

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=120)
        self.reader.join(10)
        return self.proc.returncode

    @property
    def stderr(self) -> str:
        return "".join(self.lines)
