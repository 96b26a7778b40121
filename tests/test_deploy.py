"""Deployment files: the Dockerfile (hadolint and the properties the job relies on), the Kubernetes
manifests (strict offline validation by scripts/lint_k8s.py, which must also catch injected mistakes)
and the scripts (bash, strict mode, usage; submit_job.sh's rendering when kubectl is installed)."""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "k8s").glob("*.yaml"))
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))
DOCKERFILE = ROOT / "docker" / "Dockerfile"

_spec = importlib.util.spec_from_file_location("lint_k8s", ROOT / "scripts" / "lint_k8s.py")
lint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lint)


def docs(name: str) -> list[dict]:
    return list(yaml.safe_load_all((ROOT / "k8s" / name).read_text()))


def workload(name: str) -> dict:
    return copy.deepcopy(next(d for d in docs(name) if d["kind"] in ("Job", "JobSet")))


def problems_after(name: str, change) -> str:
    doc = workload(name)
    change(doc)
    return "\n".join(lint.check_document(doc))


def pod(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def jobset_job(doc: dict) -> dict:
    return doc["spec"]["replicatedJobs"][0]["template"]


# -- Kubernetes manifests --------------------------------------------------------------------------

def test_there_are_the_three_manifests():
    assert [p.name for p in MANIFESTS] == ["sft-job-cpu.yaml", "sft-job.yaml", "sft-jobset.yaml"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_passes_strict_offline_validation(path):
    assert lint.check_file(path) == []


def test_tpu_job_is_what_gke_needs():
    job = workload("sft-job.yaml")
    spec = pod(job)
    assert {"cloud.google.com/gke-tpu-accelerator", "cloud.google.com/gke-tpu-topology"} <= set(spec["nodeSelector"])
    assert spec["tolerations"][0]["key"] == "google.com/tpu"
    container = spec["containers"][0]
    assert container["resources"]["requests"]["google.com/tpu"] == container["resources"]["limits"]["google.com/tpu"]
    assert container["env"][0]["value"].startswith("gs://")
    assert spec["serviceAccountName"] == "tunix-job"
    account = docs("sft-job.yaml")[0]
    assert account["kind"] == "ServiceAccount" and "iam.gke.io/gcp-service-account" in account["metadata"]["annotations"]
    assert "cloud.google.com/gke-spot" in (ROOT / "k8s" / "sft-job.yaml").read_text()  # the optional spot selector


@pytest.mark.parametrize("name, change, expected", [
    ("sft-job.yaml", lambda d: d["spec"].update(backofLimit=3), "'backofLimit' was unexpected"),
    ("sft-job.yaml", lambda d: d["spec"].update(backoffLimit="3"), "'3' is not of type 'integer'"),
    ("sft-job.yaml", lambda d: pod(d)["containers"][0]["env"][0].update(valu="x"), "valu"),
    ("sft-job.yaml", lambda d: pod(d).update(nodeselector={}), "nodeselector"),
    ("sft-job.yaml", lambda d: pod(d)["containers"][0].pop("name"), "'name' is a required property"),
    ("sft-job.yaml", lambda d: pod(d).update(restartPolicy="Sometimes"), "'Sometimes' is not one of"),
    ("sft-job.yaml", lambda d: pod(d).update(restartPolicy="OnFailure"), "must be Never"),
    ("sft-job.yaml", lambda d: pod(d)["containers"][0]["resources"]["limits"].update({"google.com/tpu": "8x"}), "quantity"),
    ("sft-job.yaml", lambda d: pod(d)["containers"][0]["resources"]["limits"].update({"google.com/tpu": "4"}), "requests must equal limits"),
    ("sft-job.yaml", lambda d: pod(d)["tolerations"][0].update(effect="NoSchedul"), "'NoSchedul' is not one of"),
    ("sft-job-cpu.yaml", lambda d: pod(d)["containers"][0]["env"].reverse(), "must start with RUN_MANIFEST"),
    ("sft-job-cpu.yaml", lambda d: pod(d)["containers"][0].update(image="other:1"), "TUNIX_JOB_IMAGE"),
    ("sft-job-cpu.yaml", lambda d: d["spec"].pop("activeDeadlineSeconds"), "activeDeadlineSeconds"),
    ("sft-job-cpu.yaml", lambda d: d.update(kind="Jobs"), "no schema"),
])
def test_injected_job_mistakes_are_caught(name, change, expected):
    assert expected in problems_after(name, change)


def rule(doc: dict, index: int) -> dict:
    spec = jobset_job(doc)["spec"] if doc["kind"] == "JobSet" else doc["spec"]
    return spec["podFailurePolicy"]["rules"][index]


@pytest.mark.parametrize("name", ["sft-job.yaml", "sft-jobset.yaml"])
@pytest.mark.parametrize("change, expected", [
    (lambda d: rule(d, 0).update(action="Failjob"), "'Failjob' is not one of"),
    (lambda d: rule(d, 0)["onExitCodes"].update(operator="Inn"), "'Inn' is not one of"),
    (lambda d: rule(d, 0)["onExitCodes"].update(values=[3]), "no FailJob rule on exit code 2"),
    (lambda d: rule(d, 1).update(action="FailJob"), "fails on exit code 75"),
    (lambda d: rule(d, 0)["onExitCodes"].update(containerName="main"), "'main' is not a container"),
    (lambda d: rule(d, 2)["onPodConditions"][0].update(type="DisruptionTargt"), "no Ignore rule on the DisruptionTarget"),
    (lambda d: rule(d, 2)["onPodConditions"][0].pop("status"), "'status' is a required property"),
])
def test_a_bad_exit_code_policy_is_caught(name, change, expected):
    assert expected in problems_after(name, change)


def jobset_pod(doc: dict) -> dict:
    return pod(jobset_job(doc))


def env(doc: dict) -> dict:
    return {e["name"]: e for e in jobset_pod(doc)["containers"][0]["env"]}


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["spec"].update(replicatedJob=d["spec"].pop("replicatedJobs")), "'replicatedJob' was unexpected"),
    (lambda d: d["spec"]["replicatedJobs"][0].update(replica=1), "'replica' was unexpected"),
    (lambda d: d["spec"]["failurePolicy"].update(maxRestart=3), "'maxRestart' was unexpected"),
    (lambda d: d["spec"]["failurePolicy"]["rules"][0].update(action="Fail"), "'Fail' is not one of"),
    (lambda d: d["spec"]["failurePolicy"].pop("rules"), "no FailJobSet rule"),
    (lambda d: d["spec"]["replicatedJobs"][0].update(replicas="1"), "'1' is not of type 'integer'"),
    (lambda d: jobset_job(d)["spec"].update(paralelism=4), "'paralelism' was unexpected"),
    (lambda d: jobset_pod(d).update(hostNetwrok=True), "'hostNetwrok' was unexpected"),
    (lambda d: jobset_pod(d).update(dnsPolicy="ClusterFirst"), "ClusterFirstWithHostNet"),
    (lambda d: jobset_job(d)["spec"].update(completions=2), "parallelism and completions"),
    (lambda d: jobset_job(d)["spec"].update(completionMode="NonIndexed"), "must be Indexed"),
    (lambda d: env(d)["JAX_NUM_PROCESSES"].update(value="8"), "JAX_NUM_PROCESSES"),
    (lambda d: env(d)["JAX_COORDINATOR_ADDRESS"].update(value="tunix-sft-multihost-0:8476"), "pod 0 of this JobSet"),
    (lambda d: d["metadata"].update(name="renamed"), "pod 0 of this JobSet"),
    (lambda d: env(d)["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"].update(fieldPath="metadata.name"), "JAX_PROCESS_ID"),
])
def test_injected_jobset_mistakes_are_caught(change, expected):
    assert expected in problems_after("sft-jobset.yaml", change)


def test_jobset_one_pod_per_host_and_jax_peers():
    doc = workload("sft-jobset.yaml")
    spec = jobset_job(doc)["spec"]
    hosts = spec["parallelism"]
    assert doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    assert spec["completions"] == hosts and spec["completionMode"] == "Indexed" and hosts > 1
    assert env(doc)["JAX_NUM_PROCESSES"]["value"] == str(hosts)
    assert env(doc)["JAX_COORDINATOR_ADDRESS"]["value"] == "tunix-sft-multihost-workers-0-0.tunix-sft-multihost:8476"


def test_lint_command_fails_on_a_broken_copy(tmp_path):
    broken = tmp_path / "job.yaml"
    broken.write_text((ROOT / "k8s" / "sft-job.yaml").read_text().replace("backoffLimit:", "backofLimit:"))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "lint_k8s.py"), str(broken)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "backofLimit" in done.stdout


# -- Dockerfile ------------------------------------------------------------------------------------

def hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "hadolint"), str(path)],
                          capture_output=True, text=True, timeout=60)


def test_dockerfile_is_hadolint_clean():
    done = hadolint(DOCKERFILE)
    assert done.returncode == 0, done.stdout


def test_hadolint_catches_a_shell_between_pid_1_and_the_job(tmp_path):
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text().replace('ENTRYPOINT ["tunix-job"]', "ENTRYPOINT tunix-job"))
    done = hadolint(broken)
    assert done.returncode != 0 and "DL3025" in done.stdout


def test_dockerfile_properties():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim", text, re.M)
    assert re.search(r'^ENTRYPOINT \["tunix-job"\]$', text, re.M) and re.search(r'^CMD \["run"\]$', text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0"))
    assert "-c constraints.txt" in text and "org.opencontainers.image.version" in text
    assert "JAX_COMPILATION_CACHE_DIR=" in text
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[1] == "*"  # an allowlist: nothing reaches the build unless named


# -- scripts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_strict_bash_with_usage(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
    subprocess.run(["bash", "-n", str(script)], check=True)
    shown = subprocess.run([str(script), "-h"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and shown.stdout.startswith("usage:")
    wrong = subprocess.run([str(script), "-Z"], capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 2 and "usage:" in wrong.stderr


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl (with its built-in kustomize) is not installed")
@pytest.mark.parametrize("name", ["sft-job.yaml", "sft-job-cpu.yaml", "sft-jobset.yaml"])
def test_submit_fills_in_image_manifest_and_name(name, tmp_path):
    image = "us-docker.pkg.dev/p/tunix/tunix-rt-job:9.9.9-tpu"
    done = subprocess.run([str(ROOT / "scripts" / "submit_job.sh"), "-d", "-f", f"k8s/{name}", "-i", image,
                           "-m", "gs://bucket/run.json", "-n", "run-7", "-g", "sa@p.iam.gserviceaccount.com"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(done.stdout)
    assert lint.check_file(rendered) == []  # still valid, and the contract still holds
    objects = list(yaml.safe_load_all(done.stdout))
    work = next(d for d in objects if d["kind"] in ("Job", "JobSet"))
    assert work["metadata"]["name"] == "run-7"
    spec = jobset_pod(work) if work["kind"] == "JobSet" else pod(work)
    container = spec["containers"][0]
    assert container["image"] == image
    assert container["env"][0] == {"name": "RUN_MANIFEST", "value": "gs://bucket/run.json"}
    if work["kind"] == "JobSet":
        assert env(work)["JAX_COORDINATOR_ADDRESS"]["value"] == "run-7-workers-0-0.run-7:8476"
    for account in (d for d in objects if d["kind"] == "ServiceAccount"):
        assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"] == "sa@p.iam.gserviceaccount.com"
