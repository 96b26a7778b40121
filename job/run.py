"""The whole run, top to bottom: manifest -> data -> model -> eval before -> train -> eval after -> outputs.

Every artifact lands in the run directory `{output.uri}/{run_id}`. `status.json` says where the
run is; `_SUCCESS` is written last and only when everything else is there, so its absence means
the run did not finish, whatever else the directory holds. Rerunning a manifest lands in the same
directory: a finished run is left alone, an unfinished one resumes from its latest checkpoint with
the seed it recorded, and ends exactly where an uninterrupted run would have. One process at a
time: the run directory's lease (job/lease.py) is taken before anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import secrets
import signal
import tempfile
import threading
from collections.abc import Callable

import jax
from flax import nnx

import job
from job import distributed, io, logs, outputs, settings
from job.dataset import DataCounts, eval_batches, scan, training_batches
from job.errors import BadInput, JobError, Retriable
from job.evaluate import Decoder, EvalRun, evaluate, load_generations, save_generations
from job.formats import read_eval_items
from job.lease import LEASE_FILE, Lease
from job.manifest import Manifest, derive_run_id, load_manifest, run_dir
from job.model import BuiltModel, build_model, parameter_count, save_final
from job.report import build_delta_report, plot_loss_curve, render_markdown
from job.step_cache import code_digest
from job.tokens import load_tokenizer
from job.train import Prefetch, StepReport, Trainer, TrainResult

EVAL_BEFORE_GENERATIONS = "eval_before_generations.json"  # kept for a resumed run
VERSIONED_PACKAGES = ("google-tunix", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "qwix", "sentencepiece")


class Preempted(Retriable):
    """SIGTERM arrived (spot preemption, pod eviction): the run saved what it could; rerun to resume."""


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    found = {"tunix-rt-job": job.__version__, "python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def cache_dir() -> str:
    return settings.current().cache_dir


class Status:
    """status.json, rewritten as the run moves."""

    def __init__(self, run_uri: str, total_steps: int):
        self.uri = io.join(run_uri, "status.json")
        self.fields = {"state": "validating", "step": 0, "total_steps": total_steps, "last_loss": None}

    def set(self, **fields) -> None:
        self.fields.update(fields, updated_at=utc_now())
        if distributed.is_main():
            io.write_json(self.uri, logs.redact(self.fields))


class Metrics:
    """metrics.jsonl: one line per logged step (and per eval-loss point); kept across resumes."""

    def __init__(self, run_uri: str, log_every: int):
        self.uri = io.join(run_uri, "metrics.jsonl")
        self.log_every = log_every
        self.lines: list[dict] = []

    def resume_from(self, step: int) -> None:
        """Keep what an earlier attempt logged up to the step its checkpoint restores."""
        if step and io.exists(self.uri):
            old = [json.loads(line) for line in io.read_text(self.uri).splitlines() if line.strip()]
            # Eval points at the restored step are logged again by the resumed trainer (or not at all).
            self.lines = [line for line in old if line["step"] < step or (line["step"] == step and "loss" in line)]

    def add(self, line: dict) -> None:
        """Add a line; one for a step already there (reported early, before a checkpoint) replaces it."""
        kind = "loss" if "loss" in line else "eval_loss"
        for i, old in enumerate(self.lines):
            if old["step"] == line["step"] and kind in old:
                self.lines[i] = line
                return
        self.lines.append(line)

    def flush(self) -> None:
        if distributed.is_main():
            io.write_text(self.uri, "".join(json.dumps(line) + "\n" for line in self.lines))

    @property
    def losses(self) -> list[dict]:
        return [line for line in self.lines if "loss" in line or "eval_loss" in line]


def configure_compile_cache() -> str | None:
    """JAX's persistent compilation cache in $JAX_COMPILATION_CACHE_DIR (a local path, or gs://...), if given.

    A retried, resumed or repeated run then loads the train step and the sampler instead of
    compiling them again (step_cache keeps the exported train and eval steps there too). Every
    compilation is cached (JAX skips those under 1 s by default;
    $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS still wins when set).
    """
    path = settings.current().compile_cache_dir
    if not path:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    if settings.current().compile_cache_min_s is None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def run_job(manifest_uri: str, overrides: list[str] = (), fresh: bool = False,
            stop: threading.Event | None = None) -> int:
    """Run a manifest to a finished run directory. Returns 0, or raises JobError with its exit code.

    `stop`, set by a SIGTERM that came before the run's own handler, stops it at its first boundary.
    """
    stop = stop or threading.Event()
    configure_compile_cache()
    m = load_manifest(manifest_uri, overrides)
    run_id = derive_run_id(m)
    run_uri = run_dir(m, run_id)
    if not fresh and _succeeded(run_uri):
        return 0
    if stop.is_set():
        raise Preempted("SIGTERM before the run started: nothing to save; run the same manifest again")
    run = Run(m, run_id, run_uri, manifest_uri, stop)
    # Nothing is written (not even --fresh's removal) before the run's lease is held: process 0 holds it
    # for all the processes of a multi-host run.
    lease = Lease(run_uri, on_lost=run.lose_lease) if distributed.is_main() else contextlib.nullcontext()
    with lease:
        if fresh and distributed.is_main():
            logs.warning("fresh run requested: removing the previous run directory", run_dir=run_uri)
            for child in io.listdir(run_uri):
                if io.basename(child) != LEASE_FILE:
                    io.remove(child, recursive=True)
        distributed.barrier("started")  # every process sees the same run directory
        if not fresh and _succeeded(run_uri):  # another process finished it while this one waited for the lease
            return 0
        return run.execute()


def _on(mesh):
    """`with _on(mesh)`: inside the mesh, or nothing on one device."""
    return mesh if mesh is not None else contextlib.nullcontext()


def _succeeded(run_uri: str) -> bool:
    if io.exists(io.join(run_uri, outputs.SUCCESS_FILE)):
        logs.info("this run already succeeded; nothing to do (pass --fresh to run it again)", run_dir=run_uri)
        return True
    return False


class Run:
    def __init__(self, m: Manifest, run_id: str, run_uri: str, manifest_uri: str, stop: threading.Event):
        self.m, self.run_id, self.run_uri, self.manifest_uri = m, run_id, run_uri, manifest_uri
        self.status = Status(run_uri, m.training.steps)
        self.metrics = Metrics(run_uri, m.training.log_every_steps)
        # Set by SIGTERM. Never raise from the signal handler: libraries (JAX's compile cache, for one)
        # catch broad exceptions and would swallow it. Training stops after its current step; other
        # phases stop at the next phase boundary.
        self.stop = stop
        self.stop_reason = "SIGTERM"
        self.resumed_from = 0
        self.record: dict = {}

    def path(self, *parts: str) -> str:
        return io.join(self.run_uri, *parts)

    # -- the run ---------------------------------------------------------------------------------

    def execute(self) -> int:
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        distributed.on_peer_failure(lambda code, message: self._safe_status(
            state="preempted" if code == Preempted.exit_code else "failed", error=message))
        try:
            self._run()
            return 0
        except Preempted as err:
            self._safe_status(state="preempted", error=str(err))
            raise
        except JobError as err:
            self._safe_status(state="failed", error=str(err))
            raise
        except Exception as err:
            self._safe_status(state="failed", error=f"{type(err).__name__}: {err}")
            if transient_cause(err):  # e.g. Orbax/tensorstore giving up on an unreachable bucket
                raise Retriable(f"storage or network error ({type(err).__name__}: {err}); "
                                "run the same manifest again to resume") from err
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _run(self) -> None:
        m = self.m
        logs.info("run starting", run_id=self.run_id, run_dir=self.run_uri)
        self.status.set(state="validating")
        seed = self._seed()
        if m.seed is None:  # generated (31 bits) or read back by each process: process 0's stands
            seed = distributed.same_everywhere(seed)
        self.record = {
            "run_id": self.run_id, "seed": seed, "manifest_uri": self.manifest_uri,
            "manifest": json.loads(m.model_dump_json()), "versions": versions(),
            "image": settings.current().image,
            "devices": [str(d) for d in jax.devices()], "backend": jax.default_backend(),
            "compile_cache": settings.current().compile_cache_dir,
            "processes": jax.process_count(),
            "settings": settings.current().as_record(),
            "started_at": utc_now(), "ended_at": None,
        }
        self._write_record()

        tokenizer = load_tokenizer(m.model.tokenizer_uri)
        eval_digest = hashlib.sha256()
        items = read_eval_items(m.eval.uri, m.eval.limit, eval_digest)
        counts, held_out = self._validate_data(tokenizer)
        self.record.update(dataset_sha256=counts.sha256, eval_sha256=eval_digest.hexdigest(), data=counts.as_dict())
        self._write_record()
        self._stop_if_asked()

        mesh = distributed.build_mesh(m.training.mesh)
        distributed.check_batch(m.training.batch_size, mesh)
        # Started now, the training stream fills its shuffle buffer while the model is built and
        # evaluated: the first step does not wait for it.
        with Prefetch(distributed.local_batches(training_batches(m, tokenizer, seed), mesh)) as train_stream:
            built, decoder = self._build_model(tokenizer, seed, mesh)
            self.status.set(state="evaluating", phase="before")
            before = self._evaluate_before(decoder, items)
            self._stop_if_asked()
            result = self._train(built, train_stream, held_out, mesh)
        if result.stopped_early:
            self.status.set(step=result.end_step)
            raise Preempted(f"stopped at step {result.end_step} of {m.training.steps} on {self.stop_reason}; "
                            "the checkpoint is saved: run the same manifest again to resume")
        self.record["training"] = {"resumed_from_step": result.start_step, "steps": result.end_step}

        self.status.set(state="evaluating", phase="after", step=result.end_step)
        after = self._evaluate(decoder(), items, "after")
        self._stop_if_asked()
        logs.info("writing outputs", run_dir=self.run_uri)
        with _on(mesh):
            save_final(built, self.path("final"), m.model, m.training.lora, tokenizer.processor.serialized_model_proto())
        # _SUCCESS must mean every process finished its part; then process 0 alone writes the outputs.
        distributed.barrier("finished")
        if distributed.is_main():
            self._write_outputs(before, after, counts)
        distributed.barrier("outputs-written")

    def _build_model(self, tokenizer, seed: int, mesh) -> tuple[BuiltModel, Callable[[], Decoder]]:
        """The model, laid out on the mesh, and a maker of decoders for its weights as they are now."""
        m = self.m
        built = build_model(m.model, m.training.lora, seed, tokenizer.vocab_size, cache_dir())
        built = dataclasses.replace(built, model=distributed.shard_model(built.model, mesh))
        self.record["parameters"] = {"total": parameter_count(built.model),
                                     "trainable": parameter_count(built.model, _trainable_kind(m))}
        shared_decoder = Decoder(built.model, built.config, tokenizer, m.eval)

        def decoder() -> Decoder:
            # Sharded weights: decode with a whole local copy of them as they are now (no collectives).
            if mesh is None:
                return shared_decoder
            return Decoder(distributed.local_replica(built.model, mesh), built.config, tokenizer, m.eval)

        return built, decoder

    def _train(self, built: BuiltModel, train_stream: Prefetch, held_out: list, mesh) -> TrainResult:
        m = self.m
        self.status.set(state="training", phase=None)
        with tempfile.TemporaryDirectory(prefix="tensorboard-") as tb_dir, _on(mesh):
            holdout_batches = list(distributed.local_batches(eval_batches(m, held_out), mesh))
            trainer = Trainer(built.model, m.training, self.path("checkpoints"), tb_dir,
                              self._on_step, self._on_eval, len(holdout_batches), self.stop,
                              on_checkpoint=self._on_checkpoint)
            self.resumed_from = trainer.restored_step
            self.metrics.resume_from(self.resumed_from)
            if self.resumed_from:
                logs.info("resuming from checkpoint", step=self.resumed_from)
            result = trainer.train(train_stream, holdout_batches)
            self.metrics.flush()
            if distributed.is_main():  # Tunix logs TensorBoard on process 0 only
                io.upload(tb_dir, self.path("tensorboard"))
        return result

    def _seed(self) -> int:
        """The manifest's seed; else the one an earlier attempt of this run recorded; else a new one."""
        if self.m.seed is not None:
            return self.m.seed
        record_uri = self.path("run_manifest.json")
        if io.exists(record_uri):
            return int(io.read_json(record_uri)["seed"])
        seed = secrets.randbits(31)
        logs.info("no seed in the manifest: generated one", seed=seed)
        return seed

    def _validate_data(self, tokenizer) -> tuple[DataCounts, list]:
        m = self.m
        logs.info("scanning the dataset", uri=m.dataset.uri)
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as rejects:
            def on_reject(r):
                rejects.write(json.dumps({"uri": logs.redact(r.uri), "line": r.line, "reason": r.reason, "raw": r.raw}) + "\n")
            counts, held_out = scan(m, tokenizer, on_reject)
        try:
            if distributed.is_main():
                io.upload(rejects.name, self.path("rejects.jsonl"))
        finally:
            os.unlink(rejects.name)
        logs.info("dataset scanned", **{k: v for k, v in counts.as_dict().items() if k != "reject_reasons"})
        for r in counts.first_rejects:
            logs.warning("rejected record", where=f"{r.uri}:{r.line}", reason=r.reason)
        if counts.reject_fraction > m.dataset.max_reject_fraction:
            raise BadInput(f"{m.dataset.uri}: {counts.rejected} of {counts.read} records rejected "
                           f"({counts.reject_fraction:.1%} > dataset.max_reject_fraction={m.dataset.max_reject_fraction}); "
                           f"reasons: {dict(counts.reasons.most_common(5))}; every reject is in {self.path('rejects.jsonl')}")
        if counts.trained < 1:
            raise BadInput(f"{m.dataset.uri}: no records left to train on ({counts.accepted} accepted, "
                           f"{counts.held_out} held out by dataset.holdout)")
        return counts, held_out

    def _evaluate_before(self, decoder: Callable[[], Decoder], items) -> EvalRun:
        """The eval before training, decoded once per run: its generations are kept in the run directory,
        and a resumed run with the same model, seed, eval set, template, decoding settings, versions,
        devices and job code reads them back instead of decoding the whole eval again."""
        uri = self.path(EVAL_BEFORE_GENERATIONS)
        m, record = self.m, self.record
        key = hashlib.sha256(json.dumps({
            "model": m.model.model_dump(mode="json"), "lora": m.training.lora and m.training.lora.model_dump(mode="json"),
            "template": m.template.model_dump(mode="json"), "eval": m.eval.model_dump(mode="json"),
            "code": code_digest(), **{k: record[k] for k in ("seed", "eval_sha256", "versions", "devices", "backend")},
        }, sort_keys=True).encode("utf-8")).hexdigest()
        saved = load_generations(uri, key, items)
        # Decoding a sharded model gathers its weights (a collective): every process reuses, or none does.
        if distributed.same_everywhere(int(saved is not None)):
            logs.info("eval before reused", n=len(items), saved=uri)
            return saved or EvalRun([], 0.0, 0)  # a process that could not read it: only process 0's are written
        run = self._evaluate(decoder(), items, "before")
        if distributed.is_main():
            save_generations(uri, key, run)
        return run

    def _evaluate(self, decoder: Decoder, items, phase: str) -> EvalRun:
        logs.info(f"eval {phase} starting", items=len(items))
        run = evaluate(decoder, items, self.m.template)
        n = len(run.results)
        logs.info(f"eval {phase}", n=n,
                  strict=sum(r.score.strict for r in run.results) / n,
                  flexible=sum(r.score.flexible for r in run.results) / n,
                  seconds=round(run.seconds, 2), tokens_per_s=round(run.tokens_per_s, 1))
        return run

    def _on_step(self, report: StepReport) -> None:
        line = {"step": report.step, "loss": report.loss, "learning_rate": report.learning_rate,
                "tokens_per_s": round(report.tokens_per_s, 1), "elapsed_s": round(report.elapsed_s, 3)}
        self.metrics.add(line)
        spec = self.m.training
        if report.step % spec.log_every_steps == 0 or report.step == spec.steps:
            logs.info("train", **line)
            self.status.set(step=report.step, last_loss=report.loss)
        if report.step % spec.log_every_steps == 0:
            self.metrics.flush()

    def _on_checkpoint(self, step: int) -> None:
        # Before the save: the metrics a resumed run keeps reach storage first.
        self.metrics.flush()
        logs.info("saving checkpoint", step=step)

    def _on_eval(self, step: int, eval_loss: float) -> None:
        every = self.m.training.eval_every_steps or self.m.training.steps + 1
        if step and step == self.resumed_from and step % every:
            return  # Tunix evaluates when it resumes; an uninterrupted run has no eval point here
        self.metrics.add({"step": step, "eval_loss": eval_loss})
        logs.info("eval loss", step=step, eval_loss=eval_loss)

    def _write_outputs(self, before: EvalRun, after: EvalRun, counts: DataCounts) -> None:
        m = self.m
        traces = {}
        for phase, run in (("before", before), ("after", after)):
            traces[phase] = [outputs.eval_trace(r, phase, self.run_id) for r in run.results]
            io.write_text(self.path(f"eval_{phase}.jsonl"), "".join(json.dumps(t) + "\n" for t in traces[phase]))
        batch_uris = outputs.write_import_batches(self.run_uri, traces["before"] + traces["after"])

        decode = {"strategy": "greedy", "temperature": 0.0, "max_new_tokens": m.eval.max_new_tokens,
                  "max_prompt_len": m.eval.max_prompt_len, "batch_size": m.eval.batch_size,
                  "stop_tokens": ["<end_of_turn>", "<eos>"],
                  "tokens_per_s": {"before": round(before.tokens_per_s, 1), "after": round(after.tokens_per_s, 1)}}
        data = counts.as_dict()
        report = build_delta_report(before.results, after.results, run_id=self.run_id, eval_uri=logs.redact(m.eval.uri),
                                    eval_sha256=self.record["eval_sha256"], decode=decode,
                                    losses=self.metrics.losses, data_counts=data)
        with tempfile.TemporaryDirectory() as tmp:
            png = os.path.join(tmp, "loss_curve.png")
            plot_loss_curve(self.metrics.losses, png)
            io.upload(png, self.path("loss_curve.png"))
        io.write_json(self.path("delta_report.json"), report)
        io.write_text(self.path("delta_report.md"), render_markdown(report))

        self.record["ended_at"] = utc_now()
        self._write_record()
        self.status.set(state="succeeded", phase=None)
        artifacts = ["run_manifest.json", "status.json", "metrics.jsonl", "rejects.jsonl", "eval_before.jsonl",
                     "eval_after.jsonl", "delta_report.json", "delta_report.md", "loss_curve.png"]
        artifacts += [f"{outputs.IMPORT_DIR}/{io.basename(u)}" for u in batch_uris]
        artifacts += _files_under(self.path("final"), "final")
        outputs.write_success(self.run_uri, artifacts)
        logs.info("run succeeded", run_dir=self.run_uri,
                  flexible_before=report["before"]["flexible_accuracy"], flexible_after=report["after"]["flexible_accuracy"])

    def _write_record(self) -> None:
        if distributed.is_main():
            io.write_json(self.path("run_manifest.json"), logs.redact(self.record))

    def _safe_status(self, **fields) -> None:
        """Best effort, one attempt each: the failure itself may be the storage."""
        with io.single_attempt():
            with contextlib.suppress(Exception):
                self.status.set(**fields)
            if self.record:
                with contextlib.suppress(Exception):
                    self.record["ended_at"] = utc_now()
                    self._write_record()

    def lose_lease(self, reason: str) -> None:
        """Another process owns the run directory now: stop like on SIGTERM, at the next boundary."""
        self.stop_reason = f"losing the run's lease ({reason})"
        self.stop.set()

    def _on_sigterm(self, signum, frame) -> None:
        logs.warning("SIGTERM: stopping (during training: after the current step, with a checkpoint)")
        self.stop.set()

    def _stop_if_asked(self) -> None:
        # Every process passes the same boundaries: agreeing here stops them all at the same one.
        if distributed.any_process(self.stop.is_set()):
            raise Preempted(f"stopped by {self.stop_reason}; run the same manifest again to resume")


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


def _trainable_kind(m: Manifest):
    return nnx.LoRAParam if m.training.lora is not None else nnx.Param


def _files_under(uri: str, prefix: str) -> list[str]:
    found = []
    for child in io.listdir(uri):
        name = f"{prefix}/{io.basename(child)}"
        sub = io.listdir(child)
        found.extend(_files_under(child, name) if sub else [name])
    return found
