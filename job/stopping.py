"""How a run is asked to stop: SIGTERM (a preemption, a pod eviction) and SIGINT (Ctrl-C) alike.

Either signal asks the run to stop at its next safe point: during training after the step in
flight, with a checkpoint of it; otherwise at the next phase boundary. The run then says
`preempted` and exits 75, and running the same manifest again resumes it. A second Ctrl-C stops
at once (exit 75): whatever was being written is left as a kill leaves it (Orbax writes each
checkpoint under a temporary name, so the last complete checkpoint still stands).

The handler only notes the request: an exception raised from a signal handler can land inside a
library's broad `except` and be swallowed (JAX's compile cache did: the run went on).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from job import logs
from job.errors import EXIT_RETRIABLE

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Set by a stop signal (or by the run itself, e.g. on losing its lease); `reason` says why."""

    def __init__(self):
        self.event = threading.Event()
        self.reason = ""

    def is_set(self) -> bool:
        return self.event.is_set()

    def ask(self, reason: str) -> None:
        self.reason = self.reason or reason
        self.event.set()

    def on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.is_set():
            logs.warning("second interrupt: stopping now; rerun the same manifest to resume from the last checkpoint",
                         exit_code=EXIT_RETRIABLE)
            sys.stderr.flush()
            os._exit(EXIT_RETRIABLE)
        logs.warning(f"{name}: stopping at the next safe point (during training: after the current step, "
                     "with a checkpoint)" + ("; press Ctrl-C again to stop at once" if signum == signal.SIGINT else ""))
        self.ask(name)

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[StopRequest]:
        """SIGTERM and SIGINT set this request while inside (the handlers before are put back after).
        Take them again after anything that installs handlers of its own (jax.distributed does)."""
        previous = {sig: signal.signal(sig, self.on_signal) for sig in SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
