"""Every environment variable the job reads, parsed and checked once at start-up into a frozen `Settings`.

The command line parses them first thing (`cli.main`): a bad value is exit 2 naming the variable, its
value and what to set, before anything else happens. Modules ask `current()`, which is what the
command installed, or, in library use and unit tests, the environment parsed at first use.
README.md ("Environment variables") lists them all.

Not settings: the job sets `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT` (job/io.py) for gcsfs, and job/logs.py
reads the values of variables named like secrets, only to keep them out of logs.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping

from job.errors import BadInput

COORDINATOR_VAR, COUNT_VAR, INDEX_VAR = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
MAX_SECONDS = 86_400.0  # one day: the bound of every duration
MAX_IO_RETRIES = 100
MAX_PROCESSES = 100_000
_SHOWN = 40  # characters of a bad value quoted in an error


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "tunix-rt-job")


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The processes that run the job as one: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID."""

    coordinator: str | None
    count: int
    index: int

    @property
    def is_multi(self) -> bool:
        return self.count > 1

    @property
    def is_main(self) -> bool:
        return self.index == 0


SINGLE_PROCESS = Cluster(None, 1, 0)


@dataclasses.dataclass(frozen=True)
class Settings:
    manifest: str | None = None  # RUN_MANIFEST: the manifest URI when --manifest is not given
    io_retries: int = 4  # TUNIX_JOB_IO_RETRIES
    io_backoff_s: float = 2.0  # TUNIX_JOB_IO_BACKOFF_S: the first wait; doubled each retry, at most 60 s
    io_timeout_s: float | None = None  # TUNIX_JOB_IO_TIMEOUT_S: None = the storage client's own limits
    lease_ttl_s: float = 60.0  # TUNIX_JOB_LEASE_TTL_S
    storage_emulator_host: str | None = None  # STORAGE_EMULATOR_HOST: the lease's client talks to it
    google_cloud_project: str | None = None  # GOOGLE_CLOUD_PROJECT: the emulator client's project
    cluster: Cluster = SINGLE_PROCESS  # JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
    cache_dir: str = dataclasses.field(default_factory=default_cache_dir)  # TUNIX_JOB_CACHE
    compile_cache_dir: str | None = None  # JAX_COMPILATION_CACHE_DIR
    compile_cache_min_s: float | None = None  # JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS (JAX reads it too)
    image: str | None = None  # TUNIX_JOB_IMAGE: recorded in run_manifest.json

    def as_record(self) -> dict:
        """The settings by variable name, for run_manifest.json (none of them is a secret; the record is
        redacted on writing all the same)."""
        return {
            "RUN_MANIFEST": self.manifest,
            "TUNIX_JOB_IO_RETRIES": self.io_retries,
            "TUNIX_JOB_IO_BACKOFF_S": self.io_backoff_s,
            "TUNIX_JOB_IO_TIMEOUT_S": self.io_timeout_s,
            "TUNIX_JOB_LEASE_TTL_S": self.lease_ttl_s,
            "STORAGE_EMULATOR_HOST": self.storage_emulator_host,
            "GOOGLE_CLOUD_PROJECT": self.google_cloud_project,
            COORDINATOR_VAR: self.cluster.coordinator,
            COUNT_VAR: self.cluster.count,
            INDEX_VAR: self.cluster.index,
            "TUNIX_JOB_CACHE": self.cache_dir,
            "JAX_COMPILATION_CACHE_DIR": self.compile_cache_dir,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": self.compile_cache_min_s,
            "TUNIX_JOB_IMAGE": self.image,
        }


# -- parsing ---------------------------------------------------------------------------------------

def _shown(raw: str) -> str:
    return repr(raw if len(raw) <= _SHOWN else raw[:_SHOWN] + "...")


def _text(env: Mapping, name: str) -> str | None:
    """The variable's value; None when unset or blank."""
    raw = env.get(name)
    return raw if raw and raw.strip() else None


def _whole(env: Mapping, name: str, default: int | None, low: int, high: int, what: str) -> int | None:
    """A whole number in low..high; `default` when unset or blank."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:  # also a string of more digits than Python converts
        value = None
    if value is None or not low <= value <= high:
        unset = "" if default is None else ", or unset it for the default"
        raise BadInput(f"{name}={_shown(raw)}: must be a whole number from {low} to {high}; set it to {what}{unset}")
    return value


def _seconds(env: Mapping, name: str, default: float | None, what: str, zero: bool = False) -> float | None:
    """A finite number of seconds, > 0 (>= 0 with zero=True) and at most a day; `default` when unset or blank."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (value >= 0 if zero else value > 0) and value <= MAX_SECONDS):
        raise BadInput(f"{name}={_shown(raw)}: must be a number of seconds {'>= 0' if zero else '> 0'} and "
                       f"<= {MAX_SECONDS:.0f}; set it to {what}, or unset it for the default")
    return value


def _cluster(env: Mapping) -> Cluster:
    """The three JAX variables, checked; one process when JAX_NUM_PROCESSES is unset or 1."""
    count = _whole(env, COUNT_VAR, 1, 1, MAX_PROCESSES, "the number of processes")
    if count == 1:
        return SINGLE_PROCESS
    address = (env.get(COORDINATOR_VAR) or "").strip()
    if ":" not in address:
        raise BadInput(f"{COORDINATOR_VAR}={_shown(address)}: set it to host:port of process 0 when {COUNT_VAR}={count}")
    where = f"this process's index, 0..{count - 1} ({COUNT_VAR}={count})"
    index = _whole(env, INDEX_VAR, None, 0, count - 1, where)
    if index is None:
        raise BadInput(f"{INDEX_VAR} is not set; set it to {where}")
    return Cluster(address, count, index)


def from_env(env: Mapping = os.environ) -> Settings:
    """Every setting from `env`, checked; BadInput names the first bad variable, its value and the fix."""
    default = Settings()
    return Settings(
        manifest=_text(env, "RUN_MANIFEST"),
        io_retries=_whole(env, "TUNIX_JOB_IO_RETRIES", default.io_retries, 0, MAX_IO_RETRIES,
                          "the number of retries of a failed storage call"),
        io_backoff_s=_seconds(env, "TUNIX_JOB_IO_BACKOFF_S", default.io_backoff_s,
                              "the seconds to wait before the first storage retry", zero=True),
        io_timeout_s=_seconds(env, "TUNIX_JOB_IO_TIMEOUT_S", None, "the seconds one storage call may take"),
        lease_ttl_s=_seconds(env, "TUNIX_JOB_LEASE_TTL_S", default.lease_ttl_s, "the seconds a lease lasts without renewal"),
        storage_emulator_host=_text(env, "STORAGE_EMULATOR_HOST"),
        google_cloud_project=_text(env, "GOOGLE_CLOUD_PROJECT"),
        cluster=_cluster(env),
        cache_dir=_text(env, "TUNIX_JOB_CACHE") or default.cache_dir,
        compile_cache_dir=_text(env, "JAX_COMPILATION_CACHE_DIR"),
        compile_cache_min_s=_seconds(env, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None,
                                     "the shortest compile time worth caching, in seconds", zero=True),
        image=_text(env, "TUNIX_JOB_IMAGE"),
    )


# -- the settings in force -------------------------------------------------------------------------

_installed: Settings | None = None


def install(settings: Settings) -> Settings:
    """Make `settings` what current() returns: the command line installs what it parsed at start-up."""
    global _installed
    _installed = settings
    return settings


def reset() -> None:
    """Forget the installed settings: the next current() parses the environment again."""
    global _installed
    _installed = None


def current() -> Settings:
    """The installed settings; when none are, the environment parsed now and kept."""
    global _installed
    if _installed is None:
        _installed = from_env()
    return _installed
