"""Validate Kubernetes manifests offline and strictly (`make lint-deploy`); exit 1 on any problem.

    python scripts/lint_k8s.py k8s/*.yaml

No single offline tool catches every mistake, so every document goes through several:
1. kubernetes-validate --strict, with the Kubernetes OpenAPI schemas of the oldest and newest
   versions we support (1.31: podFailurePolicy is stable; 1.37): unknown fields and wrong types.
2. The kubernetes client's pydantic models (V1Job, ...): unknown fields, wrong types, missing fields.
3. A JobSet against its CRD schema (the JobSet CRD kept beside the repository, in
   ../shared/k8s-schemas/jobset.x-k8s.io_jobsets.yaml; JOBSET_CRD overrides the path) with
   `additionalProperties: false` added to every object that lists its properties; its Job template
   also goes through 1 and 2 as a batch/v1 Job.
4. What none of them checks: enum values (restartPolicy, dnsPolicy, podFailurePolicy actions and
   operators, toleration operators and effects) and resource quantities.
5. The job's contract (job/errors.py): restartPolicy Never; a podFailurePolicy that fails the Job on
   exit 2 and ignores DisruptionTarget, never fails it on exit 75, names the job's container;
   backoffLimit, activeDeadlineSeconds and terminationGracePeriodSeconds set; RUN_MANIFEST first and
   TUNIX_JOB_IMAGE (equal to the image) second in env (scripts/submit_job.sh patches them by position);
   TPU requests equal limits; in a JobSet, one pod per host and the JAX peer settings consistent.

The CRD is the JobSet release's config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml; the
served version's openAPIV3Schema is what a JobSet is checked against.
"""

from __future__ import annotations

import copy
import os
import re
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from kubernetes import client as k8s

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from job.errors import EXIT_BAD_INPUT, EXIT_RETRIABLE  # noqa: E402

KUBERNETES_VERSIONS = ("1.31", "1.37")
JOBSET_CRD = Path(os.environ.get("JOBSET_CRD", ROOT.parent / "shared" / "k8s-schemas" / "jobset.x-k8s.io_jobsets.yaml"))
MODELS = {
    ("batch/v1", "Job"): k8s.V1Job,
    ("v1", "ServiceAccount"): k8s.V1ServiceAccount,
    ("v1", "PersistentVolumeClaim"): k8s.V1PersistentVolumeClaim,
    ("v1", "ConfigMap"): k8s.V1ConfigMap,
}
JOBSET = ("jobset.x-k8s.io/v1alpha2", "JobSet")
CONTAINER = "job"  # the container the exit-code rules name
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
JAX_PORT = 8476
ENUMS = {
    "restartPolicy": {"Always", "OnFailure", "Never"},
    "dnsPolicy": {"ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"},
    "imagePullPolicy": {"Always", "IfNotPresent", "Never"},
    "completionMode": {"NonIndexed", "Indexed"},
}
RULE_ACTIONS = {"FailJob", "FailIndex", "Ignore", "Count"}
EXIT_OPERATORS = {"In", "NotIn"}
TOLERATION_OPERATORS = {"Exists", "Equal"}
TAINT_EFFECTS = {"NoSchedule", "PreferNoSchedule", "NoExecute"}
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")


# -- 1-3: schemas --------------------------------------------------------------------------------

def strict(schema):
    """The schema with `additionalProperties: false` wherever an object lists its properties."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


_jobset_validator = None


def jobset_validator() -> jsonschema.Draft7Validator:
    global _jobset_validator
    if _jobset_validator is None:
        _jobset_validator = jsonschema.Draft7Validator(strict(jobset_schema()))
    return _jobset_validator


def jobset_schema(version: str = "v1alpha2") -> dict:
    """The openAPIV3Schema of the JobSet CRD's `version`."""
    if not JOBSET_CRD.is_file():
        sys.exit(f"lint_k8s: the JobSet CRD is not at {JOBSET_CRD}: set JOBSET_CRD to the "
                 "jobset.x-k8s.io_jobsets.yaml of the JobSet release")
    crd = yaml.safe_load(JOBSET_CRD.read_text())
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            return served["schema"]["openAPIV3Schema"]
    sys.exit(f"lint_k8s: {JOBSET_CRD} has no version {version}")


def schema_problems(doc: dict) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key == JOBSET:
        problems = [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                    for e in sorted(jobset_validator().iter_errors(doc), key=lambda e: list(map(str, e.path)))]
        for i, rj in enumerate(doc.get("spec", {}).get("replicatedJobs") or []):
            job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": str(rj.get("name", "job"))},
                   "spec": (rj.get("template") or {}).get("spec", {})}
            problems += [f"spec.replicatedJobs.{i}.template: {p}" for p in schema_problems(job)]
        return problems
    if key not in MODELS:
        return [f"{key[1]} {key[0]}: no schema to check it against (known: "
                f"{', '.join(k for _, k in [*MODELS, JOBSET])})"]
    problems = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(map(str, err.path)) or "(top)"
            problems.append(f"{path}: {err.message} (Kubernetes {version} schema)")
    try:
        MODELS[key].model_validate(doc)
    except Exception as err:  # pydantic.ValidationError: one line per problem
        lines = str(err).splitlines()[1:]
        problems += [f"{lines[i].strip()}: {lines[i + 1].strip()}" for i in range(0, len(lines) - 1, 2)
                     if not lines[i].startswith(" ")]
    return sorted(set(problems))


# -- 4: enums and quantities ---------------------------------------------------------------------

def walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{path}.{k}" if path else k, k, v
            yield from walk(v, f"{path}.{k}" if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}.{i}")


def value_problems(doc: dict) -> list[str]:
    problems = []
    for path, key, value in walk(doc):
        if key in ENUMS and value not in ENUMS[key]:
            problems.append(f"{path}: {value!r} is not one of {sorted(ENUMS[key])}")
        if key in ("requests", "limits") and isinstance(value, dict):
            for name, quantity in value.items():
                if isinstance(quantity, bool) or not QUANTITY.match(str(quantity)):
                    problems.append(f"{path}.{name}: {quantity!r} is not a resource quantity")
        if key == "podFailurePolicy" and isinstance(value, dict):
            for i, rule in enumerate(value.get("rules") or []):
                if rule.get("action") not in RULE_ACTIONS:
                    problems.append(f"{path}.rules.{i}.action: {rule.get('action')!r} is not one of {sorted(RULE_ACTIONS)}")
                op = (rule.get("onExitCodes") or {}).get("operator")
                if rule.get("onExitCodes") is not None and op not in EXIT_OPERATORS:
                    problems.append(f"{path}.rules.{i}.onExitCodes.operator: {op!r} is not one of {sorted(EXIT_OPERATORS)}")
        if key == "tolerations" and isinstance(value, list):
            for i, t in enumerate(value):
                if "operator" in t and t["operator"] not in TOLERATION_OPERATORS:
                    problems.append(f"{path}.{i}.operator: {t['operator']!r} is not one of {sorted(TOLERATION_OPERATORS)}")
                if "effect" in t and t["effect"] not in TAINT_EFFECTS:
                    problems.append(f"{path}.{i}.effect: {t['effect']!r} is not one of {sorted(TAINT_EFFECTS)}")
    return problems


# -- 5: the job's contract -----------------------------------------------------------------------

def exit_codes(rule: dict) -> set[int]:
    codes = (rule.get("onExitCodes") or {}).get("values") or []
    return set(codes) if (rule.get("onExitCodes") or {}).get("operator") == "In" else set()


def job_spec_problems(spec: dict, where: str) -> list[str]:
    problems = []
    pod = (spec.get("template") or {}).get("spec") or {}
    for field in ("backoffLimit", "activeDeadlineSeconds"):
        if field not in spec:
            problems.append(f"{where}.{field}: missing (say how often to retry, how long a run may take)")
    if pod.get("restartPolicy") != "Never":
        problems.append(f"{where}.template.spec.restartPolicy: must be Never (podFailurePolicy needs it; "
                        "the Job makes a new pod for a retry)")
    if "terminationGracePeriodSeconds" not in pod:
        problems.append(f"{where}.template.spec.terminationGracePeriodSeconds: missing (time to checkpoint on SIGTERM)")
    names = [c.get("name") for c in pod.get("containers") or []]
    if CONTAINER not in names:
        problems.append(f"{where}.template.spec.containers: no container named {CONTAINER!r} (the exit-code rules name it)")
    rules = (spec.get("podFailurePolicy") or {}).get("rules") or []
    if not any(r.get("action") == "FailJob" and EXIT_BAD_INPUT in exit_codes(r) for r in rules):
        problems.append(f"{where}.podFailurePolicy: no FailJob rule on exit code {EXIT_BAD_INPUT} (bad input: "
                        "a retry cannot help)")
    if not any(r.get("action") == "Ignore" and any(c.get("type") == "DisruptionTarget"
                                                   for c in r.get("onPodConditions") or []) for r in rules):
        problems.append(f"{where}.podFailurePolicy: no Ignore rule on the DisruptionTarget condition "
                        "(preemptions would use up backoffLimit)")
    for i, r in enumerate(rules):
        if r.get("action") in ("FailJob", "FailIndex") and EXIT_RETRIABLE in exit_codes(r):
            problems.append(f"{where}.podFailurePolicy.rules.{i}: fails on exit code {EXIT_RETRIABLE}, "
                            "which means retry (preempted, checkpoint saved)")
        container = (r.get("onExitCodes") or {}).get("containerName")
        if container is not None and container not in names:
            problems.append(f"{where}.podFailurePolicy.rules.{i}.onExitCodes.containerName: "
                            f"{container!r} is not a container of the pod ({names})")
    for i, c in enumerate(pod.get("containers") or []):
        if c.get("name") != CONTAINER:
            continue
        at = f"{where}.template.spec.containers.{i}"
        env = c.get("env") or []
        if [e.get("name") for e in env[:2]] != ["RUN_MANIFEST", "TUNIX_JOB_IMAGE"]:
            problems.append(f"{at}.env: must start with RUN_MANIFEST then TUNIX_JOB_IMAGE (submit_job.sh patches them)")
        elif env[1].get("value") != c.get("image"):
            problems.append(f"{at}.env.1: TUNIX_JOB_IMAGE {env[1].get('value')!r} is not the image {c.get('image')!r}")
        resources = c.get("resources") or {}
        for name in set(resources.get("requests") or {}) | set(resources.get("limits") or {}):
            if name == "google.com/tpu" and str((resources.get("requests") or {}).get(name)) != str(
                    (resources.get("limits") or {}).get(name)):
                problems.append(f"{at}.resources: google.com/tpu requests must equal limits")
    return problems


def jobset_problems(doc: dict) -> list[str]:
    problems = []
    name = doc.get("metadata", {}).get("name", "")
    spec = doc.get("spec") or {}
    network = spec.get("network") or {}
    subdomain = network.get("subdomain") or name
    rules = (spec.get("failurePolicy") or {}).get("rules") or []
    if not any(r.get("action") == "FailJobSet" and "PodFailurePolicy" in (r.get("onJobFailureReasons") or [])
               for r in rules):
        problems.append("spec.failurePolicy.rules: no FailJobSet rule on the PodFailurePolicy reason "
                        f"(exit {EXIT_BAD_INPUT} would restart the JobSet)")
    if network.get("enableDNSHostnames") is False:
        problems.append("spec.network.enableDNSHostnames: must stay true (the coordinator is found by name)")
    for i, rj in enumerate(spec.get("replicatedJobs") or []):
        where = f"spec.replicatedJobs.{i}.template.spec"
        job = (rj.get("template") or {}).get("spec") or {}
        problems += job_spec_problems(job, where)
        pod = (job.get("template") or {}).get("spec") or {}
        hosts = job.get("parallelism")
        if job.get("completionMode") != "Indexed":
            problems.append(f"{where}.completionMode: must be Indexed (each pod's index is its JAX process id)")
        if hosts is None or job.get("completions") != hosts:
            problems.append(f"{where}: parallelism and completions must both be the number of hosts")
        if rj.get("replicas", 1) != 1:
            problems.append(f"spec.replicatedJobs.{i}.replicas: one slice per run (1)")
        if not pod.get("hostNetwork") or pod.get("dnsPolicy") != "ClusterFirstWithHostNet":
            problems.append(f"{where}.template.spec: hostNetwork true with dnsPolicy ClusterFirstWithHostNet")
        expected = f"{name}-{rj.get('name')}-0-0.{subdomain}:{JAX_PORT}"
        for c in pod.get("containers") or []:
            if c.get("name") != CONTAINER:
                continue
            env = {e.get("name"): e for e in c.get("env") or []}
            address = (env.get("JAX_COORDINATOR_ADDRESS") or {}).get("value")
            if address != expected:
                problems.append(f"{where}: JAX_COORDINATOR_ADDRESS is {address!r}; pod 0 of this JobSet is {expected!r}")
            if (env.get("JAX_NUM_PROCESSES") or {}).get("value") != str(hosts):
                problems.append(f"{where}: JAX_NUM_PROCESSES must be {str(hosts)!r}, the number of hosts (parallelism)")
            field = (((env.get("JAX_PROCESS_ID") or {}).get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
            if field != COMPLETION_INDEX:
                problems.append(f"{where}: JAX_PROCESS_ID must come from the downward API, fieldPath {COMPLETION_INDEX}")
    return problems


def contract_problems(doc: dict) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key == ("batch/v1", "Job"):
        return job_spec_problems(doc.get("spec") or {}, "spec")
    if key == JOBSET:
        return jobset_problems(doc)
    return []


# -- files ---------------------------------------------------------------------------------------

def check_document(doc) -> list[str]:
    if not isinstance(doc, dict):
        return [f"not a Kubernetes object: {type(doc).__name__}"]
    doc = copy.deepcopy(doc)
    return schema_problems(doc) + value_problems(doc) + contract_problems(doc)


def check_file(path: str | Path) -> list[str]:
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text(encoding="utf-8")) if d is not None]
    except yaml.YAMLError as err:
        return [f"{path}: not YAML: {err}"]
    if not docs:
        return [f"{path}: no documents"]
    problems = []
    for doc in docs:
        label = f"{path}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}" if isinstance(doc, dict) else str(path)
        problems += [f"{label}: {p}" for p in check_document(doc)]
    return problems


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    failed = False
    for path in argv:
        problems = check_file(path)
        failed |= bool(problems)
        for problem in problems:
            print(problem)
        if not problems:
            print(f"{path}: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
