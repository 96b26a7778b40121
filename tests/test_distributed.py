"""Several processes as one job: jax.distributed on 127.0.0.1, one CPU device per process.

The tiny job run as 2 processes must train on the same batches as one process with 2 devices (the
same global batch, the same mesh) and end with the same losses, eval results and final weights;
process 0 alone writes the run directory. A SIGTERM to one process stops all at the same step; a
process killed outright is recovered by restarting all of them, as Kubernetes would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from e2e import DEMO, ROOT, SMALL, outcome, same_result, state_of, wait_for

from job import distributed, io, settings
from job.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_RETRIABLE, BadInput

# Smaller than e2e's SMALL where the number of processes multiplies the cost.
FOUR = ["training.steps=2", "training.warmup_steps=1", "training.checkpoint_every_steps=2",
        "training.log_every_steps=1", "training.eval_every_steps=2", "dataset.limit=40", "eval.limit=1",
        "eval.batch_size=1", "eval.max_new_tokens=4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(index: int, count: int, port: int, devices: int = 1) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    if count > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count),
                   JAX_PROCESS_ID=str(index))
    return env


def start(count: int, output_uri, *overrides: str, devices: int = 1) -> list[subprocess.Popen]:
    """`count` processes of the same run (one process with `devices` devices when count is 1)."""
    args = [sys.executable, "-m", "job", "run", "--manifest", str(DEMO)]
    for override in [*SMALL, f"output.uri={output_uri}", "run_id=base", *overrides]:
        args += ["--set", override]
    port = free_port()
    return [subprocess.Popen(args, cwd=ROOT, env=env_for(i, count, port, devices), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(count)]


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str]]:
    done = []
    for proc in procs:
        _, stderr = proc.communicate(timeout=timeout)
        done.append((proc.returncode, stderr))
    return done


def run_all(count: int, output_uri, *overrides: str, devices: int = 1) -> list[str]:
    results = finish(start(count, output_uri, *overrides, devices=devices))
    for code, stderr in results:
        assert code == EXIT_OK, stderr[-4000:]
    return [stderr for _, stderr in results]


def close_to(a: dict, b: dict, rtol: float) -> None:
    """Same steps, losses within rtol (different device counts sum in a different order)."""
    for key in ("losses", "eval_losses"):
        assert [s for s, _ in a[key]] == [s for s, _ in b[key]]
        np.testing.assert_allclose([v for _, v in a[key]], [v for _, v in b[key]], rtol=rtol)


# -- start-up settings, mesh, batch rows (in-process) ----------------------------------------------

def test_one_process_unless_told_otherwise():
    assert not settings.from_env({}).cluster.is_multi
    assert not settings.from_env({"JAX_NUM_PROCESSES": "1"}).cluster.is_multi
    c = settings.from_env({"JAX_COORDINATOR_ADDRESS": "pod-0.svc:8476", "JAX_NUM_PROCESSES": "4",
                           "JAX_PROCESS_ID": "3"}).cluster
    assert (c.coordinator, c.count, c.index, c.is_multi, c.is_main) == ("pod-0.svc:8476", 4, 3, True, False)


@pytest.mark.parametrize("env, names", [
    ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_PROCESS_ID"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID"),
])
def test_bad_settings_name_the_variable(env, names):
    with pytest.raises(BadInput, match=names):
        settings.from_env(env)


def test_mesh_sizes():
    assert distributed.mesh_shape(-1, 1, 4) == (4, 1)
    assert distributed.mesh_shape(2, -1, 8) == (2, 4)
    assert distributed.mesh_shape(2, 2, 4) == (2, 2)
    for fsdp, tp in ((-1, -1), (3, 1), (2, 1)):
        with pytest.raises(BadInput, match="training.mesh"):
            distributed.mesh_shape(fsdp, tp, 4)


def test_one_device_needs_no_mesh_and_keeps_batches_as_they_are():
    from job.manifest import MeshSpec

    assert distributed.build_mesh(MeshSpec()) is None
    batches = [object(), object()]
    assert list(distributed.local_batches(batches, None)) == batches


def test_failure_in_one_process_ends_the_others_with_its_code():
    """Process 1 fails while process 0 waits for it at a barrier: process 0 exits with process 1's code."""
    script = (
        "import sys, time\n"
        "from job import distributed\n"
        "from job.errors import EXIT_BAD_INPUT\n"
        "c = distributed.start()\n"
        "if c.index == 1:\n"
        "    distributed.exit_all(EXIT_BAD_INPUT, 'BadInput: broken on purpose')\n"
        "distributed.barrier('never', timeout_s=120)\n"
        "sys.exit(0)\n"
    )
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env_for(i, 2, port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = finish(procs, timeout=90)
    assert [code for code, _ in results] == [EXIT_BAD_INPUT, EXIT_BAD_INPUT], results
    assert "process 1 failed: BadInput: broken on purpose" in results[0][1]


def test_batch_size_must_divide_by_the_data_parallel_size(tmp_path):
    (code, stderr), = finish(start(1, tmp_path, "training.batch_size=3", devices=2), timeout=300)
    assert code == EXIT_BAD_INPUT, stderr[-3000:]
    assert "training.batch_size=3 is not divisible by the data-parallel size 2" in stderr


# -- the job as several processes (subprocesses) -----------------------------------------------------

@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[str, list[str]]:
    out = tmp_path_factory.mktemp("two")
    return str(out / "base"), run_all(2, out)


@pytest.fixture(scope="module")
def one_process_two_devices(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("one")
    run_all(1, out, devices=2)
    return str(out / "base")


def test_two_processes_train_and_evaluate_as_one_process_with_two_devices(two_processes, one_process_two_devices):
    run_uri, _ = two_processes
    same_result(outcome(one_process_two_devices), outcome(run_uri))
    record = io.read_json(io.join(run_uri, "run_manifest.json"))
    assert record["processes"] == 2 and len(record["devices"]) == 2
    report_2 = io.read_json(io.join(run_uri, "delta_report.json"))
    report_1 = io.read_json(io.join(one_process_two_devices, "delta_report.json"))
    for key in ("before", "after", "fixed", "broken", "unchanged", "mcnemar_p"):
        assert report_2[key] == report_1[key], key


def test_process_zero_alone_writes_the_run_directory(two_processes):
    run_uri, stderrs = two_processes
    assert "run succeeded" in stderrs[0] and "run succeeded" not in stderrs[1]
    lines = [json.loads(x) for x in io.read_text(io.join(run_uri, "metrics.jsonl")).splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 9))  # each step once
    assert [x["step"] for x in lines if "eval_loss" in x] == [0, 4, 8]
    for phase in ("before", "after"):
        assert len(io.read_text(io.join(run_uri, f"eval_{phase}.jsonl")).splitlines()) == 6
    assert len(io.read_json(io.join(run_uri, "import", "traces-00001.json"))) == 12
    success = io.read_json(io.join(run_uri, "_SUCCESS"))
    for entry in success["artifacts"]:
        assert io.sha256(io.join(run_uri, entry["path"])) == entry["sha256"]
    assert len(os.listdir(os.path.join(run_uri, "tensorboard"))) == 1


def test_sigterm_to_one_process_then_a_killed_one_and_restarts_end_identically(two_processes, tmp_path):
    """A SIGTERM to process 1 stops both after the same step (exit 75); later process 1 dies outright and
    Kubernetes restarts the whole set; each restart resumes, and the end is the uninterrupted run's."""
    run_uri = str(tmp_path / "base")
    procs = start(2, tmp_path)
    wait_for(lambda: state_of(run_uri).get("step", 0) >= 2, timeout=400, what="step 2")
    procs[1].send_signal(signal.SIGTERM)
    results = finish(procs)
    assert [code for code, _ in results] == [EXIT_RETRIABLE, EXIT_RETRIABLE], [s[-2000:] for _, s in results]
    stopped = state_of(run_uri)
    assert stopped["state"] == "preempted" and 2 <= stopped["step"] < 8, stopped
    for _, stderr in results:  # both stopped after the same step
        assert f"stopped at step {stopped['step']} of 8" in stderr, stderr[-2000:]

    procs = start(2, tmp_path)
    wait_for(lambda: state_of(run_uri).get("step", 0) >= stopped["step"] + 2, timeout=400, what="two more steps")
    procs[1].kill()  # the VM is gone
    procs[0].kill()  # Kubernetes restarts the whole set
    finish(procs)
    assert not io.exists(io.join(run_uri, "_SUCCESS"))

    stderrs = run_all(2, tmp_path)
    for stderr in stderrs:
        assert "resuming from checkpoint" in stderr and '"eval before reused"' in stderr, stderr[-2000:]
    same_result(outcome(two_processes[0]), outcome(run_uri))


def test_four_processes_match_one_device_within_tolerance(tmp_path):
    """4 processes x 1 device against the plain single-device run: only the summation order differs."""
    run_all(4, tmp_path / "four", *FOUR)
    run_all(1, tmp_path / "one", *FOUR)
    four, one = outcome(str(tmp_path / "four" / "base")), outcome(str(tmp_path / "one" / "base"))
    close_to(four, one, rtol=1e-5)  # measured: 8e-8
    assert four["generations"]["before"] == one["generations"]["before"]  # same initial weights, exactly
