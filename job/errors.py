"""Errors that end a run, each mapped to the process exit code an operator acts on.

0 done; 2 bad input (fix the manifest or data, never worth a retry); 75 retriable
(preempted, storage outage: run the same manifest again); 1 anything unexpected.
"""

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


class Retriable(JobError):
    """A transient condition (preemption, storage outage): rerunning the same manifest resumes the run."""

    exit_code = EXIT_RETRIABLE
