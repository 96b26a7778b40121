"""The CPU image, run as users run it: podman, no network, the non-root user, manifest and outputs on a
mounted folder. Run by `make test-container` (needs root, podman and the image it builds), never by
`make test`.

The image is $TUNIX_JOB_TEST_IMAGE (default localhost/tunix-rt-job:cpu). Podman's configuration comes
from $CONTAINERS_CONF, as the Makefile sets it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import tomllib
import uuid
from pathlib import Path

import pytest

from job.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_RETRIABLE

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("TUNIX_JOB_TEST_IMAGE", "localhost/tunix-rt-job:cpu")
UID = 10001  # the image's user (docker/Dockerfile)
SMALL = [
    "training.batch_size=4", "training.warmup_steps=2", "training.checkpoint_every_steps=4",
    "training.log_every_steps=2", "training.eval_every_steps=null", "dataset.limit=200", "dataset.holdout=4",
    "eval.limit=6", "eval.batch_size=6", "eval.max_new_tokens=24",
]
ARTIFACTS = ["run_manifest.json", "status.json", "metrics.jsonl", "rejects.jsonl", "eval_before.jsonl",
             "eval_after.jsonl", "delta_report.json", "delta_report.md", "loss_curve.png",
             "import/traces-00001.json", "final/model.json", "final/tokenizer.model"]


def podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} -> {done.returncode}\n{done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="module")
def image() -> dict:
    assert shutil.which("podman"), "podman is needed: apt-get install podman buildah runc"
    found = podman("image", "inspect", IMAGE, check=False)
    assert found.returncode == 0, f"no image {IMAGE}: build it with `make test-container` (or `make image`)"
    return json.loads(found.stdout)[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory, image) -> Path:
    """A folder as a user would mount it: the manifest, its data beside it, the runs and JAX's cache.

    It belongs to the image's user, as a volume provisioned for the job would; the job writes nowhere else.
    """
    folder = tmp_path_factory.mktemp("data")
    for sub, name in (("datasets", "arith_train.jsonl"), ("evalsets", "arith_eval.jsonl")):
        (folder / sub).mkdir()
        shutil.copy(ROOT / sub / name, folder / sub / name)
    manifest = json.loads((ROOT / "manifests" / "local_tiny.json").read_text())
    manifest["dataset"]["uri"] = "datasets/arith_train.jsonl"  # relative to the manifest's folder
    manifest["eval"]["uri"] = "evalsets/arith_eval.jsonl"
    manifest["output"]["uri"] = "runs"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "bad.json").write_text(json.dumps({**manifest, "trainig": {}}))
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, UID, UID)
    return folder


def run_args(data: Path, name: str, run_id: str, steps: int, *extra: str, manifest: str = "manifest.json") -> list[str]:
    args = ["run", "--name", name, "--pull=never", "--network", "none", "-v", f"{data}:/data",
            "-e", f"RUN_MANIFEST=/data/{manifest}", "-e", "JAX_COMPILATION_CACHE_DIR=/data/jax-cache",
            *extra, IMAGE, "run"]
    for override in [*SMALL, f"training.steps={steps}", f"run_id={run_id}"]:
        args += ["--set", override]
    return args


def run_to_end(data: Path, run_id: str, steps: int, manifest: str = "manifest.json") -> subprocess.CompletedProcess:
    name = f"tunix-test-{uuid.uuid4().hex[:8]}"
    return podman(*run_args(data, name, run_id, steps, "--rm", manifest=manifest), check=False)


def status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):  # not written yet, or being replaced
        return {}


def loss_steps(run_dir: Path) -> list[int]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["step"] for x in lines if "loss" in x]


def start_and_terminate(data: Path, run_id: str, steps: int, ready) -> tuple[int, float, str]:
    """Start a detached container, send SIGTERM once ready(), return (exit code, seconds to exit, logs)."""
    name = f"tunix-test-{uuid.uuid4().hex[:8]}"
    podman(*run_args(data, name, run_id, steps, "--detach"))
    try:
        deadline = time.monotonic() + 300
        while not ready() and time.monotonic() < deadline:
            assert podman("container", "inspect", "--format", "{{.State.Running}}", name).stdout.strip() == "true", \
                podman("logs", name, check=False).stderr[-3000:]
            time.sleep(0.1)
        assert ready(), "timed out waiting to send SIGTERM"
        # The job itself is PID 1 (no shell in between), so the signal goes straight to it.
        pid1 = podman("exec", name, "cat", "/proc/1/cmdline").stdout.split("\0")
        assert pid1[1:3] == ["/opt/venv/bin/tunix-job", "run"], pid1
        sent = time.monotonic()
        podman("kill", "--signal", "TERM", name)
        code = int(podman("wait", name, timeout=120).stdout.strip())
        return code, time.monotonic() - sent, podman("logs", name, check=False).stderr
    finally:
        podman("rm", "--force", name, check=False)


def test_image_runs_the_job_as_pid_1_as_a_non_root_user(image):
    config = image["Config"]
    assert config["Entrypoint"] == ["tunix-job"] and config["Cmd"] == ["run"]
    assert config["User"] == f"{UID}:{UID}"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["JAX_COMPILATION_CACHE_DIR"] and env["TUNIX_JOB_CACHE"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert config["Labels"]["org.opencontainers.image.version"] == version


def test_tiny_job_runs_offline_and_leaves_a_complete_run_directory(data):
    done = run_to_end(data, "tiny", steps=8)
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    run_dir = data / "runs" / "tiny"
    for name in ARTIFACTS:
        assert (run_dir / name).is_file(), name
        assert (run_dir / name).stat().st_uid == UID  # written by the image's user, not root
    success = json.loads((run_dir / "_SUCCESS").read_text())
    listed = {a["path"]: a for a in success["artifacts"]}
    assert set(ARTIFACTS) <= set(listed)
    for path, entry in listed.items():
        assert (run_dir / path).stat().st_size == entry["size"], path
    state = status(run_dir)
    assert state["state"] == "succeeded" and state["step"] == 8
    assert loss_steps(run_dir) == list(range(1, 9))
    record = json.loads((run_dir / "run_manifest.json").read_text())
    assert record["backend"] == "cpu" and record["manifest_uri"] == "/data/manifest.json"
    assert any((data / "jax-cache").iterdir())  # JAX_COMPILATION_CACHE_DIR from the environment


def test_bad_manifest_exits_2(data):
    done = run_to_end(data, "bad", steps=8, manifest="bad.json")
    assert done.returncode == EXIT_BAD_INPUT, done.stderr[-3000:]
    assert "trainig" in done.stderr


def test_sigterm_during_training_checkpoints_exits_75_and_a_second_container_resumes(data):
    run_dir = data / "runs" / "preempted"
    steps = 24
    code, seconds, logs = start_and_terminate(
        data, "preempted", steps, lambda: status(run_dir).get("state") == "training" and status(run_dir).get("step", 0) >= 2)
    assert code == EXIT_RETRIABLE, logs[-3000:]
    assert seconds < 15, f"{seconds:.1f} s from SIGTERM to exit: more than spot preemption leaves"
    state = status(run_dir)
    assert state["state"] == "preempted" and 2 <= state["step"] < steps
    assert not (run_dir / "_SUCCESS").exists()
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] == state["step"], saved  # the step it stopped after

    done = run_to_end(data, "preempted", steps)
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    assert "resuming from checkpoint" in done.stderr
    assert status(run_dir)["state"] == "succeeded" and (run_dir / "_SUCCESS").is_file()
    record = json.loads((run_dir / "run_manifest.json").read_text())
    assert record["training"]["resumed_from_step"] == saved[-1]
    assert loss_steps(run_dir) == list(range(1, steps + 1))


def test_sigterm_while_the_job_starts_exits_75_at_once(data):
    # PID 1 only gets signals it has a handler for: the job sets one before its slow imports.
    started = time.monotonic()
    code, seconds, logs = start_and_terminate(data, "starting", 8, lambda: time.monotonic() - started > 1.5)
    assert code == EXIT_RETRIABLE, logs[-3000:]
    assert seconds < 15
    assert not (data / "runs" / "starting" / "_SUCCESS").exists()
