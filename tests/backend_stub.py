"""A stand-in for the tunix-rt backend's `POST /api/traces/batch`, enforcing the documented contract.

Threaded http.server on 127.0.0.1 (a free port). Checks run in the backend's order: the body is
validated as a list of ReasoningTrace first (422, FastAPI-style, nothing stored), then the
endpoint's own checks (400 for an empty batch or more than 1,000 traces), then 201. Tests can script
how the next requests are answered (`Answer`): late, with any status, headers and body, after
storing the batch or not, or not at all (the connection closed or reset once the request was read).
"""

from __future__ import annotations

import dataclasses
import json
import socket
import struct
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from backend_validation import trace_errors

from job import io
from job.outputs import MAX_BATCH, import_batch_files

BATCH_PATH = "/api/traces/batch"


@dataclasses.dataclass(frozen=True)
class Answer:
    """How the stub answers one batch request, read whole first: wait `delay_s`; store the batch as the
    backend would when `store` (or `as_backend`); then send the backend's own answer (`as_backend`), or
    `status` with `headers` and `body` (a Content-Length header given here is sent as is), or, with no
    status, `body` as the whole answer (empty: nothing at all); then close the connection, with a TCP
    reset when `reset`."""

    status: int | None = None
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    store: bool = False
    as_backend: bool = False
    delay_s: float = 0.0
    reset: bool = False


class BackendStub:
    def __init__(self) -> None:
        self.traces: list[dict] = []  # every accepted trace, as the backend would store it
        self.requests = 0  # POSTs to the batch endpoint, answered or not
        self.elsewhere: list[str] = []  # "METHOD /path" of every other request (a followed redirect)
        self._lock = threading.Lock()
        self._answers: list[Answer] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        # A short poll interval: shutdown() waits for the serving loop to notice it (default 0.5 s).
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> BackendStub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> BackendStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def answer_next(self, *answers: Answer) -> None:
        """Answer the next batch requests so, one each; later ones as the backend would."""
        with self._lock:
            self._answers += answers

    def fail_next(self, n: int, status: int = 503) -> None:
        """Answer the next n batch requests with `status` and store nothing."""
        self.answer_next(*[Answer(status, json.dumps({"detail": "Service Unavailable"}).encode())] * n)

    def delay_next(self, n: int, seconds: float) -> None:
        """Wait `seconds` before handling each of the next n requests (which are then handled normally)."""
        self.answer_next(*[Answer(as_backend=True, delay_s=seconds)] * n)

    def _take(self) -> Answer:
        with self._lock:
            self.requests += 1
            return self._answers.pop(0) if self._answers else Answer(as_backend=True)

    def _handle_batch(self, raw: bytes) -> tuple[int, dict]:
        try:
            body = json.loads(raw)
        except ValueError as e:
            return 422, {"detail": [{"type": "json_invalid", "loc": ["body", 0], "msg": "JSON decode error",
                                     "input": {}, "ctx": {"error": str(e)}}]}
        if not isinstance(body, list):
            return 422, {"detail": [{"type": "list_type", "loc": ["body"], "msg": "Input should be a valid list",
                                     "input": body}]}
        errors = [
            {**e, "loc": ["body", index, *e["loc"]]}
            for index, trace in enumerate(body)
            for e in trace_errors(trace)
        ]
        if errors:
            return 422, {"detail": errors}
        if not body:
            return 400, {"detail": "Batch must contain at least one trace"}
        if len(body) > MAX_BATCH:
            return 400, {"detail": f"Batch size ({len(body)}) exceeds maximum ({MAX_BATCH})"}
        created = []
        with self._lock:
            for trace in body:
                stored = {
                    "id": str(uuid.uuid4()),
                    "created_at": datetime.now(timezone.utc).isoformat(),
                    **{k: trace.get(k) for k in ("trace_version", "prompt", "final_answer", "steps", "meta")},
                }
                self.traces.append(stored)  # extra fields are dropped, as the backend does
                created.append({k: stored[k] for k in ("id", "created_at", "trace_version")})
        return 201, {"created_count": len(created), "traces": created}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, payload: dict) -> None:
                self._send_raw(status, (("Content-Type", "application/json"),), json.dumps(payload).encode())

            def _send_raw(self, status: int, headers: tuple[tuple[str, str], ...], body: bytes) -> None:
                try:
                    self.send_response(status)
                    for name, value in headers:
                        self.send_header(name, value)
                    if not any(name.lower() == "content-length" for name, _ in headers):
                        self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timed out) before the answer

            def _answer(self, answer: Answer, raw: bytes) -> None:
                time.sleep(answer.delay_s)
                stored = stub._handle_batch(raw) if answer.store or answer.as_backend else None
                if answer.as_backend:
                    self._send(*stored)
                elif answer.status is not None:
                    self._send_raw(answer.status, answer.headers, answer.body)
                elif answer.body:
                    self.wfile.write(answer.body)
                self.close_connection = True
                if answer.reset:  # linger 0: close() sends a TCP reset
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path != BATCH_PATH:
                    self.do_GET()
                    return
                self._answer(stub._take(), raw)

            def do_GET(self) -> None:
                with stub._lock:
                    stub.elsewhere.append(f"{self.command} {self.path}")
                self._send(404, {"detail": "Not Found"})

        return Handler


def write_import_batches(run_uri: str, traces: list[dict], max_per_batch: int = MAX_BATCH) -> list[str]:
    """A run directory's import batches, as a run writes them (`{run}/import/traces-NNNNN.json`); their URIs."""
    uris = []
    for name, batch in import_batch_files(traces, max_per_batch):
        uris.append(io.join(run_uri, name))
        io.write_json(uris[-1], batch)
    return uris
