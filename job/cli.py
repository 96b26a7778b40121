"""Commands: run, validate, render, score, schema, import. Thin: parse, call, map errors to exit codes.

Exit codes (the contract operators and Kubernetes rely on): 0 success; 2 bad input, never worth a
retry (or import batches whose outcome is unknown: a person decides); 75 retriable (preempted,
storage outage, another process holds the lease): run the same command again; 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from job import logs, settings
from job.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_UNEXPECTED, BadInput, JobError, UnknownOutcome

VALIDATE_DEFAULT_LIMIT = 10_000
MAX_COUNT = 10**12  # more records than any data set holds: a typo, not a count


COUNT_RULE = f"must be a whole number from 1 to {MAX_COUNT:,}"


def count(text: str) -> int:
    """The argparse type of every count option: a whole number from 1 to MAX_COUNT. 0 is refused,
    not read as "all" or "none": the options that can mean everything say so another way (--all)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 1 <= value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{COUNT_RULE} (got {text!r})")
    return value


class CountOption(argparse.Action):
    """Stores a `count`. argparse hands `--limit=--` over as [] without asking `count`: refused here."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if not isinstance(values, int):
            parser.error(f"argument {option_string}: {COUNT_RULE} (got {values!r})")
        setattr(namespace, self.dest, values)


def add_count_option(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    parser.add_argument(name, type=count, action=CountOption, **kwargs)


def _manifest_uri(args) -> str:
    uri = args.manifest or settings.current().manifest
    if not uri:
        raise BadInput("no manifest: pass --manifest URI or set RUN_MANIFEST")
    return uri


def cmd_run(args) -> int:
    # In a container the job is PID 1, and the kernel drops SIGTERM to PID 1 while no handler is set:
    # without one, a pod stopped while JAX imports or the manifest loads would wait out its grace
    # period and be killed. SIGTERM and Ctrl-C both stop the run at its next safe point (job/stopping.py).
    from job.stopping import StopRequest

    with StopRequest().handling_signals() as stop:
        from job import distributed

        distributed.start(settings.current().cluster)  # before any other JAX use; nothing happens on one process
        from job.run import run_job

        return run_job(_manifest_uri(args), args.set, fresh=args.fresh, stop=stop)


def cmd_validate(args) -> int:
    """Every check `run` makes before it trains, on the manifest, its inputs and its run directory,
    without writing anything: exit 0 when the run would start, 2 with every problem found when not."""
    import hashlib

    from job import identity, io
    from job.dataset import scan, unusable
    from job.formats import read_eval_items
    from job.manifest import derive_run_id, load_manifest, run_dir
    from job.rundir import RunDir, preflight
    from job.template import eval_prompts
    from job.tokens import load_tokenizer

    manifest_uri = _manifest_uri(args)
    m = load_manifest(manifest_uri, args.set)
    rundir = RunDir(run_dir(m, derive_run_id(m)))
    problems = _problem(lambda: preflight(m, manifest_uri))
    tokenizer = load_tokenizer(m.model.tokenizer_uri)
    eval_digest = hashlib.sha256()
    items = read_eval_items(m.eval.uri, m.eval.limit, eval_digest)
    problems += _problem(lambda: eval_prompts(items, m.template.system_instruction, m.template.step_instruction))
    if m.model.weights_uri and not io.exists(m.model.weights_uri):
        problems.append(f"model.weights_uri: {m.model.weights_uri} not found")
    scanned = m if args.all else _with_dataset_limit(m, min(args.limit, m.dataset.limit or args.limit))
    counts, _ = scan(scanned, tokenizer)
    problems += unusable(counts, scanned)
    # Compared with a run the directory holds, as `run` does: the dataset too when all the run reads was read.
    data = {"eval_sha256": eval_digest.hexdigest()}
    if scanned.dataset.limit == m.dataset.limit or counts.read < scanned.dataset.limit:
        data["dataset_sha256"] = counts.sha256
    problems += _problem(lambda: identity.refuse_another_run(rundir.uri, rundir.read_record(), m, data))
    report = _validate_report(args, manifest_uri, m, rundir.uri, counts, len(items))
    report["problems"] = problems
    report["ok"] = not problems
    for problem in problems:
        logs.error(problem)
    logs.output(report, indent=2)
    return EXIT_OK if not problems else EXIT_BAD_INPUT


def _problem(check) -> list[str]:
    """[] when `check()` passes, else its BadInput message: validate reports every problem at once."""
    try:
        check()
    except BadInput as err:
        return [str(err)]
    return []


def _with_dataset_limit(m, limit: int):
    return m.model_copy(update={"dataset": m.dataset.model_copy(update={"limit": limit})})


def _validate_report(args, manifest_uri: str, m, run_uri: str, counts, eval_items: int) -> dict:
    data = counts.as_dict()
    return {
        "manifest": manifest_uri, "run_dir": run_uri,
        "dataset": m.dataset.uri, "records_read": counts.read, "accepted": counts.accepted,
        "rejected": counts.rejected, "held_out": counts.held_out, "would_train_on": counts.trained,
        "truncated": counts.truncated, "reject_reasons": data["reject_reasons"],
        "first_rejects": [f"{r.uri}:{r.line}: {r.reason}" for r in counts.first_rejects],
        "token_length": data["token_length"], "max_seq_len": m.training.max_seq_len,
        "eval_items": eval_items, "scanned": "all records" if args.all else f"at most {args.limit} records",
    }


def cmd_render(args) -> int:
    from job.dataset import prepare
    from job.manifest import load_manifest
    from job.tokens import load_tokenizer

    overrides = list(args.set) + ([f"dataset.limit={args.limit}"] if args.limit is not None else [])
    m = load_manifest(_manifest_uri(args), overrides)
    tokenizer = load_tokenizer(m.model.tokenizer_uri)

    def on_reject(r) -> None:
        logs.warning("rejected record", where=f"{r.uri}:{r.line}", reason=r.reason)

    for prepared in prepare(m, tokenizer, on_reject):
        logs.output({"id": prepared.example.id, "text": prepared.rendered.text,
                     "completion": prepared.rendered.completion}, ensure_ascii=False)
    return EXIT_OK


def cmd_score(args) -> int:
    from job.formats import read_eval_items, read_predictions
    from job.score import score_predictions

    items = read_eval_items(args.eval)
    for row in score_predictions(items, read_predictions(args.predictions)):
        logs.output(row, ensure_ascii=False)
    return EXIT_OK


def cmd_schema(args) -> int:
    from job.manifest import json_schema

    logs.output(json_schema(), indent=2)
    return EXIT_OK


def cmd_import(args) -> int:
    from urllib.parse import urlparse

    from job.outputs import import_run

    if urlparse(args.api).scheme not in ("http", "https") or not urlparse(args.api).netloc:
        raise BadInput(f"--api: {args.api!r} is not an http(s) URL; pass e.g. http://localhost:8000")
    summary = import_run(args.run, args.api, resend_unknown=args.resend_unknown, log=logs.info)
    logs.output(summary)
    if summary["unknown"]:  # a person must look first: rerunning as is would change nothing
        raise UnknownOutcome(summary["what_to_do"])
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunix-job", description="Fine-tune Gemma on reasoning traces with Tunix.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_manifest(sp):
        sp.add_argument("--manifest", help="run manifest URI (default: $RUN_MANIFEST)")
        sp.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a manifest field, e.g. training.steps=10 (repeatable)")
        return sp

    run = with_manifest(sub.add_parser("run", help="train and evaluate: the whole job"))
    run.add_argument("--fresh", action="store_true", help="delete an earlier run of this manifest and start over")
    run.set_defaults(func=cmd_run)
    validate = with_manifest(sub.add_parser("validate", help="check the manifest and data before spending accelerator time"))
    add_count_option(validate, "--limit", default=VALIDATE_DEFAULT_LIMIT, help="records to read (default %(default)s)")
    validate.add_argument("--all", action="store_true", help="read every record")
    validate.set_defaults(func=cmd_validate)
    render = with_manifest(sub.add_parser("render", help="print what the model will be trained on, as JSONL"))
    add_count_option(render, "--limit", help="records to read")
    render.set_defaults(func=cmd_render)
    score = sub.add_parser("score", help="score predictions {id, output} against an eval set")
    score.add_argument("--eval", required=True, help="eval set URI")
    score.add_argument("--predictions", required=True, help="JSONL of {id, output}")
    score.set_defaults(func=cmd_score)
    sub.add_parser("schema", help="print the manifest's JSON Schema").set_defaults(func=cmd_schema)
    imp = sub.add_parser("import", help="post a run's eval traces to the tunix-rt backend")
    imp.add_argument("--run", required=True, help="run directory URI")
    imp.add_argument("--api", required=True, help="backend base URL, e.g. http://localhost:8000")
    imp.add_argument("--resend-unknown", action="store_true",
                     help="send again the batches whose outcome is unknown (check the backend first: "
                          "one it stored is stored twice)")
    imp.set_defaults(func=cmd_import)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as usage:  # argparse has said what is wrong, naming the option (2), or printed --help (0)
        return int(usage.code or 0)
    logs.capture_library_logs()
    message = ""
    try:
        settings.install(settings.from_env())  # every variable checked before anything starts
        code = args.func(args)
    except JobError as err:
        logs.error(str(err), exit_code=err.exit_code, error=type(err).__name__)
        code, message = err.exit_code, f"{type(err).__name__}: {err}"
    except BrokenPipeError:
        # The reader of stdout went away (`render | head -1`): it has what it wanted; say nothing more to it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_OK
    except KeyboardInterrupt:
        logs.error("interrupted", exit_code=EXIT_UNEXPECTED)
        code, message = EXIT_UNEXPECTED, "interrupted"
    except Exception as err:
        logs.error(f"unexpected error: {type(err).__name__}: {err}", exit_code=EXIT_UNEXPECTED,
                   traceback=traceback.format_exc())
        code, message = EXIT_UNEXPECTED, f"{type(err).__name__}: {err}"
    if code != EXIT_OK and "job.distributed" in sys.modules:
        from job import distributed

        if distributed.cluster().is_multi:
            distributed.exit_all(code, message)  # the other processes exit with this code too; does not return
    return code


if __name__ == "__main__":
    sys.exit(main())
