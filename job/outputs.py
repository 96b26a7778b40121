"""What a run hands back: eval traces for the backend, import batches, _SUCCESS, the import client.

Every eval reply becomes a backend ReasoningTrace (clipped to the backend's limits so that one odd
reply never gets a whole batch rejected). Traces are written as batch files under
`{run}/import/`; `import_run` posts them to `POST /api/traces/batch`. That endpoint has no
idempotency key, so the client records each accepted batch in `import/posted.json` and a rerun
skips what was already stored.
"""

from __future__ import annotations

import http.client
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from job import io, strict_json
from job.provenance import utc_now
from job.errors import BadInput, Retriable
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


class _Transient(Exception):
    """A failure worth retrying (timeout, connection error, 5xx)."""


def _detail(body: bytes) -> str:
    """The server's `detail`, readable: a string as is, FastAPI's error list as "loc: msg" items."""
    try:
        detail = strict_json.loads(body.decode("utf-8", errors="replace")).get("detail")
    except (ValueError, AttributeError):
        return body.decode("utf-8", errors="replace")[:2000]
    if isinstance(detail, list):
        return "; ".join(
            ".".join(str(p) for p in e.get("loc", [])) + ": " + str(e.get("msg", e)) if isinstance(e, dict) else str(e)
            for e in detail[:20]
        ) + (f"; ... ({len(detail)} errors)" if len(detail) > 20 else "")
    return str(detail)


def _post(url: str, body: bytes, timeout: float) -> dict:
    request = urllib.request.Request(
        url, data=body, method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
    except urllib.error.HTTPError as e:
        detail = _detail(e.read())
        if e.code >= 500 or e.code in (408, 429):
            raise _Transient(f"HTTP {e.code}: {detail}") from e
        raise BadInput(f"{url} rejected the batch with HTTP {e.code}: {detail}") from e
    except (TimeoutError, socket.timeout) as e:
        raise _Transient(f"timed out after {timeout} s") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise _Transient(f"timed out after {timeout} s") from e
        raise _Transient(f"connection failed ({reason})") from e
    try:
        return strict_json.loads(payload.decode("utf-8"))
    except ValueError:  # not UTF-8, not JSON
        return {}  # stored, but the answer was unreadable: still recorded as posted


def import_run(
    run_uri: str,
    api_base: str,
    *,
    timeout: float = 30,
    retries: int = 5,
    backoff: float = 1.0,
    log: Callable[[str], object] = print,
) -> dict:
    """Post every `{run}/import/traces-NNNNN.json` not yet posted; returns {posted, skipped, created_count}."""
    import_dir = io.join(run_uri, IMPORT_DIR)
    posted_uri = io.join(import_dir, POSTED_FILE)
    files = sorted(
        uri for uri in io.listdir(import_dir)
        if io.basename(uri).startswith("traces-") and io.basename(uri).endswith(".json")
    )
    if not files:
        raise BadInput(f"{import_dir}: no traces-NNNNN.json batch files; run the job to produce them first")
    record = io.read_json(posted_uri) if io.exists(posted_uri) else {"posted": {}}
    if not isinstance(record, dict) or not isinstance(record.get("posted"), dict):
        raise BadInput(f'{posted_uri}: expected {{"posted": {{file name: ...}}}}; restore it or remove it to post every batch again')
    url = api_base.rstrip("/") + "/api/traces/batch"
    summary = {"posted": 0, "skipped": 0, "created_count": 0}

    for uri in files:
        name = io.basename(uri)
        if name in record["posted"]:
            summary["skipped"] += 1
            continue
        body = io.read_bytes(uri)
        try:
            batch = strict_json.loads(body.decode("utf-8"))
        except ValueError as e:  # not UTF-8, not JSON
            raise BadInput(f"{uri}: not valid JSON ({e}); write the batch files again") from e
        if not isinstance(batch, list) or not batch:
            raise BadInput(f"{uri}: expected a non-empty JSON array of traces; write the batch files again")
        count = len(batch)
        for attempt in range(retries + 1):
            try:
                answer = _post(url, body, timeout)
                break
            except _Transient as e:
                note = (" The server may have stored it anyway (the endpoint has no idempotency key); "
                        "check the backend for duplicates." if "timed out" in str(e) else "")
                if attempt == retries:
                    raise Retriable(
                        f"{url}: {name} not posted after {retries + 1} attempts ({e}).{note} "
                        "Run the import again; batches already posted are skipped."
                    ) from e
                wait = backoff * 2**attempt
                log(f"{name}: {e}; retrying in {wait:g} s.{note}")
                time.sleep(wait)
        created = answer.get("created_count", count)
        if created != count:
            log(f"{name}: the server reports {created} traces created for {count} sent")
        record["posted"][name] = {
            "created_count": created,
            "trace_ids": [t.get("id") for t in answer.get("traces", []) if isinstance(t, dict)],
            "posted_at": utc_now(),
        }
        io.write_json(posted_uri, record)  # before the next batch: a crash must not repost this one
        summary["posted"] += 1
        summary["created_count"] += created
        log(f"{name}: {created} traces stored")
    return summary
