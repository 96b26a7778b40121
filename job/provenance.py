"""What a run records about the program that made it: versions, a digest of the job's code, the time.

Kept once here: the run record (run_manifest.json), the exported-step cache and the saved eval
before training all key or label what they hold with these.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path

import job

# The libraries whose versions decide what the job computes (recorded, and part of every cache key).
VERSIONED_PACKAGES = ("google-tunix", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "qwix", "sentencepiece")


def utc_now(timespec: str = "seconds") -> str:
    """The current UTC time in ISO 8601 ("2026-12-02T16:34:07+00:00")."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec=timespec)


@functools.cache  # constant for the process
def versions() -> dict:
    """{package: version} for the job, Python and VERSIONED_PACKAGES (None where one is not installed)."""
    found = {"tunix-rt-job": job.__version__, "python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


@functools.cache  # constant for the process; read once, not per compiled step
def code_digest() -> str:
    """A digest of this package's source: what the job computes may change with any of it."""
    digest = hashlib.sha256()
    for path in sorted(Path(job.__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def program_key(**parts) -> str:
    """sha256 of `parts` plus the job's code and library versions: equal keys mean the same program."""
    keyed = {**parts, "code": code_digest(), "versions": versions()}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode("utf-8")).hexdigest()
