"""One process at a time per run directory: a lease taken before the run writes anything.

A second process started on a run directory that another one is running (a Kubernetes retry that
overlaps its dying pod, a user starting the same manifest twice) stops with `LeaseHeld` (exit 75:
run it again later) instead of interleaving writes.

- Local directories: an OS lock (`flock`) on `{run}/_LEASE`. The kernel releases it when the
  holder dies, however it dies, so a killed run never blocks its rerun.
- gs:// buckets: the object `{run}/_LEASE`, created with the generation precondition
  `if_generation_match=0` (create only if absent) and renewed every ttl/3 seconds with
  `if_generation_match=<generation it wrote last>`. A lease not renewed within its TTL has expired:
  a newcomer waits until the lease it saw would expire, and takes it over (again with a generation
  precondition, so of two newcomers only one wins) only if it was not renewed meanwhile. A holder
  whose renewal finds a different generation has lost the lease and stops.
- Other schemes (s3://, memory://): no lease; a warning says so.

`tunix-job import` holds a lease of its own, `{run}/import/_LEASE`, so that it neither waits for
nor blocks a training attempt; its message speaks of the import.

The TTL is `TUNIX_JOB_LEASE_TTL_S` (default 60 s; job/settings.py).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from job import io, logs, settings
from job.errors import BadInput, Retriable
from job.provenance import utc_now

LEASE_FILE = "_LEASE"


class LeaseHeld(Retriable):
    """Another live process holds the run directory's lease."""


def _holder() -> dict:
    return {"holder": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
            "acquired_at": utc_now()}


RUN_ACTIVITY = "running this run"
RUN_ADVICE = "Nothing was written. Run the same manifest again once it has ended: it will resume or find the run done"


def _held_message(lease: Lease, info: dict, extra: str) -> str:
    who = f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, since {info.get('acquired_at', '?')}"
    return f"{lease.run_uri}: another process is {lease.activity} ({who}); {extra}. {lease.advice}"


class Lease:
    """Acquire with `acquire()`, give back with `release()`; `on_lost` is called if it is lost while held.

    `activity` and `advice` word the message a second holder gets: what the first one is doing, and
    what to do about it (the default: a training attempt on the run directory).
    """

    def __init__(self, run_uri: str, ttl_s: float | None = None, on_lost: Callable[[str], None] | None = None,
                 *, activity: str = RUN_ACTIVITY, advice: str = RUN_ADVICE):
        self.run_uri = run_uri
        self.activity, self.advice = activity, advice
        self.uri = io.join(run_uri, LEASE_FILE)
        self.ttl = ttl_s if ttl_s is not None else settings.current().lease_ttl_s
        self.on_lost = on_lost or (lambda reason: None)
        self.info = {**_holder(), "ttl_s": self.ttl}
        self._impl: _LocalLease | _GcsLease | None = None

    def acquire(self) -> Lease:
        kind = io.scheme(self.run_uri)
        if io.is_local(self.run_uri):
            self._impl = _LocalLease(self)
        elif kind == "gs":
            self._impl = _GcsLease(self)
        else:
            logs.warning(f"no lease on {kind}:// storage: make sure only one process runs this run directory",
                         run_dir=self.run_uri)
            return self
        self._impl.acquire()
        return self

    def release(self) -> None:
        if self._impl is not None:
            self._impl.release()
            self._impl = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class _LocalLease:
    def __init__(self, lease: Lease):
        self.lease = lease
        self.path = io.local_path(lease.uri)
        self.fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    info = json.loads(os.read(fd, 65536) or b"{}")
                except ValueError:
                    info = {}
                os.close(fd)
                raise LeaseHeld(_held_message(self.lease, info, f"its lock on {self.path} is held")) from None
            # The holder before us may have removed the file between our open and our lock: then
            # we locked a file nobody else will see; start again on the one that is there.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.lease.info).encode("utf-8"), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: nobody can take a lock on it in between
        except FileNotFoundError:
            pass
        os.close(self.fd)  # releases the lock
        self.fd = None


class _GcsLease:
    def __init__(self, lease: Lease):
        from google.api_core import exceptions
        from google.cloud import storage

        self.lease, self.errors = lease, exceptions
        bucket, _, key = lease.uri[len("gs://"):].partition("/")
        self.blob = _client(storage).bucket(bucket).blob(key)
        self.generation: int | None = None
        self.expires = 0.0  # monotonic time by which our last successful write expires
        self.stopping = threading.Event()
        self.renewer: threading.Thread | None = None

    def _call(self, what: str, fn):
        """Run a storage call; a missing bucket or a permission error is the user's to fix."""
        try:
            return fn()
        except self.errors.NotFound as e:
            raise BadInput(f"{self.lease.uri}: cannot {what}: the bucket does not exist ({e.message}); check output.uri") from e
        except (self.errors.Forbidden, self.errors.Unauthorized) as e:
            raise BadInput(f"{self.lease.uri}: cannot {what}: permission denied ({e.message}); grant the job's "
                           "service account roles/storage.objectAdmin on the output bucket") from e
        except self.errors.PreconditionFailed:
            raise
        except (self.errors.GoogleAPICallError, self.errors.RetryError, OSError) as e:
            raise Retriable(f"{self.lease.uri}: cannot {what}: storage error after retries "
                            f"({type(e).__name__}: {e}); run the job again") from e

    def _write(self, generation: int, renewal: bool = False) -> None:
        started = time.monotonic()
        body = json.dumps(self.lease.info)
        # A renewal makes one bounded try: the renewal loop is the retry, and must notice expiry in time.
        bounds = {"retry": None, "timeout": max(1.0, self.lease.ttl / 3)} if renewal else {}
        self.blob.upload_from_string(body, content_type="application/json", if_generation_match=generation, **bounds)
        self.generation = self.blob.generation
        self.expires = started + self.lease.ttl

    def _read(self) -> tuple[int, dict, float] | None:
        """(generation, holder info, seconds since it was written) of the lease there now, or None."""
        try:
            blob = self.blob.bucket.get_blob(self.blob.name)
        except self.errors.NotFound:
            blob = None
        if blob is None:
            return None
        try:
            info = json.loads(blob.download_as_bytes(if_generation_match=blob.generation))
        except (ValueError, self.errors.NotFound, self.errors.PreconditionFailed):
            info = {}
        age = (datetime.datetime.now(datetime.timezone.utc) - blob.updated).total_seconds() if blob.updated else 0.0
        return blob.generation, info, age

    def acquire(self) -> None:
        waited = False
        while True:
            try:
                self._call("create the lease", lambda: self._write(0))
                break
            except self.errors.PreconditionFailed:
                pass
            seen = self._call("read the lease", self._read)
            if seen is None:
                continue  # released just now: try to create it again
            generation, info, age = seen
            if waited:
                raise LeaseHeld(_held_message(self.lease, info, "its lease is being renewed"))
            ttl = float(info.get("ttl_s") or self.lease.ttl)
            if age < ttl:
                # Wait out the holder's TTL: a live holder renews within it, a dead one does not.
                logs.warning("the run directory is leased by another process: waiting to see whether it is alive",
                             lease=self.lease.uri, holder_host=info.get("host"), wait_s=round(ttl - age, 1))
                time.sleep(ttl - age)
                waited = True
                again = self._call("read the lease", self._read)
                if again is None:
                    continue
                if again[0] != generation:
                    raise LeaseHeld(_held_message(self.lease, again[1], "its lease is being renewed"))
            try:
                self._call("take over the lease", lambda: self._write(generation))
                logs.warning("took over an expired lease (its holder stopped renewing it)", lease=self.lease.uri,
                             previous_host=info.get("host"), previous_pid=info.get("pid"))
                break
            except self.errors.PreconditionFailed:
                raise LeaseHeld(_held_message(self.lease, info, "another process took the lease over first")) from None
        self.renewer = threading.Thread(target=self._renew, name="lease-renewal", daemon=True)
        self.renewer.start()

    def _renew(self) -> None:
        while not self.stopping.wait(self.lease.ttl / 3):
            try:
                self._write(self.generation, renewal=True)
            except self.errors.PreconditionFailed:
                self._lost("another process took the lease over (this process did not renew it in time)")
                return
            except Exception as e:  # transient: try again at the next tick while the lease lasts
                if time.monotonic() >= self.expires:
                    self._lost(f"the lease expired while it could not be renewed ({type(e).__name__}: {e})")
                    return
                logs.warning("could not renew the lease; trying again", lease=self.lease.uri, error=f"{type(e).__name__}: {e}")

    def _lost(self, reason: str) -> None:
        logs.error(f"lease lost: {reason}; stopping", lease=self.lease.uri)
        self.generation = None
        self.lease.on_lost(reason)

    def release(self) -> None:
        self.stopping.set()
        if self.renewer is not None:
            self.renewer.join(timeout=30)
        if self.generation is not None:
            try:
                # One short try: a lease left behind expires by itself, and the storage may be what failed.
                self.blob.delete(if_generation_match=self.generation, retry=None, timeout=5)
            except Exception as e:  # it expires by itself
                logs.warning("could not delete the lease; it will expire", lease=self.lease.uri, error=str(e))
            self.generation = None


def _client(storage):
    """A storage client: the emulator's when STORAGE_EMULATOR_HOST is set, else Application Default Credentials."""
    current = settings.current()
    if current.storage_emulator_host:
        return storage.Client(project=current.google_cloud_project or "test")
    try:
        return storage.Client()
    except Exception as e:  # no project or credentials
        raise BadInput(f"cannot reach Cloud Storage to take the run's lease ({type(e).__name__}: {e}); "
                       "set up Application Default Credentials (Workload Identity on GKE)") from e
