"""The environment variables the job reads: parsed and checked once at start-up; a bad value is exit 2 naming it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from job import cli, io, settings
from job.errors import EXIT_BAD_INPUT, EXIT_OK, BadInput, Retriable
from job.settings import Cluster, Settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MANIFEST = os.path.join(REPO, "manifests", "local_tiny.json")
HUGE = "9" * 5000  # more digits than Python turns into an int

GOOD = {
    "RUN_MANIFEST": "gs://b/run.json",
    "TUNIX_JOB_IO_RETRIES": "7",
    "TUNIX_JOB_IO_BACKOFF_S": "0.5",
    "TUNIX_JOB_IO_TIMEOUT_S": "30",
    "TUNIX_JOB_LEASE_TTL_S": "12.5",
    "STORAGE_EMULATOR_HOST": "http://127.0.0.1:4443",
    "GOOGLE_CLOUD_PROJECT": "proj",
    "JAX_COORDINATOR_ADDRESS": "pod-0.svc:8476",
    "JAX_NUM_PROCESSES": "4",
    "JAX_PROCESS_ID": "3",
    "TUNIX_JOB_CACHE": "/var/cache/tunix-job",
    "JAX_COMPILATION_CACHE_DIR": "gs://b/jax-cache",
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1.5",
    "TUNIX_JOB_IMAGE": "registry/job:1",
}


def test_the_defaults_are_the_jobs_defaults():
    s = settings.from_env({})
    assert s == Settings()
    assert (s.io_retries, s.io_backoff_s, s.io_timeout_s, s.lease_ttl_s) == (4, 2.0, None, 60.0)
    assert s.cache_dir == os.path.join(os.path.expanduser("~"), ".cache", "tunix-rt-job")
    assert s.cluster == Cluster(None, 1, 0) and not s.cluster.is_multi and s.cluster.is_main
    assert s.manifest is s.storage_emulator_host is s.google_cloud_project is None
    assert s.compile_cache_dir is s.compile_cache_min_s is s.image is None


def test_blank_is_unset():
    assert settings.from_env({name: "  " for name in GOOD}) == Settings()


def test_every_variable_from_a_good_value():
    s = settings.from_env(GOOD)
    assert s == Settings(
        manifest="gs://b/run.json", io_retries=7, io_backoff_s=0.5, io_timeout_s=30.0, lease_ttl_s=12.5,
        storage_emulator_host="http://127.0.0.1:4443", google_cloud_project="proj",
        cluster=Cluster("pod-0.svc:8476", 4, 3), cache_dir="/var/cache/tunix-job",
        compile_cache_dir="gs://b/jax-cache", compile_cache_min_s=1.5, image="registry/job:1")
    # Every variable is in the record, by name, with its parsed value.
    record = s.as_record()
    assert set(record) == set(GOOD)
    assert record["TUNIX_JOB_IO_RETRIES"] == 7 and record["JAX_PROCESS_ID"] == 3
    assert json.loads(json.dumps(record)) == record
    # Zero is a valid retry count, backoff and minimum compile time.
    zeros = settings.from_env({"TUNIX_JOB_IO_RETRIES": "0", "TUNIX_JOB_IO_BACKOFF_S": "0",
                               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    assert (zeros.io_retries, zeros.io_backoff_s, zeros.compile_cache_min_s) == (0, 0.0, 0.0)


NUMBERS = ["TUNIX_JOB_IO_RETRIES", "TUNIX_JOB_IO_BACKOFF_S", "TUNIX_JOB_IO_TIMEOUT_S", "TUNIX_JOB_LEASE_TTL_S",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "JAX_NUM_PROCESSES"]
BAD = [(name, value) for name in NUMBERS for value in ("lots", "-1", HUGE, "nan", "inf", "-inf", "1e400")]
BAD += [
    ("TUNIX_JOB_IO_RETRIES", "1.5"), ("TUNIX_JOB_IO_RETRIES", "101"),
    ("TUNIX_JOB_IO_TIMEOUT_S", "0"), ("TUNIX_JOB_LEASE_TTL_S", "0"), ("TUNIX_JOB_LEASE_TTL_S", "86401"),
    ("JAX_NUM_PROCESSES", "0"), ("JAX_NUM_PROCESSES", "two"), ("JAX_NUM_PROCESSES", "100001"),
]


@pytest.mark.parametrize("name, value", BAD)
def test_a_bad_value_names_the_variable_its_value_and_the_fix(name, value):
    with pytest.raises(BadInput, match=f"^{name}=") as err:
        settings.from_env({name: value})
    message = str(err.value)
    assert value[:20] in message and "set it to" in message
    assert len(message) < 300  # a huge value is quoted cut short


@pytest.mark.parametrize("env, name", [
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0", "JAX_COORDINATOR_ADDRESS": "pod-0"}, "JAX_COORDINATOR_ADDRESS"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_PROCESS_ID"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "-1"}, "JAX_PROCESS_ID"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": HUGE}, "JAX_PROCESS_ID"),
])
def test_the_cluster_variables_are_checked_together(env, name):
    with pytest.raises(BadInput, match=f"^{name}"):
        settings.from_env(env)
    # One process needs neither the address nor an index.
    assert settings.from_env({**env, "JAX_NUM_PROCESSES": "1"}).cluster == Cluster(None, 1, 0)


def test_current_is_parsed_once_and_replaced_by_install(monkeypatch):
    monkeypatch.setattr(io.time, "sleep", lambda s: None)
    monkeypatch.setenv("TUNIX_JOB_IO_RETRIES", "1")
    first = settings.current()
    assert first.io_retries == 1 and settings.current() is first
    # Read once: a later change of the environment, even to a bad value, changes nothing in this process.
    monkeypatch.setenv("TUNIX_JOB_IO_RETRIES", "lots")
    assert settings.current() is first
    err = Retriable("gs://b/x: storage error")
    io._back_off("gs://b/x", 0, err)  # a storage retry reads the settings, not the environment
    with pytest.raises(Retriable, match="gave up after 2 attempts"):
        io._back_off("gs://b/x", 1, err)
    installed = settings.install(Settings(io_retries=0))
    assert settings.current() is installed


def test_storage_retries_follow_the_settings(monkeypatch):
    waits = []
    monkeypatch.setattr(io.time, "sleep", waits.append)
    settings.install(Settings(io_retries=2, io_backoff_s=0.5))
    err = Retriable("gs://b/x: storage error")
    io._back_off("gs://b/x", 0, err)
    io._back_off("gs://b/x", 1, err)
    with pytest.raises(Retriable, match="gave up after 3 attempts"):
        io._back_off("gs://b/x", 2, err)
    assert waits == [0.5, 1.0]


def test_storage_call_timeout_follows_the_settings(tmp_path):
    import gcsfs

    gcs, local = gcsfs.GCSFileSystem(token="anon"), io._fs(str(tmp_path))[0]
    assert io._deadline(gcs) == {}  # unset: the client's own limits
    settings.install(Settings(io_timeout_s=3.0))
    assert io._deadline(gcs) == {"timeout": 3.0}
    assert io._deadline(local) == {}  # a local call takes no timeout


def errors(capsys) -> str:
    err = capsys.readouterr().err
    return "\n".join(r["message"] for r in map(json.loads, err.splitlines()) if r["severity"] == "ERROR")


def test_the_command_line_checks_the_settings_first_each_time(capsys, monkeypatch):
    monkeypatch.setenv("TUNIX_JOB_LEASE_TTL_S", "soon")
    assert cli.main(["schema"]) == EXIT_BAD_INPUT
    assert "TUNIX_JOB_LEASE_TTL_S='soon'" in errors(capsys)
    monkeypatch.setenv("TUNIX_JOB_LEASE_TTL_S", "30")
    assert cli.main(["schema"]) == EXIT_OK
    assert settings.current().lease_ttl_s == 30.0


def test_a_bad_value_exits_2_before_the_job_starts():
    env = dict(os.environ, TUNIX_JOB_IO_RETRIES=HUGE, RUN_MANIFEST=DEMO_MANIFEST)
    done = subprocess.run([sys.executable, "-m", "job", "validate"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == EXIT_BAD_INPUT, done.stderr[-2000:]
    assert done.stdout == ""
    (record,) = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    assert record["message"].startswith("TUNIX_JOB_IO_RETRIES='999") and "set it to" in record["message"]


def test_the_run_records_its_settings(tmp_path, monkeypatch):
    from job.run import run_job

    monkeypatch.setenv("TUNIX_JOB_IMAGE", "registry/job:2")
    monkeypatch.setenv("TUNIX_JOB_IO_RETRIES", "0")
    manifest = json.loads(open(DEMO_MANIFEST, encoding="utf-8").read())
    manifest["dataset"]["uri"] = str(tmp_path / "missing.jsonl")  # fails after the record is written
    manifest["eval"]["uri"] = os.path.join(REPO, "evalsets", "arith_eval.jsonl")
    manifest["output"]["uri"] = str(tmp_path / "runs")
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    with pytest.raises(BadInput, match="missing.jsonl"):
        run_job(str(path))
    record = json.loads((tmp_path / "runs" / manifest["run_id"] / "run_manifest.json").read_text())
    assert record["image"] == "registry/job:2"
    assert record["settings"] == settings.current().as_record()
    assert record["settings"]["TUNIX_JOB_IO_RETRIES"] == 0 and record["settings"]["TUNIX_JOB_IMAGE"] == "registry/job:2"
