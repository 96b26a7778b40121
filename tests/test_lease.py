"""The run directory's lease: a live holder refuses others; a dead one blocks nobody for longer than its TTL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from job import io, settings
from job.errors import EXIT_RETRIABLE, BadInput
from job.lease import LEASE_FILE, Lease, LeaseHeld

HOLD = """
import sys, time
from job.lease import Lease
Lease(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_local_lease_refuses_a_second_holder_and_is_free_after_release(tmp_path):
    run = str(tmp_path / "run")
    first = Lease(run).acquire()
    held = json.loads((tmp_path / "run" / LEASE_FILE).read_text())
    assert held["pid"] and held["host"]
    with pytest.raises(LeaseHeld) as err:
        Lease(run).acquire()
    assert run in str(err.value) and f"pid {held['pid']}" in str(err.value)
    assert err.value.exit_code == EXIT_RETRIABLE
    first.release()
    assert not (tmp_path / "run" / LEASE_FILE).exists()
    with Lease(run):
        pass


def test_local_lease_of_a_killed_process_is_free_at_once(tmp_path):
    run = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, run], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld):
            Lease(run).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "run" / LEASE_FILE).exists()  # left behind by the killed holder, but not locked
    with Lease(run):
        pass


def test_lease_ttl_comes_from_the_settings(tmp_path):
    settings.install(settings.from_env({"TUNIX_JOB_LEASE_TTL_S": "2.5"}))
    assert Lease(str(tmp_path / "run")).ttl == 2.5
    assert Lease(str(tmp_path / "run"), ttl_s=7.0).ttl == 7.0
    for bad in ("soon", "0", "-1"):
        with pytest.raises(BadInput, match="TUNIX_JOB_LEASE_TTL_S"):
            settings.from_env({"TUNIX_JOB_LEASE_TTL_S": bad})


def _lease_object(uri: str) -> dict:
    return io.read_json(io.join(uri, LEASE_FILE))


def test_gcs_lease_refuses_while_renewed_and_is_free_after_release(gcs_bucket):
    run = f"{gcs_bucket}/runs/a"
    # TTLs of a few seconds: a renewal must get through a loaded CI machine's slowest loopback request.
    first = Lease(run, ttl_s=3.0).acquire()
    assert _lease_object(run)["holder"] == first.info["holder"]
    started = time.monotonic()
    with pytest.raises(LeaseHeld, match="another process is running this run"):
        Lease(run, ttl_s=3.0).acquire()  # waits one TTL, sees it renewed
    assert 1.5 < time.monotonic() - started < 15  # it waited for the holder to renew
    first.release()
    assert not io.exists(io.join(run, LEASE_FILE))
    with Lease(run, ttl_s=3.0) as second:
        assert _lease_object(run)["holder"] == second.info["holder"]


def test_gcs_lease_of_a_dead_holder_is_taken_over_after_its_ttl(gcs_bucket):
    run = f"{gcs_bucket}/runs/b"
    dead = Lease(run, ttl_s=1.0).acquire()
    dead._impl.stopping.set()  # a killed pod: it stops renewing and never deletes the lease
    dead._impl.renewer.join()
    started = time.monotonic()
    with Lease(run, ttl_s=1.0) as taker:
        assert time.monotonic() - started < 10
        assert _lease_object(run)["holder"] == taker.info["holder"]


def test_gcs_holder_that_lost_its_lease_is_told(gcs_bucket):
    run = f"{gcs_bucket}/runs/c"
    lost = threading.Event()
    holder = Lease(run, ttl_s=0.6, on_lost=lambda reason: lost.set()).acquire()
    try:
        io.write_json(io.join(run, LEASE_FILE), {"holder": "someone else"})  # taken over behind its back
        assert lost.wait(5)
    finally:
        holder.release()
    assert _lease_object(run) == {"holder": "someone else"}  # a lost lease is not deleted on release


def test_gcs_lease_in_a_missing_bucket_is_bad_input(gcs_server):
    with pytest.raises(BadInput, match="gs://no-such-bucket-xyz/run/_LEASE.*bucket does not exist"):
        Lease("gs://no-such-bucket-xyz/run", ttl_s=1.0).acquire()


def test_a_run_whose_directory_is_leased_writes_nothing(tmp_path):
    from pathlib import Path

    from job.run import run_job

    manifest = Path(__file__).resolve().parent.parent / "manifests" / "local_tiny.json"
    run = tmp_path / "local-tiny"
    with Lease(str(run)):
        for fresh in (False, True):
            with pytest.raises(LeaseHeld):
                run_job(str(manifest), [f"output.uri={tmp_path}"], fresh=fresh)
            assert [p.name for p in run.iterdir()] == [LEASE_FILE]
