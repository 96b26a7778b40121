"""What a run hands back: eval traces for the backend, import batches, _SUCCESS, the import client.

Every eval reply becomes a backend ReasoningTrace (clipped to the backend's limits so that one odd
reply never gets a whole batch rejected). Traces are written as batch files under
`{run}/import/`; `import_run` posts them to `POST /api/traces/batch`. That endpoint has no
idempotency key, so each batch lands exactly once or is reported as unknown: the client records
every batch's state in `import/posted.json` (posted, with the trace ids the backend gave, or
unknown, with why), a rerun skips what was posted and sends an unknown batch again only when asked,
and one import of a run runs at a time (its own lease, `import/_LEASE`).
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable

from job import io, logs, strict_json
from job.errors import BadInput, JobError, Retriable
from job.lease import Lease
from job.provenance import utc_now
from job.formats import MAX_STEP_CONTENT, MAX_STEPS, MAX_TEXT
from job.score import ItemResult, answer_line_start, visible_text

TRACE_VERSION = "tunix-rt-job-eval/1"
TRACE_SOURCE = "tunix-rt-job"
NO_ANSWER = "(no answer)"
EMPTY_OUTPUT = "(empty output)"

MAX_BATCH = 1_000  # traces per POST /api/traces/batch

IMPORT_DIR = "import"
POSTED_FILE = "posted.json"
_CLIP_MARK = "…"


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, marked with "…" where it was cut."""
    return text if len(text) <= limit else text[: limit - len(_CLIP_MARK)] + _CLIP_MARK


# ------------------------------------------------------------------------------- eval traces


def _numbered(line: str) -> str | None:
    """"3. text" or "3) text" -> "text"; None for a line that does not start a numbered step."""
    head, sep, rest = line.partition(" ")
    if sep and len(head) >= 2 and head[:-1].isdigit() and head[-1] in ".)":
        return rest.strip()
    return None


def reasoning_steps(output: str) -> list[str]:
    """The reasoning in a reply, one string per step.

    The numbered lines of a "Reasoning:" block (the trained format) start steps, other lines
    continue the step before them; without such a block, each non-empty line before the answer
    line is a step; with neither, the whole reply is one step.
    """
    text = visible_text(output)
    answer_at = answer_line_start(output)
    body = text[:answer_at] if answer_at is not None else text
    lines = [line.strip() for line in body.splitlines()]

    block_start = next((k for k, line in enumerate(lines) if line.lower().startswith("reasoning:")), None)
    if block_start is not None:
        steps: list[str] = []
        first = lines[block_start][len("reasoning:"):].strip()
        for line in ([first] if first else []) + lines[block_start + 1:]:
            if not line:
                continue
            content = _numbered(line)
            if content is not None:
                steps.append(content or line)
            elif steps:
                steps[-1] += "\n" + line
            else:
                steps.append(line)
        if steps:
            return steps

    steps = [line for line in lines if line]
    if steps:
        return steps
    whole = output.strip()
    return [whole] if whole else [EMPTY_OUTPUT]


def eval_trace(result: ItemResult, phase: str, run_id: str) -> dict:
    """One eval reply as a backend ReasoningTrace that the backend accepts whatever the reply was."""
    if phase not in ("before", "after"):
        raise ValueError(f"phase must be 'before' or 'after', not {phase!r}")
    item, score = result.item, result.score
    steps = reasoning_steps(result.output)
    if len(steps) > MAX_STEPS:  # keep everything: the overflow joins the last step
        steps = steps[: MAX_STEPS - 1] + ["\n".join(steps[MAX_STEPS - 1:])]
    return {
        "trace_version": TRACE_VERSION,
        "prompt": clip(item.prompt, MAX_TEXT) or "(empty prompt)",
        "final_answer": clip(score.extracted, MAX_TEXT) if score.extracted else NO_ANSWER,
        "steps": [
            {"i": k, "type": "reasoning", "content": clip(content, MAX_STEP_CONTENT)}
            for k, content in enumerate(steps)
        ],
        "meta": {
            "source": TRACE_SOURCE,
            "run_id": run_id,
            "phase": phase,
            "eval_item_id": item.id,
            "category": item.category,
            "difficulty": item.difficulty,
            "expected_answer": item.expected_answer,
            "extracted_answer": score.extracted,
            "strict_correct": score.strict,
            "flexible_correct": score.flexible,
            "has_answer_line": score.has_answer_line,
            "finished": result.finished,
            "raw_output": clip(result.output, MAX_TEXT),
        },
    }


# ------------------------------------------------------------------------- batches, _SUCCESS


def import_batches(traces: list[dict], max_per_batch: int = MAX_BATCH) -> list[list[dict]]:
    """Split traces into batches the endpoint accepts (1..1,000 each); no traces -> no batches."""
    if not 1 <= max_per_batch <= MAX_BATCH:
        raise ValueError(f"max_per_batch must be 1..{MAX_BATCH}, not {max_per_batch}")
    return [traces[k : k + max_per_batch] for k in range(0, len(traces), max_per_batch)]


def import_file_name(index: int) -> str:
    """The name of the index-th batch file (index 0-based, names 1-based): traces-00001.json, ..."""
    return f"traces-{index + 1:05d}.json"


def import_batch_files(traces: list[dict], max_per_batch: int = MAX_BATCH) -> list[tuple[str, list[dict]]]:
    """(`import/traces-NNNNN.json`, batch) for each batch of `traces`: the files a run writes for the import."""
    return [(f"{IMPORT_DIR}/{import_file_name(k)}", batch)
            for k, batch in enumerate(import_batches(traces, max_per_batch))]


# ------------------------------------------------------------------------------ import client
#
# A batch counts as posted only when the backend's 201 body shows that it stored that batch:
# `created_count` equal to the batch's size and one trace id per trace. Every other end of a POST
# falls in one of three classes, decided here once for every answer:
# - not stored (_NotStored): the batch never reached the server whole (no connection, broken while
#   sending), or the server said it did not take the request (408, 429, 5xx). Sent again, up to
#   `retries` times, then exit 75.
# - refused (BadInput): a redirect (never followed: the batch would go where nobody asked it to) or
#   another 4xx. Exit 2; nothing of the batch was stored.
# - unknown (_Unknown): sent whole, then no complete answer (timeout, connection lost), or an answer
#   that does not show the batch stored (a 2xx other than 201, a 201 with an odd body). Recorded as
#   unknown and not sent again unless asked (`resend_unknown`): the endpoint has no idempotency key.

POSTED, UNKNOWN, SENDING = "posted", "unknown", "sending"  # a batch's state in import/posted.json
_STOPPED_WHILE_SENDING = "the import stopped (killed or interrupted) while this batch was being sent"
_ANSWER_LIMIT = 64 * 2**20  # bytes; the backend's 201 for 1,000 traces is about 100 KB
_IMPORT_ACTIVITY = "importing this run's batches"
_IMPORT_ADVICE = ("This import posted nothing. Run it again once the other one has ended: "
                  "it skips the batches already posted")


class _NotStored(Exception):
    """The backend certainly did not store the batch; sending it again is safe."""


class _Unknown(Exception):
    """The batch was sent, and whether the backend stored it cannot be told from the answer."""

    def __init__(self, reason: str, created_count: object = None, trace_ids: list | None = None):
        super().__init__(reason)
        self.created_count, self.trace_ids = created_count, trace_ids or []


def _detail(body: bytes | None) -> str:
    """The server's `detail`, readable: a string as is, FastAPI's error list as "loc: msg" items."""
    text = (body or b"").decode("utf-8", errors="replace")
    try:
        detail = json.loads(text).get("detail")
    except (ValueError, AttributeError, RecursionError):
        return text[:2000] or "(no body)"
    if isinstance(detail, list):
        return "; ".join(
            ".".join(str(p) for p in e.get("loc", [])) + ": " + str(e.get("msg", e)) if isinstance(e, dict) else str(e)
            for e in detail[:20]
        ) + (f"; ... ({len(detail)} errors)" if len(detail) > 20 else "")
    return str(detail)


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    """A connection to `url`'s host (not yet open) and the path to send: http.client, which follows nothing."""
    parts = urllib.parse.urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    try:
        connection = kind(parts.netloc.rpartition("@")[2], timeout=timeout)
    except http.client.InvalidURL as e:
        raise BadInput(f"--api: {url} is not a usable URL ({e})") from e
    return connection, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _read_whole(response: http.client.HTTPResponse) -> bytes | None:
    """The answer's body; None when it broke off, or is too long to be the backend's."""
    try:
        payload = response.read(_ANSWER_LIMIT + 1)
    except (OSError, http.client.HTTPException):
        return None
    return None if len(payload) > _ANSWER_LIMIT or response.length else payload  # length: bytes still owed


def _exchange(url: str, body: bytes, timeout: float) -> tuple[int, http.client.HTTPMessage, bytes | None]:
    """POST `body` once: (status, headers, body or None). A redirect is an answer like any other.

    _NotStored while the request cannot have reached the server whole; _Unknown once it may have.
    """
    connection, path = _connection(url, timeout)
    try:
        try:
            connection.connect()
            connection.request("POST", path, body, {"Content-Type": "application/json", "Accept": "application/json"})
        except ssl.SSLCertVerificationError as e:
            raise BadInput(f"{url}: the server's certificate is not trusted ({e.verify_message})") from e
        except (OSError, http.client.HTTPException) as e:  # timeouts too: the server did not read it all
            raise _NotStored(f"the batch was not sent ({type(e).__name__}: {e})") from e
        try:
            response = connection.getresponse()
        except TimeoutError as e:
            raise _Unknown(f"the batch was sent, and no answer came within {timeout:g} s") from e
        except (OSError, http.client.HTTPException) as e:
            raise _Unknown(f"the batch was sent, and no answer came back ({type(e).__name__}: {e})") from e
        return response.status, response.headers, _read_whole(response)
    finally:
        connection.close()


def _stored_ids(payload: bytes | None, count: int) -> list[str]:
    """The trace ids of a 201 body that shows all `count` traces stored; _Unknown for any other body."""
    if payload is None:
        raise _Unknown("HTTP 201, but its body broke off")
    try:
        answer = strict_json.loads(payload.decode("utf-8"))
    except ValueError:  # not UTF-8, not JSON the job reads
        raise _Unknown("HTTP 201, but its body is not JSON") from None
    if not isinstance(answer, dict):
        raise _Unknown(f"HTTP 201, but its body is a JSON {type(answer).__name__}, not an object")
    created, traces = answer.get("created_count"), answer.get("traces")
    ids = [t.get("id") for t in traces if isinstance(t, dict)] if isinstance(traces, list) else []
    ids = [i for i in ids if isinstance(i, str) and i]
    counted = created if type(created) is int else None  # noqa: E721 (True is not a count)
    if counted != count:
        raise _Unknown(f"HTTP 201 with created_count {created!r:.80} for {count} traces sent", counted, ids)
    if not isinstance(traces, list) or len(traces) != count or len(set(ids)) != count:
        raise _Unknown(f"HTTP 201, but {len(set(ids))} distinct trace ids came back for {count} traces sent",
                       counted, ids)
    return ids


def _post(url: str, body: bytes, count: int, timeout: float) -> list[str]:
    """Send one batch of `count` traces; the ids the backend gave them. Raises _NotStored, _Unknown or BadInput."""
    status, headers, payload = _exchange(url, body, timeout)
    if status == 201:
        return _stored_ids(payload, count)
    if 300 <= status < 400:
        location = headers.get("Location")
        where = urllib.parse.urljoin(url, location) if location else "(no Location given)"
        raise BadInput(f"{url}: the API answered a redirect to {where} (HTTP {status}); give the backend's "
                       "base URL as --api (a POST never follows a redirect: this batch and the ones after it "
                       "were not posted)")
    if status in (408, 429) or 500 <= status < 600:
        raise _NotStored(f"HTTP {status}: {_detail(payload)}")
    if 400 <= status < 500:
        raise BadInput(f"{url} rejected the batch with HTTP {status}: {_detail(payload)}")
    kind = headers.get("Content-Type") or "no Content-Type"
    raise _Unknown(f"HTTP {status} ({kind}), not the backend's 201 with the stored traces; "
                   "is --api the backend's base URL?")


def _post_until_answered(url: str, body: bytes, count: int, name: str, *, timeout: float, retries: int,
                         backoff: float, log: Callable[[str], object]) -> list[str]:
    """`_post`, sending again while the batch was certainly not stored; Retriable once `retries` are spent."""
    attempt = 0
    while True:
        try:
            return _post(url, body, count, timeout)
        except _NotStored as e:
            if attempt == retries:
                raise Retriable(f"{url}: {name} not posted after {retries + 1} attempts ({e}); none of them "
                                "was stored. Run the import again: batches already posted are skipped") from e
            wait = backoff * 2**attempt
            log(f"{name}: {e}; not stored; retrying in {wait:g} s")
            time.sleep(wait)
            attempt += 1


class _Record:
    """import/posted.json: each batch's state, written at every change, before the next POST."""

    def __init__(self, uri: str):
        self.uri = uri
        self.batches = _read_record(uri)

    def put(self, name: str, entry: dict | None) -> None:
        """Set (or, with None, drop) a batch's entry, and write the record."""
        if entry is None:
            self.batches.pop(name, None)
        else:
            self.batches[name] = entry
        io.write_json(self.uri, {"batches": self.batches})


def _read_record(uri: str) -> dict[str, dict]:
    """Each batch's entry; one left "sending" by an import that stopped mid-POST is unknown."""
    data = io.read_json(uri) if io.exists(uri) else {"batches": {}}
    if isinstance(data, dict) and "batches" not in data and isinstance(data.get("posted"), dict):
        data = {"batches": {name: {**entry, "state": POSTED} if isinstance(entry, dict) else entry
                            for name, entry in data["posted"].items()}}  # the first format: posted batches only
    batches = data.get("batches") if isinstance(data, dict) else None
    if not isinstance(batches, dict) or not all(
            isinstance(e, dict) and e.get("state") in (POSTED, UNKNOWN, SENDING) for e in batches.values()):
        raise BadInput(f'{uri}: expected {{"batches": {{file name: {{"state": "posted" | "unknown", ...}}}}}}; '
                       "restore it, or remove it to post every batch again (the backend stores a batch sent twice twice)")
    return {name: {**entry, "state": UNKNOWN, "reason": _STOPPED_WHILE_SENDING} if entry["state"] == SENDING else entry
            for name, entry in batches.items()}


def _read_batch(uri: str) -> tuple[bytes, int]:
    """A batch file's bytes and its number of traces."""
    body = io.read_bytes(uri)
    try:
        batch = strict_json.loads(body.decode("utf-8"))
    except ValueError as e:
        raise BadInput(f"{uri}: not valid JSON ({e}); write the batch files again") from e
    if not isinstance(batch, list) or not batch:
        raise BadInput(f"{uri}: expected a non-empty JSON array of traces; write the batch files again")
    return body, len(batch)


def _send_batch(uri: str, url: str, record: _Record, post: Callable[[bytes, int, str], list[str]]) -> dict:
    """Post one batch and record how it ended; its new entry. A batch certainly not stored raises."""
    name = io.basename(uri)
    body, count = _read_batch(uri)
    before = record.batches.get(name)
    sent = {"traces": count, "api": logs.redact(url), "at": utc_now()}
    record.put(name, {**sent, "state": SENDING})  # a crash from here on leaves it unknown, never resent unasked
    try:
        ids = post(body, count, name)
    except _Unknown as e:
        entry = {**sent, "state": UNKNOWN, "reason": logs.redact(str(e)), "created_count": e.created_count,
                 "trace_ids": e.trace_ids}
    except JobError:
        record.put(name, before)  # not stored this time: what an earlier send left stands
        raise
    else:
        entry = {**sent, "state": POSTED, "created_count": count, "trace_ids": ids}
    record.put(name, entry)
    return entry


def _import_batch(uri: str, url: str, record: _Record, post: Callable[[bytes, int, str], list[str]],
                  resend_unknown: bool, summary: dict, log: Callable[[str], object]) -> None:
    """Skip a posted batch, report an unknown one (send it again only when asked), send the others."""
    name = io.basename(uri)
    entry = record.batches.get(name)
    if entry and entry["state"] == POSTED:
        summary["skipped"] += 1
        return
    if entry and not resend_unknown:
        summary["unknown_batches"].append(name)
        log(f"{name}: outcome unknown since {entry.get('at')} ({entry.get('reason')}); not sent again")
        return
    entry = _send_batch(uri, url, record, post)
    if entry["state"] == UNKNOWN:
        summary["unknown_batches"].append(name)
        log(f"{name}: outcome unknown: {entry['reason']}; not sent again unless asked")
    else:
        summary["posted"] += 1
        summary["created_count"] += entry["created_count"]
        log(f"{name}: {entry['created_count']} traces stored")


def unknown_advice(names: list[str]) -> str:
    """What to do about batches whose outcome is unknown."""
    return (f"{len(names)} batch(es) may or may not be stored in the backend: {', '.join(names)} (why: "
            f"{IMPORT_DIR}/{POSTED_FILE}). The endpoint has no idempotency key, so sending one again may store it "
            "twice. Check the backend for their traces (meta.run_id, meta.eval_item_id); then rerun the import "
            "with --resend-unknown to send them again, or leave them")


def _batch_files(import_dir: str) -> list[str]:
    files = sorted(
        uri for uri in io.listdir(import_dir)
        if io.basename(uri).startswith("traces-") and io.basename(uri).endswith(".json")
    )
    if not files:
        raise BadInput(f"{import_dir}: no traces-NNNNN.json batch files; run the job to produce them first")
    return files


def import_run(
    run_uri: str,
    api_base: str,
    *,
    resend_unknown: bool = False,
    timeout: float = 30,
    retries: int = 5,
    backoff: float = 1.0,
    log: Callable[[str], object] = print,
) -> dict:
    """Post every `{run}/import/traces-NNNNN.json` not yet posted, under the import's own lease.

    Batches posted earlier are skipped; unknown ones are reported and sent again only with
    `resend_unknown`. Returns {posted, skipped, created_count, unknown, unknown_batches}, and
    `what_to_do` when some are unknown.
    """
    import_dir = io.join(run_uri, IMPORT_DIR)
    files = _batch_files(import_dir)
    url = api_base.rstrip("/") + "/api/traces/batch"
    lost = threading.Event()
    summary: dict = {"posted": 0, "skipped": 0, "created_count": 0, "unknown": 0, "unknown_batches": []}

    def post(body: bytes, count: int, name: str) -> list[str]:
        if lost.is_set():  # another import may be posting now (gs:// only)
            raise Retriable(f"{import_dir}: the import's lease was lost; {name} was not sent. Run the import again")
        return _post_until_answered(url, body, count, name, timeout=timeout, retries=retries, backoff=backoff, log=log)

    with Lease(import_dir, on_lost=lambda reason: lost.set(), activity=_IMPORT_ACTIVITY, advice=_IMPORT_ADVICE):
        record = _Record(io.join(import_dir, POSTED_FILE))
        for uri in files:
            _import_batch(uri, url, record, post, resend_unknown, summary, log)
    summary["unknown"] = len(summary["unknown_batches"])
    if summary["unknown"]:
        summary["what_to_do"] = unknown_advice(summary["unknown_batches"])
    return summary
