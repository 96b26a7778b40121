"""Credentials never reach logs, status.json, run_manifest.json or reports; nothing read is executed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from job import logs
from job.errors import JobError
from job.logs import REDACTED, redact

REPO = Path(__file__).resolve().parent.parent
SECRETS = ("hunter2pass", "deadbeefsignature", "AKIAEXAMPLEKEY", "ya29.tokenvalue", "env-secret-value-42")


@pytest.mark.parametrize("given, expected", [
    ("gs://bucket/data.jsonl", "gs://bucket/data.jsonl"),
    ("https://alice:hunter2pass@host/x", f"https://{REDACTED}@host/x"),
    ("s3://AKIAEXAMPLEKEY@bucket/x", f"s3://{REDACTED}@bucket/x"),
    ("https://storage.googleapis.com/b/o?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=sa%40p.iam&X-Goog-Signature=deadbeefsignature",
     f"https://storage.googleapis.com/b/o?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential={REDACTED}&X-Goog-Signature={REDACTED}"),
    ("https://b.s3.amazonaws.com/o?X-Amz-Signature=abc&X-Amz-Security-Token=def&x=1",
     f"https://b.s3.amazonaws.com/o?X-Amz-Signature={REDACTED}&X-Amz-Security-Token={REDACTED}&x=1"),
    ("see http://h/p?token=ya29.tokenvalue for details", f"see http://h/p?token={REDACTED} for details"),
    ("training.steps: too small (got -5); use a value >= 1", "training.steps: too small (got -5); use a value >= 1"),
    ("user@example.com wrote it", "user@example.com wrote it"),  # not a URI: left alone
])
def test_redact(given, expected):
    assert redact(given) == expected


def test_secret_environment_values_are_redacted_anywhere(monkeypatch, capsys):
    monkeypatch.setenv("BACKEND_API_TOKEN", "env-secret-value-42")
    monkeypatch.setenv("TUNIX_JOB_IMAGE", "registry/job:1")  # not a secret by name: kept
    logs.error("failed with env-secret-value-42 in it", detail={"nested": ["env-secret-value-42"]},
               image="registry/job:1")
    err = capsys.readouterr().err
    assert "env-secret-value-42" not in err and err.count(REDACTED) == 2
    assert "registry/job:1" in err


@pytest.mark.parametrize("name", [
    "DB_PWD", "SERVICE_PASSWORD", "BACKEND_API_TOKEN", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "awsSecretAccessKey",
    "WANDB_API_KEY", "APIKEY", "GOOGLE_APPLICATION_CREDENTIALS", "SSH_PRIVATE_KEY", "GH_AUTH", "MY_SECRET",
    "X_PASSWD", "DJANGO_SECRET_KEY", "COOKIE", "app.password", "SIGNING_KEY",
])
def test_variables_whose_names_say_secret_are_secret(name):
    assert logs.is_secret_name(name)


@pytest.mark.parametrize("name", [
    "PWD", "OLDPWD", "HOME", "PATH", "KEYBOARD_LAYOUT", "AUTHOR", "TOKENIZER_URI", "MONKEY", "TUNIX_JOB_IMAGE",
    "PASSTHROUGH", "KEYS_DIR", "TOKENIZERS_PARALLELISM", "AUTHORITY", "PRIVATEER", "SECRETARY", "XDG_SESSION_TYPE",
])
def test_ordinary_variables_are_not_secret(name):
    assert not logs.is_secret_name(name)


def test_the_working_directory_is_kept_in_every_record(monkeypatch, tmp_path, capsys):
    """$PWD and $OLDPWD name directories: a run started from its own folder still says where its data came from."""
    work = tmp_path / "audit"
    monkeypatch.setenv("PWD", str(work))
    monkeypatch.setenv("OLDPWD", str(tmp_path))
    monkeypatch.setenv("DB_PWD", "real-password-123")
    text = f"{work}/data.jsonl, {work}-work/eval.jsonl and real-password-123"
    assert redact(text) == f"{work}/data.jsonl, {work}-work/eval.jsonl and {REDACTED}"


def test_a_failed_run_with_credentials_in_its_uris_leaks_none(tmp_path, monkeypatch, capsys):
    from job.run import run_job

    monkeypatch.setenv("TUNIX_JOB_IO_RETRIES", "0")
    monkeypatch.setenv("SERVICE_PASSWORD", "env-secret-value-42")
    data_uri = "http://alice:hunter2pass@127.0.0.1:9/data.jsonl?X-Goog-Signature=deadbeefsignature&token=ya29.tokenvalue"
    manifest = json.loads((REPO / "manifests" / "local_tiny.json").read_text())
    manifest["dataset"]["uri"] = data_uri
    manifest["eval"]["uri"] = str(REPO / "evalsets" / "arith_eval.jsonl")
    manifest["output"]["uri"] = str(tmp_path / "runs")
    manifest["// note"] = "contact env-secret-value-42"
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    with pytest.raises(JobError) as err:
        run_job(str(path))
    logs.error(str(err.value))  # what the command line prints
    written = {p.name: p.read_text() for p in (tmp_path / "runs" / "local-tiny").iterdir() if p.is_file()}
    assert {"status.json", "run_manifest.json"} <= written.keys()
    assert "127.0.0.1:9/data.jsonl" in written["status.json"]  # the place is still named
    seen = "\n".join([capsys.readouterr().err, *written.values()])
    for secret in SECRETS:
        assert secret not in seen, secret


def test_nothing_read_is_executed_or_unpickled():
    # Data and manifests are parsed as JSON, checkpoints read by Orbax/safetensors: no code path may
    # evaluate, execute or unpickle anything.
    forbidden = re.compile(r"\bpickle\b|\beval\(|\bexec\(|allow_pickle|yaml\.load|torch\.load|\bmarshal\b|shell=True|os\.system")
    hits = [f"{p.name}:{n}: {line.strip()}" for p in sorted((REPO / "job").rglob("*.py"))
            for n, line in enumerate(p.read_text().splitlines(), 1) if forbidden.search(line)]
    assert hits == []


def test_library_log_records_are_redacted_and_carry_no_traceback(capsys):
    import logging

    logs.capture_library_logs()
    try:
        raise ConnectionError("https://u:hunter2pass@host/o?X-Goog-Signature=deadbeefsignature refused")
    except ConnectionError:
        logging.getLogger("gcsfs").exception("upload out of retries")
    (line,) = [json.loads(x) for x in capsys.readouterr().err.splitlines() if "out of retries" in x]
    assert line["severity"] == "ERROR" and line["logger"] == "gcsfs"
    assert line["error"].startswith("ConnectionError: https://REDACTED@host")
    assert "Traceback" not in json.dumps(line) and "hunter2pass" not in json.dumps(line)


def test_an_abandoned_storage_task_is_a_warning_not_the_runs_error(capsys):
    import logging

    logs.capture_library_logs()
    logs.error("gs://b/x: storage error after retries; run the job again")
    logging.getLogger("asyncio").error("Task exception was never retrieved\nfuture: <Task finished>")
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert [x["severity"] for x in lines] == ["ERROR", "WARNING"]
    assert "run the job again" in [x for x in lines if x["severity"] == "ERROR"][-1]["message"]
