"""End to end: the real job (Tunix training of the tiny model, Orbax checkpoints, greedy eval) in subprocesses.

One small configuration is run several ways — locally, from and to a bucket, interrupted by
SIGTERM, killed by SIGKILL — and every way must end with the same losses and the same generations
as the uninterrupted local run, bit for bit (CPU).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from backend_validation import validate_trace
from e2e import DEMO, ROOT, SMALL, job_command, outcome, run_job, same_result, state_of, wait_for

from job import io
from job.errors import EXIT_OK, EXIT_RETRIABLE

ARTIFACTS = ["run_manifest.json", "status.json", "metrics.jsonl", "rejects.jsonl", "eval_before.jsonl",
             "eval_after.jsonl", "delta_report.json", "delta_report.md", "loss_curve.png",
             "import/traces-00001.json", "final/model.json", "final/tokenizer.model"]


def start_job(manifest: str, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(job_command(manifest, *overrides), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def terminate_in_state(output_uri, run_uri: str, state: str) -> str:
    """Start the job, send SIGTERM once status.json says `state`, expect the retriable exit; returns stderr."""
    proc = start_job(str(DEMO), f"output.uri={output_uri}", "run_id=base")
    wait_for(lambda: state_of(run_uri).get("state") == state, what=f"state {state!r}")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_RETRIABLE, stderr[-3000:]
    return stderr


def test_run_directory_is_complete(baseline):
    for name in ARTIFACTS:
        assert io.exists(io.join(baseline, name)), name
    success = io.read_json(io.join(baseline, "_SUCCESS"))
    listed = {a["path"]: a for a in success["artifacts"]}
    assert set(ARTIFACTS) <= set(listed)
    for path, entry in listed.items():  # the listing matches what is on disk
        assert io.size(io.join(baseline, path)) == entry["size"]
        assert io.sha256(io.join(baseline, path)) == entry["sha256"]
    # _SUCCESS is written last.
    newest = max(os.path.getmtime(os.path.join(baseline, p)) for p in listed)
    assert os.path.getmtime(os.path.join(baseline, "_SUCCESS")) >= newest

    status = io.read_json(io.join(baseline, "status.json"))
    assert status["state"] == "succeeded" and status["step"] == 8 and status["total_steps"] == 8
    record = io.read_json(io.join(baseline, "run_manifest.json"))
    assert record["seed"] == 1234 and record["run_id"] == "base"
    assert record["versions"]["google-tunix"] == "0.1.7" and record["versions"]["jax"]
    assert len(record["dataset_sha256"]) == 64 and len(record["eval_sha256"]) == 64
    assert record["data"]["read"] == record["data"]["trained"] + record["data"]["held_out"] + record["data"]["rejected"]
    assert record["manifest"]["training"]["steps"] == 8  # overrides are recorded
    assert record["started_at"] and record["ended_at"]


def test_metrics_and_report(baseline):
    lines = [json.loads(x) for x in io.read_text(io.join(baseline, "metrics.jsonl")).splitlines()]
    steps = [x["step"] for x in lines if "loss" in x]
    assert steps == list(range(1, 9))
    assert all({"loss", "learning_rate", "tokens_per_s", "elapsed_s"} <= set(x) for x in lines if "loss" in x)
    assert [x["step"] for x in lines if "eval_loss" in x] == [0, 4, 8]
    first, last = lines[1]["loss"], [x for x in lines if "loss" in x][-1]["loss"]
    assert last < first  # it trained

    report = io.read_json(io.join(baseline, "delta_report.json"))
    for side in ("before", "after"):
        assert report[side]["n"] == 6
        assert {"strict_accuracy", "flexible_accuracy"} <= set(report[side])
    assert set(report["fixed"]) | set(report["broken"]) | set(report["unchanged"]) == {f"arith-{i:03d}" for i in range(1, 7)}
    assert 0.0 <= report["mcnemar_p"] <= 1.0
    assert report["eval_sha256"] == io.read_json(io.join(baseline, "run_manifest.json"))["eval_sha256"]
    markdown = io.read_text(io.join(baseline, "delta_report.md"))
    assert "loss_curve.png" in markdown
    assert io.read_bytes(io.join(baseline, "loss_curve.png")).startswith(b"\x89PNG")


def test_outputs_are_valid_backend_traces(baseline):
    for phase in ("before", "after"):
        traces = [json.loads(x) for x in io.read_text(io.join(baseline, f"eval_{phase}.jsonl")).splitlines()]
        assert len(traces) == 6
        for trace in traces:
            assert validate_trace(trace) == []
            assert trace["meta"]["phase"] == phase and trace["meta"]["run_id"] == "base"
    batch = io.read_json(io.join(baseline, "import", "traces-00001.json"))
    assert isinstance(batch, list) and len(batch) == 12 and all(validate_trace(t) == [] for t in batch)


def test_rerun_of_a_finished_run_does_nothing(baseline):
    before = io.sha256(io.join(baseline, "_SUCCESS"))
    done = run_job(str(DEMO), f"output.uri={Path(baseline).parent}", "run_id=base")
    assert done.returncode == EXIT_OK
    assert "already succeeded" in done.stderr
    assert io.sha256(io.join(baseline, "_SUCCESS")) == before


def test_same_run_from_and_to_a_bucket_is_bit_identical(baseline, gcs_bucket):
    # The manifest sits in the bucket and names its data beside it, relative.
    io.upload(str(ROOT / "datasets" / "arith_train.jsonl"), f"{gcs_bucket}/datasets/arith_train.jsonl")
    io.upload(str(ROOT / "evalsets" / "arith_eval.jsonl"), f"{gcs_bucket}/evalsets/arith_eval.jsonl")
    io.upload(str(DEMO), f"{gcs_bucket}/manifests/local_tiny.json")
    done = run_job(f"{gcs_bucket}/manifests/local_tiny.json", "run_id=base")
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    run_uri = f"{gcs_bucket}/runs/base"
    assert io.listdir(f"{run_uri}/checkpoints")  # Orbax wrote to the bucket
    same_result(outcome(baseline), outcome(run_uri))


def regenerate(final_uri: str, preset_dtype: str, items: int) -> list[str]:
    """Load a run's final/ as model.weights_uri and greedily decode the eval prompts again."""
    from job.evaluate import Decoder, evaluate
    from job.formats import read_eval_items
    from job.manifest import load_manifest
    from job.model import build_model
    from job.tokens import load_tokenizer

    m = load_manifest(str(DEMO), [*SMALL, f"model.weights_uri={final_uri}", f"model.dtype={preset_dtype}"])
    tokenizer = load_tokenizer(f"{final_uri}/tokenizer.model")
    built = build_model(m.model, None, 999, tokenizer.vocab_size, cache_dir=str(ROOT / ".cache" / "test-weights"))
    run = evaluate(Decoder(built.model, built.config, tokenizer, m.eval), read_eval_items(m.eval.uri, items), m.template)
    return [r.output for r in run.results]


def test_final_weights_load_as_a_later_runs_model(baseline):
    # The seed passed to build_model differs from the run's: every weight must come from final/.
    assert regenerate(f"{baseline}/final", "float32", 6) == outcome(baseline)["generations"]["after"]


def test_lora_run_with_gradient_accumulation_saves_an_adapter_that_reproduces_its_eval(tmp_path):
    done = run_job(str(DEMO), f"output.uri={tmp_path}", "run_id=lora", 'training.lora={"rank": 4, "alpha": 8.0}',
                   "training.learning_rate=0.01", "training.grad_accum_steps=2")
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    run_uri = str(tmp_path / "lora")
    losses = [json.loads(x) for x in io.read_text(f"{run_uri}/metrics.jsonl").splitlines()]
    assert [x["step"] for x in losses if "loss" in x] == list(range(1, 9))  # 8 optimizer steps of 2 micro-batches
    info = io.read_json(f"{run_uri}/final/model.json")
    assert info["lora"]["rank"] == 4 and info["base"]["preset"] == "tiny" and info["base"]["seed"] == 1234
    assert io.exists(f"{run_uri}/final/adapter") and not io.exists(f"{run_uri}/final/params")
    record = io.read_json(f"{run_uri}/run_manifest.json")
    assert record["parameters"]["trainable"] < record["parameters"]["total"] / 10  # only the adapters train
    generations = [json.loads(x)["meta"]["raw_output"] for x in io.read_text(f"{run_uri}/eval_after.jsonl").splitlines()]
    assert regenerate(f"{run_uri}/final", "float32", 6) == generations


def test_the_job_sets_up_the_compile_cache_from_the_environment(monkeypatch, tmp_path):
    import jax

    from job import settings
    from job.step_cache import configure_compile_cache

    saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    try:
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        settings.install(settings.from_env())
        assert configure_compile_cache() is None
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
        monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
        settings.install(settings.from_env())
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        assert configure_compile_cache() == str(tmp_path / "jax")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0, "every compilation is cached"
    finally:
        jax.config.update("jax_compilation_cache_dir", saved[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])


def test_sigterm_while_the_job_starts_exits_retriable(tmp_path):
    # In a container the job is PID 1, whose SIGTERM the kernel drops while no handler is set: the CLI
    # sets one before the slow imports. (Outside a container, without it the process dies of the signal.)
    proc = start_job(str(DEMO), f"output.uri={tmp_path}", "run_id=early")
    time.sleep(2.0)  # the CLI is loaded; JAX is still importing or the run is starting
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_RETRIABLE, stderr[-3000:]
    assert not (tmp_path / "early" / "_SUCCESS").exists()
