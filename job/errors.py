"""Errors that end a run, each mapped to the process exit code an operator acts on.

0 done; 2 bad input (fix the manifest or data, never worth a retry), or an outcome only a person
can settle (an import batch that may or may not be stored); 75 retriable (preempted, storage
outage: run the same manifest again); 1 anything unexpected.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_BAD_INPUT = 2
EXIT_RETRIABLE = 75  # EX_TEMPFAIL from sysexits.h


class JobError(Exception):
    """An error the job understands; its message is shown to the user without a traceback."""

    exit_code = EXIT_UNEXPECTED


class BadInput(JobError):
    """The manifest or the data is wrong. The message names the place (field path or URI:line) and the fix."""

    exit_code = EXIT_BAD_INPUT


class UnknownOutcome(JobError):
    """Something was sent whose effect cannot be known from here (an import batch the backend may have
    stored). Rerunning as is cannot settle it, so it exits like bad input: a person checks and decides."""

    exit_code = EXIT_BAD_INPUT


class Retriable(JobError):
    """A transient condition (preemption, storage outage): rerunning the same manifest resumes the run."""

    exit_code = EXIT_RETRIABLE


_TRANSIENT_STATUS = ("UNAVAILABLE:", "DEADLINE_EXCEEDED:", "RESOURCE_EXHAUSTED:", "ABORTED:")


def transient_cause(err: BaseException | None) -> bool:
    """True when the error, or one it was raised from, is a network or storage outage: a connection or
    timeout error, or a gRPC/absl status that says "try again" (how tensorstore, under Orbax, fails)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (ConnectionError, TimeoutError)) or any(code in str(err) for code in _TRANSIENT_STATUS):
            return True
        err = err.__cause__ or err.__context__
    return False
