"""The run directory `{output.uri}/{run_id}`: its paths, its lease, and every file the run writes there.

Process 0 writes the run directory's files; on every other process each write here is a no-op, so
no caller asks which process it is. Files that all processes write together (Orbax checkpoints,
the final weights) are written by their own code and then registered here.

Each file written (or registered) as an artifact is listed in `_SUCCESS`, with its size and sha256,
when the run ends: adding an artifact is writing it through this module, nothing else. `_SUCCESS` is
written last and only when everything else is there, so its absence means the run did not finish.

Files:
- `run_manifest.json`: the run record (`RunRecord`): seed, resolved manifest, versions, input hashes,
  the run's identity (identity.py), and `format`, the mark that this job made the directory: the
  job writes into, and deletes in, only a directory that is missing, empty or so marked.
- `status.json`: where the run is (`Status`), rewritten as it moves.
- `metrics.jsonl`: one JSON line per logged step and per eval-loss point. While the run trains they
  are appended as numbered segments, `metrics/segment-NNNNNN.jsonl`, one per flush holding only the
  lines since the one before (a line for a step seen before replaces it: read the segments in order,
  the last line for a step and kind wins), so a long run writes each line about once; at the end
  `metrics.jsonl` holds them all, one line per step and kind.
- `rejects.jsonl`, `eval_before.jsonl`, `eval_after.jsonl`, `delta_report.{json,md}`,
  `loss_curve.png`, `import/traces-NNNNN.json`, `final/`, `tensorboard/`: the run's results.
- Kept for the run itself, not artifacts: `_LEASE`, `checkpoints/`, `eval_before_generations.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator

from job import distributed, io, logs, strict_json
from job.errors import BadInput
from job.lease import LEASE_FILE, Lease
from job.manifest import Manifest, derive_run_id, run_dir
from job.provenance import utc_now

RUN_FORMAT = "tunix-rt-job/run/1"  # in run_manifest.json: the mark of a directory this job made
RUN_RECORD = "run_manifest.json"
STATUS = "status.json"
METRICS = "metrics.jsonl"
METRICS_SEGMENTS = "metrics"
REJECTS = "rejects.jsonl"
CHECKPOINTS = "checkpoints"
FINAL = "final"
TENSORBOARD = "tensorboard"
EVAL_BEFORE_GENERATIONS = "eval_before_generations.json"  # kept for a resumed run
SUCCESS_FILE = "_SUCCESS"


def preflight(m: Manifest, manifest_uri: str) -> RunDir:
    """The run directory, once shown to be one the run may write, and the mesh shown to fit the batch:
    the checks `run` makes before anything is written (the lease included), made by `validate` too.
    BadInput names the field to change; nothing is created."""
    rundir = RunDir(run_dir(m, derive_run_id(m)))
    rundir.refuse_unwritable()
    rundir.refuse_inputs_inside({"the manifest": manifest_uri, "dataset.uri": m.dataset.uri, "eval.uri": m.eval.uri,
                                 "model.weights_uri": m.model.weights_uri, "model.tokenizer_uri": m.model.tokenizer_uri})
    rundir.refuse_if_not_ours()
    distributed.check_mesh_spec(m.training.mesh, m.training.batch_size)
    return rundir


@dataclasses.dataclass
class RunRecord:
    """run_manifest.json: what this run is and what it was made with; filled in as the run learns it."""

    format: str
    run_id: str
    seed: int
    manifest_uri: str
    manifest: dict
    versions: dict
    settings: dict
    image: str | None
    devices: list[str]
    backend: str
    compile_cache: str | None
    processes: int
    started_at: str
    identity: dict  # identity.py: what a later attempt must match
    ended_at: str | None = None
    dataset_sha256: str | None = None
    eval_sha256: str | None = None
    data: dict | None = None
    parameters: dict | None = None
    training: dict | None = None


class RunDir:
    """One run directory. `writer`: whether this process writes (process 0 of a multi-process run)."""

    def __init__(self, uri: str, writer: bool | None = None):
        self.uri = uri
        self.writer = distributed.is_main() if writer is None else writer
        self._artifacts: dict[str, None] = {}  # relative paths, in the order written

    def path(self, *parts: str) -> str:
        return io.join(self.uri, *parts)

    # -- the directory as a whole ---------------------------------------------------------------

    def lease(self, on_lost: Callable[[str], None]) -> contextlib.AbstractContextManager:
        """The run directory's lease, held by process 0 for all the processes of a run."""
        return Lease(self.uri, on_lost=on_lost) if self.writer else contextlib.nullcontext()

    def succeeded(self) -> bool:
        return io.exists(self.path(SUCCESS_FILE))

    def refuse_inputs_inside(self, inputs: dict[str, str | None]) -> None:
        """BadInput when an input ({field: uri}) lies inside the run directory, or the run directory
        inside an input: the run would write over (or --fresh delete) what it reads."""
        for field, uri in inputs.items():
            if uri and (io.is_within(uri, self.uri) or io.is_within(self.uri, uri)):
                where = "inside" if io.is_within(uri, self.uri) else "around"
                raise BadInput(f"{field}: {uri} lies {where} the run directory {self.uri}; nothing was written. "
                               "Choose an output.uri (or run_id) apart from the run's inputs")

    def refuse_unwritable(self) -> None:
        """BadInput when the run directory could not be made or written: locally, when its nearest
        existing folder is a file or not writable by this user. Creates nothing. An object store
        says so itself at the first write (exit 2 naming the URI and the role to grant)."""
        if not io.is_local(self.uri):
            return
        nearest = io.local_path(self.uri)
        while not os.path.lexists(nearest):
            nearest = os.path.dirname(nearest)
        if not os.path.isdir(nearest):
            raise BadInput(f"output.uri: the run directory {self.uri} cannot be made: {nearest} is a file, "
                           "not a folder; nothing was written. Choose another output.uri (or run_id)")
        if not os.access(nearest, os.W_OK | os.X_OK):
            raise BadInput(f"output.uri: the run directory {self.uri} cannot be written: {nearest} is not "
                           "writable by this user; nothing was written. Make it writable or choose another output.uri")

    def refuse_if_not_ours(self) -> None:
        """BadInput unless the directory is missing, empty, holds only a lease, or was made by this job
        (its run_manifest.json says so): the job writes and deletes only in run directories it made."""
        names = sorted(io.basename(child) for child in io.listdir(self.uri))
        if set(names) <= {LEASE_FILE} or _made_by_this_job(self.read_record()):
            return
        shown = ", ".join(names[:10]) + (f", ... ({len(names)} entries)" if len(names) > 10 else "")
        raise BadInput(f"{self.uri} exists and is not a run directory of this job (no {RUN_RECORD} written by it); "
                       f"it holds: {shown}. Nothing was touched. Choose another output.uri or run_id")

    def clear(self) -> None:
        """Remove everything an earlier run left here but the lease (held by this run now)."""
        if self.writer:
            for child in io.listdir(self.uri):
                if io.basename(child) != LEASE_FILE:
                    io.remove(child, recursive=True)

    # -- writes -----------------------------------------------------------------------------------

    def write_text(self, name: str, text: str, artifact: bool = True) -> None:
        """Text, with credentials redacted (logs.redact): no file of the run directory holds one."""
        if self.writer:
            io.write_text(self.path(name), logs.redact(text))
            self._register(name, artifact)

    def write_bytes(self, name: str, data: bytes, artifact: bool = True) -> None:
        if self.writer:
            io.write_bytes(self.path(name), data)
            self._register(name, artifact)

    def write_json(self, name: str, obj, artifact: bool = True) -> None:
        self.write_text(name, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", artifact)

    def write_jsonl(self, name: str, lines: list[dict], artifact: bool = True) -> None:
        self.write_text(name, "".join(json.dumps(line) + "\n" for line in lines), artifact)

    def upload(self, local: str, name: str) -> None:
        """A local file, or every file of a local folder, copied to `name` and registered."""
        if self.writer:
            io.upload(local, self.path(name))
            if os.path.isdir(local):
                for root, _, files in os.walk(local):
                    for file in sorted(files):
                        self._register(f"{name}/{os.path.relpath(os.path.join(root, file), local)}", True)
            else:
                self._register(name, True)

    def write_with(self, name: str, produce: Callable[[str], None]) -> None:
        """`produce(local_path)` makes the file (on the writing process only), then it is uploaded."""
        if self.writer:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, io.basename(name))
                produce(local)
                self.upload(local, name)

    def register_tree(self, name: str) -> None:
        """Register every file under `name`, written by all processes together (Orbax)."""
        if self.writer:
            for relative in _files_under(self.path(name), name):
                self._register(relative, True)

    def _register(self, name: str, artifact: bool) -> None:
        if artifact:
            self._artifacts[name] = None

    @property
    def artifacts(self) -> list[str]:
        return list(self._artifacts)

    def write_success(self) -> None:
        """`_SUCCESS`, listing every artifact written with its size and sha256: the run's last write."""
        if self.writer:
            entries = [{"path": name, "size": io.size(self.path(name)), "sha256": io.sha256(self.path(name))}
                       for name in self._artifacts]
            io.write_json(self.path(SUCCESS_FILE), {"artifacts": entries, "written_at": utc_now()})

    # -- the run record ---------------------------------------------------------------------------

    def write_record(self, record: RunRecord) -> None:
        self.write_json(RUN_RECORD, dataclasses.asdict(record))

    def read_record(self) -> dict | None:
        """The run record an earlier attempt wrote, or None when there is none or it is not one."""
        uri = self.path(RUN_RECORD)
        if not io.exists(uri):
            return None
        try:
            record = io.read_json(uri)
        except (BadInput, ValueError):  # not JSON (or not JSON the job can read): not a record of this job
            return None
        return record if isinstance(record, dict) else None


def _made_by_this_job(record: dict | None) -> bool:
    # Run directories made before the format mark carry the job's version among their versions.
    return record is not None and (record.get("format") == RUN_FORMAT
                                   or "tunix-rt-job" in (record.get("versions") or {}))


def _files_under(uri: str, prefix: str) -> Iterator[str]:
    for child in io.listdir(uri):
        name = f"{prefix}/{io.basename(child)}"
        if io.listdir(child):
            yield from _files_under(child, name)
        else:
            yield name


class Status:
    """status.json, rewritten as the run moves."""

    def __init__(self, run_dir: RunDir, total_steps: int):
        self.dir = run_dir
        self.fields = {"state": "validating", "step": 0, "total_steps": total_steps, "last_loss": None}

    def set(self, **fields) -> None:
        self.fields.update(fields, updated_at=utc_now())
        self.dir.write_json(STATUS, self.fields)


class Metrics:
    """metrics.jsonl: one line per logged step (and per eval-loss point); kept across resumes.

    Flushed as numbered segments of the lines added since the last flush (module docstring), and
    whole at the end (`write_whole`).
    """

    def __init__(self, run_dir: RunDir):
        self.dir = run_dir
        self._lines: dict[tuple[int, str], dict] = {}  # by (step, kind), in first-seen order
        self._unflushed: list[dict] = []
        self._next_segment = 0

    def resume_from(self, step: int) -> None:
        """Keep what an earlier attempt logged up to the step its checkpoint restores; its segments
        are replaced by one of those lines (a killed attempt's later lines must not linger)."""
        old_segments = self._segment_uris()
        if old_segments:
            self._next_segment = _segment_number(old_segments[-1]) + 1
        self._lines = {}
        if step:
            for line in self._read(self.dir.path(METRICS)) + [line for uri in old_segments for line in self._read(uri)]:
                # Eval points at the restored step are logged again by the resumed trainer (or not at all).
                if line["step"] < step or (line["step"] == step and "loss" in line):
                    self._lines[_key(line)] = line
        self._unflushed = self.lines
        if old_segments:
            self.flush()
            if self.dir.writer:
                for uri in old_segments:
                    io.remove(uri)

    def add(self, line: dict) -> None:
        """Add a line; one for a step already there (reported early, before a checkpoint) replaces it."""
        self._lines[_key(line)] = line
        self._unflushed.append(line)

    def flush(self) -> None:
        """Append the lines added since the last flush as the next segment."""
        if self._unflushed:
            name = f"{METRICS_SEGMENTS}/segment-{self._next_segment:06d}.jsonl"
            self.dir.write_jsonl(name, self._unflushed, artifact=False)
            self._next_segment += 1
            self._unflushed = []

    def write_whole(self) -> None:
        self.flush()
        self.dir.write_jsonl(METRICS, self.lines)

    @property
    def lines(self) -> list[dict]:
        return list(self._lines.values())

    @property
    def losses(self) -> list[dict]:
        return [line for line in self.lines if "loss" in line or "eval_loss" in line]

    def _segment_uris(self) -> list[str]:
        folder = self.dir.path(METRICS_SEGMENTS)
        if not io.exists(folder):
            return []
        return sorted(uri for uri in io.listdir(folder) if io.basename(uri).startswith("segment-"))

    @staticmethod
    def _read(uri: str) -> list[dict]:
        """The metric lines of a file an earlier attempt wrote; one that is not a metric line is exit 2."""
        if not io.exists(uri):
            return []
        lines = []
        for number, text in enumerate(io.read_text(uri).splitlines(), 1):
            if text.strip():
                try:
                    line = strict_json.loads(text)
                except ValueError as err:
                    line = err
                if not isinstance(line, dict) or not isinstance(line.get("step"), int):
                    raise BadInput(f"{uri}:{number}: not a metrics line ({line}); restore the file, or remove it "
                                   "to resume without the metrics logged so far")
                lines.append(line)
        return lines


def _key(line: dict) -> tuple[int, str]:
    return line["step"], "loss" if "loss" in line else "eval_loss"


def _segment_number(uri: str) -> int:
    return int(io.basename(uri).removeprefix("segment-").removesuffix(".jsonl"))
