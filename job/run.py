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
import hashlib
import json
import os
import secrets
import tempfile
from collections.abc import Callable

import jax
from flax import nnx

from job import distributed, identity, io, logs, outputs, settings, tunix_compat
from job.dataset import DataCounts, eval_batches, scan, training_batches, unusable
from job.errors import BadInput, JobError, Retriable, transient_cause
from job.evaluate import Decoder, EvalRun, evaluate, generations_record, load_generations
from job.formats import STOP_TOKENS, read_eval_items
from job.manifest import Manifest, derive_run_id, load_manifest
from job.model import BuiltModel, build_model, final_description, parameter_count, save_final_weights
from job.provenance import program_key, utc_now, versions
from job.report import build_delta_report, plot_loss_curve, render_markdown
from job.rundir import (CHECKPOINTS, EVAL_BEFORE_GENERATIONS, FINAL, REJECTS, RUN_FORMAT, TENSORBOARD, Metrics,
                        RunDir, RunRecord, Status, preflight)
from job.step_cache import configure_compile_cache
from job.stopping import StopRequest
from job.template import eval_prompts
from job.tokens import load_tokenizer
from job.train import Prefetch, StepReport, Trainer, TrainResult


class Preempted(Retriable):
    """A stop was asked (SIGTERM, Ctrl-C, a lost lease): the run saved what it could; rerun to resume."""


def run_job(manifest_uri: str, overrides: list[str] = (), fresh: bool = False,
            stop: StopRequest | None = None) -> int:
    """Run a manifest to a finished run directory. Returns 0, or raises JobError with its exit code.

    `stop` (set by SIGTERM or Ctrl-C, job/stopping.py) stops the run at its next safe point.
    """
    stop = stop or StopRequest()
    configure_compile_cache()
    m = load_manifest(manifest_uri, overrides)
    rundir = preflight(m, manifest_uri)  # before anything is written, the lease included
    if not fresh and _finished(m, rundir):
        return 0
    if stop.is_set():
        raise Preempted(f"{stop.reason} before the run started: nothing to save; run the same manifest again")
    run = Run(m, derive_run_id(m), rundir, manifest_uri, stop)
    # Nothing is written (not even --fresh's removal) before the run's lease is held.
    with rundir.lease(on_lost=run.lose_lease):
        if fresh:
            logs.warning("fresh run requested: removing the previous run directory", run_dir=rundir.uri)
            rundir.clear()
        distributed.barrier("started")  # every process sees the same run directory
        if not fresh and _finished(m, rundir):  # another process finished it while this one waited for the lease
            return 0
        return run.execute()


def _finished(m: Manifest, rundir: RunDir) -> bool:
    """True when this run already succeeded there; BadInput when another run (another identity) did."""
    if not rundir.succeeded():
        return False
    recorded = rundir.read_record() or {}
    if recorded.get("identity"):
        identity.refuse_another_run(rundir.uri, recorded, m, {})
        # The data too: read again (without writing anything) and compared by content.
        tokenizer = load_tokenizer(m.model.tokenizer_uri)
        eval_digest = hashlib.sha256()
        read_eval_items(m.eval.uri, m.eval.limit, eval_digest)
        counts, _ = scan(m, tokenizer)
        identity.refuse_another_run(rundir.uri, recorded, m, {"dataset_sha256": counts.sha256,
                                                              "eval_sha256": eval_digest.hexdigest()})
    logs.info("this run already succeeded; nothing to do (pass --fresh to run it again)", run_dir=rundir.uri)
    return True


def _on(mesh):
    """`with _on(mesh)`: inside the mesh, or nothing on one device."""
    return mesh if mesh is not None else contextlib.nullcontext()


class Run:
    """One attempt at a run: the flow, in `_run`, top to bottom; the run directory keeps the files."""

    def __init__(self, m: Manifest, run_id: str, rundir: RunDir, manifest_uri: str, stop: StopRequest):
        self.m, self.run_id, self.dir, self.manifest_uri = m, run_id, rundir, manifest_uri
        self.status = Status(rundir, m.training.steps)
        self.metrics = Metrics(rundir)
        self.stop = stop  # training stops after its current step; other phases at the next phase boundary
        self.resumed_from = 0
        self.record: RunRecord | None = None

    # -- the run ---------------------------------------------------------------------------------

    def execute(self) -> int:
        distributed.on_peer_failure(lambda code, message: self._safe_status(
            state="preempted" if code == Preempted.exit_code else "failed", error=message))
        # Taken (again) here: jax.distributed.initialize installs a SIGTERM handler of its own.
        with self.stop.handling_signals():
            return self._execute()

    def _execute(self) -> int:
        try:
            self._run()
            return 0
        except identity.AnotherRun:
            raise  # not this run's directory to mark
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

    def _run(self) -> None:
        m = self.m
        logs.info("run starting", run_id=self.run_id, run_dir=self.dir.uri)
        tunix_compat.check()
        # Nothing is written before this attempt is shown to be the run the directory holds (if any).
        self.record = self._start_record(self.dir.read_record())
        tokenizer = load_tokenizer(m.model.tokenizer_uri)
        items = self._read_eval_set()
        eval_prompts(items, m.template.system_instruction, m.template.step_instruction)  # fails now, not after training
        counts, held_out = self._validate_data(tokenizer)
        self._stop_if_asked()

        mesh = distributed.build_mesh(m.training.mesh)
        distributed.check_batch(m.training.batch_size, mesh)
        # Started now, the training stream fills its shuffle buffer while the model is built and
        # evaluated: the first step does not wait for it.
        with Prefetch(distributed.local_batches(training_batches(m, tokenizer, self.record.seed), mesh)) as train_stream:
            built, decoder = self._build_model(tokenizer, mesh)
            self.status.set(state="evaluating", phase="before")
            before = self._evaluate_before(decoder, items)
            self._stop_if_asked()
            result = self._train(built, train_stream, held_out, mesh)
        if result.stopped_early:
            self.status.set(step=result.end_step)
            raise Preempted(f"stopped at step {result.end_step} of {m.training.steps} on {self.stop.reason}; "
                            "the checkpoint is saved: run the same manifest again to resume")
        self.record.training = {"resumed_from_step": result.start_step, "steps": result.end_step}

        self.status.set(state="evaluating", phase="after", step=result.end_step)
        after = self._evaluate(decoder(), items, "after")
        self._stop_if_asked()
        logs.info("writing outputs", run_dir=self.dir.uri)
        self._write_final(built, tokenizer, mesh)
        # _SUCCESS must mean every process finished its part; then the writing process alone makes the outputs.
        distributed.barrier("finished")
        if self.dir.writer:
            self._write_outputs(before, after, counts)
        distributed.barrier("outputs-written")

    def _start_record(self, recorded: dict | None) -> RunRecord:
        """This attempt's record; BadInput when the directory holds a run of another identity."""
        seed = self._seed(recorded)
        config = identity.of_config(self.m, seed)
        previous = (recorded or {}).get("identity")
        identity.refuse_if_different(self.dir.uri, previous, config)
        return RunRecord(
            format=RUN_FORMAT, run_id=self.run_id, seed=seed, manifest_uri=self.manifest_uri,
            manifest=json.loads(self.m.model_dump_json()), versions=versions(),
            settings=settings.current().as_record(), image=settings.current().image,
            devices=[str(d) for d in jax.devices()], backend=jax.default_backend(),
            compile_cache=settings.current().compile_cache_dir,
            processes=jax.process_count(), started_at=utc_now(), identity=config)

    def _seed(self, recorded: dict | None) -> int:
        """The manifest's seed; else the one an earlier attempt of this run recorded; else a new one
        (generated or read back by each process: process 0's stands)."""
        if self.m.seed is not None:
            return self.m.seed
        seed = identity.recorded_seed(self.m, recorded)
        if seed is None:
            seed = secrets.randbits(31)
            logs.info("no seed in the manifest: generated one", seed=seed)
        return distributed.same_everywhere(seed)

    def _read_eval_set(self) -> list:
        digest = hashlib.sha256()
        items = read_eval_items(self.m.eval.uri, self.m.eval.limit, digest)
        self.record.eval_sha256 = digest.hexdigest()
        return items

    def _validate_data(self, tokenizer) -> tuple[DataCounts, list]:
        m = self.m
        logs.info("scanning the dataset", uri=m.dataset.uri)
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as rejects:
            def on_reject(r):
                rejects.write(logs.redact(json.dumps({"uri": r.uri, "line": r.line, "reason": r.reason, "raw": r.raw})) + "\n")
            counts, held_out = scan(m, tokenizer, on_reject)
        try:
            # The data is the run's too: a resumed run proves it reads what it trained on before it writes.
            data = {"dataset_sha256": counts.sha256, "eval_sha256": self.record.eval_sha256}
            identity.refuse_if_different(self.dir.uri, (self.dir.read_record() or {}).get("identity"),
                                         {**self.record.identity, **data})
            self.record.identity.update(data)
            self.record.dataset_sha256, self.record.data = counts.sha256, counts.as_dict()
            self.dir.write_record(self.record)
            self.status.set(state="validating")
            self.dir.upload(rejects.name, REJECTS)
        finally:
            os.unlink(rejects.name)
        logs.info("dataset scanned", **{k: v for k, v in counts.as_dict().items() if k != "reject_reasons"})
        for r in counts.first_rejects:
            logs.warning("rejected record", where=f"{r.uri}:{r.line}", reason=r.reason)
        if problems := unusable(counts, m):
            raise BadInput(f"{'; '.join(problems)}; every reject is in {self.dir.path(REJECTS)}")
        return counts, held_out

    def _build_model(self, tokenizer, mesh) -> tuple[BuiltModel, Callable[[], Decoder]]:
        """The model, laid out on the mesh, and a maker of decoders for its weights as they are now."""
        m = self.m
        built = build_model(m.model, m.training.lora, self.record.seed, tokenizer.vocab_size,
                            settings.current().cache_dir)
        built = dataclasses.replace(built, model=distributed.shard_model(built.model, mesh))
        self.record.parameters = {"total": parameter_count(built.model),
                                  "trainable": parameter_count(built.model, _trainable_kind(m))}
        shared_decoder = Decoder(built.model, built.config, tokenizer, m.eval)

        def decoder() -> Decoder:
            # Sharded weights: decode with a whole local copy of them as they are now (no collectives).
            if mesh is None:
                return shared_decoder
            return Decoder(distributed.local_replica(built.model, mesh), built.config, tokenizer, m.eval)

        return built, decoder

    def _evaluate_before(self, decoder: Callable[[], Decoder], items) -> EvalRun:
        """The eval before training, decoded once per run: its generations are kept in the run directory,
        and a resumed run with the same model, seed, eval set, template, decoding settings, versions,
        devices and job code reads them back instead of decoding the whole eval again."""
        m, record = self.m, self.record
        key = program_key(
            model=m.model.model_dump(mode="json"), lora=m.training.lora and m.training.lora.model_dump(mode="json"),
            template=m.template.model_dump(mode="json"), eval=m.eval.model_dump(mode="json"),
            seed=record.seed, eval_sha256=record.eval_sha256, devices=record.devices, backend=record.backend)
        saved = load_generations(self.dir.path(EVAL_BEFORE_GENERATIONS), key, items)
        # Decoding a sharded model gathers its weights (a collective): every process reuses, or none does.
        if distributed.same_everywhere(int(saved is not None)):
            logs.info("eval before reused", n=len(items), saved=self.dir.path(EVAL_BEFORE_GENERATIONS))
            return saved or EvalRun([], 0.0, 0)  # a process that could not read it: only process 0's are written
        run = self._evaluate(decoder(), items, "before")
        self.dir.write_json(EVAL_BEFORE_GENERATIONS, generations_record(key, run), artifact=False)
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

    def _train(self, built: BuiltModel, train_stream: Prefetch, held_out: list, mesh) -> TrainResult:
        self.status.set(state="training", phase=None)
        with tempfile.TemporaryDirectory(prefix="tensorboard-") as tb_dir, _on(mesh):
            holdout_batches = list(distributed.local_batches(eval_batches(self.m, held_out), mesh))
            trainer = Trainer(built.model, self.m.training, self, self.stop.event,
                              checkpoint_dir=self.dir.path(CHECKPOINTS), tensorboard_dir=tb_dir)
            self.resumed_from = trainer.restored_step
            self.metrics.resume_from(self.resumed_from)
            if self.resumed_from:
                logs.info("resuming from checkpoint", step=self.resumed_from)
            result = trainer.train(train_stream, holdout_batches)
            self.metrics.flush()
            self.dir.upload(tb_dir, TENSORBOARD)  # Tunix logs TensorBoard on process 0 only
        return result

    # -- what the trainer tells the run (train.TrainingListener) ---------------------------------

    def on_step(self, report: StepReport) -> None:
        line = {"step": report.step, "loss": report.loss, "learning_rate": report.learning_rate,
                "tokens_per_s": round(report.tokens_per_s, 1), "elapsed_s": round(report.elapsed_s, 3)}
        self.metrics.add(line)
        spec = self.m.training
        if report.step % spec.log_every_steps == 0 or report.step == spec.steps:
            logs.info("train", **line)
            self.status.set(step=report.step, last_loss=report.loss)
        if report.step % spec.log_every_steps == 0:
            self.metrics.flush()

    def on_checkpoint(self, step: int) -> None:
        # Before the save: the metrics a resumed run keeps reach storage first.
        self.metrics.flush()
        logs.info("saving checkpoint", step=step)

    def on_eval(self, step: int, eval_loss: float) -> None:
        every = self.m.training.eval_every_steps or self.m.training.steps + 1
        if step and step == self.resumed_from and step % every:
            return  # Tunix evaluates when it resumes; an uninterrupted run has no eval point here
        self.metrics.add({"step": step, "eval_loss": eval_loss})
        logs.info("eval loss", step=step, eval_loss=eval_loss)

    # -- outputs ----------------------------------------------------------------------------------

    def _write_final(self, built: BuiltModel, tokenizer, mesh) -> None:
        """final/: the weights (all processes, Orbax), then how to rebuild them and the tokenizer."""
        m = self.m
        with _on(mesh):
            save_final_weights(built, self.dir.path(FINAL), m.training.lora)
        self.dir.write_bytes(f"{FINAL}/tokenizer.model", tokenizer.processor.serialized_model_proto())
        self.dir.write_json(f"{FINAL}/model.json", final_description(built, m.model, m.training.lora))
        self.dir.register_tree(FINAL)

    def _write_outputs(self, before: EvalRun, after: EvalRun, counts: DataCounts) -> None:
        """Eval traces, import batches, the delta report and loss curve, the record; `_SUCCESS` last."""
        m = self.m
        traces = {}
        for phase, run in (("before", before), ("after", after)):
            traces[phase] = [outputs.eval_trace(r, phase, self.run_id) for r in run.results]
            self.dir.write_jsonl(f"eval_{phase}.jsonl", traces[phase])
        for name, batch in outputs.import_batch_files(traces["before"] + traces["after"]):
            self.dir.write_json(name, batch)

        decode = {"strategy": "greedy", "temperature": 0.0, "max_new_tokens": m.eval.max_new_tokens,
                  "max_prompt_len": m.eval.max_prompt_len, "batch_size": m.eval.batch_size,
                  "stop_tokens": list(STOP_TOKENS),
                  "tokens_per_s": {"before": round(before.tokens_per_s, 1), "after": round(after.tokens_per_s, 1)}}
        self.metrics.write_whole()
        losses = self.metrics.losses
        report = build_delta_report(before.results, after.results, run_id=self.run_id, eval_uri=logs.redact(m.eval.uri),
                                    eval_sha256=self.record.eval_sha256, decode=decode,
                                    losses=losses, data_counts=counts.as_dict())
        self.dir.write_with("loss_curve.png", lambda path: plot_loss_curve(losses, path))
        self.dir.write_json("delta_report.json", report)
        self.dir.write_text("delta_report.md", render_markdown(report))

        self.record.ended_at = utc_now()
        self.dir.write_record(self.record)
        self.status.set(state="succeeded", phase=None)
        self.dir.write_success()
        logs.info("run succeeded", run_dir=self.dir.uri,
                  flexible_before=report["before"]["flexible_accuracy"], flexible_after=report["after"]["flexible_accuracy"])

    def _safe_status(self, **fields) -> None:
        """Best effort, one attempt each: the failure itself may be the storage."""
        with io.single_attempt():
            with contextlib.suppress(Exception):
                self.status.set(**fields)
            if self.record is not None:
                with contextlib.suppress(Exception):
                    self.record.ended_at = utc_now()
                    self.dir.write_record(self.record)

    # -- stopping ---------------------------------------------------------------------------------

    def lose_lease(self, reason: str) -> None:
        """Another process owns the run directory now: stop like on SIGTERM, at the next boundary."""
        self.stop.ask(f"losing the run's lease ({reason})")

    def _stop_if_asked(self) -> None:
        # Every process passes the same boundaries: agreeing here stops them all at the same one.
        if distributed.any_process(self.stop.is_set()):
            raise Preempted(f"stopped by {self.stop.reason}; run the same manifest again to resume")


def _trainable_kind(m: Manifest):
    return nnx.LoRAParam if m.training.lora is not None else nnx.Param
