"""A run's identity: every field that changes results, changed between attempts, is refused; the others are
accepted. The run directory is the job's own, apart from its inputs, or nothing is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from job import identity, io
from job.errors import BadInput
from job.manifest import Manifest, load_manifest
from job.rundir import LEASE_FILE, RUN_FORMAT, RunDir

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "manifests" / "local_tiny.json"
SHIPPED_TOKENIZER = ROOT / "job" / "assets" / "tiny_tokenizer.model"

# One change per manifest field that changes what a run computes (as --set overrides).
CHANGES = {
    "seed": ["seed=99"],
    "dataset.format": ["dataset.format=\"auto\""],
    "dataset.limit": ["dataset.limit=100"],
    "dataset.max_reject_fraction": ["dataset.max_reject_fraction=0.5"],
    "dataset.holdout": ["dataset.holdout=8"],
    "dataset.shuffle": ["dataset.shuffle=false"],
    "template.recipe": ["template.recipe=\"trace_sft_v1_m08\""],
    "template.system_instruction": ["template.system_instruction=\"Be brief.\""],
    "template.step_instruction": ["template.step_instruction=\"Think in steps.\""],
    "model.preset": ["model.preset=\"gemma3_270m\"", "model.weights_uri=\"{weights}\"",
                     f"model.tokenizer_uri=\"{SHIPPED_TOKENIZER}\""],
    "model.weights_format": ["model.weights_format=\"job\""],
    "model.dtype": ["model.dtype=\"bfloat16\""],
    "training.steps": ["training.steps=351"],
    "training.batch_size": ["training.batch_size=8"],
    "training.max_seq_len": ["training.max_seq_len=96"],
    "training.learning_rate": ["training.learning_rate=0.01"],
    "training.warmup_steps": ["training.warmup_steps=10"],
    "training.weight_decay": ["training.weight_decay=0.1"],
    "training.grad_accum_steps": ["training.grad_accum_steps=2"],
    "training.max_grad_norm": ["training.max_grad_norm=null"],
    "training.lora": ["training.lora={\"rank\": 4}"],
    "training.packing": ["training.packing=false"],
    "training.length_policy": ["training.length_policy=\"truncate\""],
    "training.eval_every_steps": ["training.eval_every_steps=50"],
    "training.mesh.fsdp": ["training.mesh.fsdp=1"],
    "training.mesh.tp": ["training.mesh.tp=-1", "training.mesh.fsdp=1"],
    "eval.limit": ["eval.limit=10"],
    "eval.max_new_tokens": ["eval.max_new_tokens=32"],
    "eval.batch_size": ["eval.batch_size=5"],
    "eval.max_prompt_len": ["eval.max_prompt_len=128"],
}
# Where things are, and how often progress is logged and saved: accepted when changed.
SAME_RUN = {
    "run_id": ["run_id=\"another-name\""],
    "output.uri": ["output.uri=\"/elsewhere/runs\""],
    "training.log_every_steps": ["training.log_every_steps=5"],
    "training.checkpoint_every_steps": ["training.checkpoint_every_steps=7"],
    "dataset.uri": [f"dataset.uri=\"{ROOT / 'datasets' / 'moved.jsonl'}\""],
    "eval.uri": [f"eval.uri=\"{ROOT / 'evalsets' / 'moved.jsonl'}\""],
    "model.tokenizer_uri": [f"model.tokenizer_uri=\"{SHIPPED_TOKENIZER}\""],  # same bytes, now named
}


def leaf_fields(model: type = Manifest, prefix: str = "") -> set[str]:
    fields = set()
    for name, info in model.model_fields.items():
        kind = info.annotation
        nested = getattr(kind, "model_fields", None) if isinstance(kind, type) else None
        if nested is not None and name != "lora":  # the adapter is changed as a whole (null <-> settings)
            fields |= leaf_fields(kind, f"{prefix}{name}.")
        else:
            fields.add(prefix + name)
    return fields


def config_of(overrides: list[str], tmp_path: Path, seed: int | None = None) -> dict:
    weights = tmp_path / "weights"
    weights.mkdir(exist_ok=True)
    (weights / "model.safetensors").write_bytes(b"weights")
    m = load_manifest(str(DEMO), [o.replace("{weights}", str(weights)) for o in overrides])
    return identity.of_config(m, m.seed if seed is None else seed)


def test_every_manifest_field_is_classified():
    # schema_version has one value; model.weights_uri: test_the_weights_and_tokenizer_are_compared_by_content.
    assert leaf_fields() - {"schema_version", "model.weights_uri"} == set(CHANGES) | set(SAME_RUN)
    assert set(SAME_RUN) | {"model.weights_uri"} == set(identity.NOT_RESULTS)


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_a_field_that_changes_results_is_a_different_run(field, tmp_path):
    found = identity.differences(config_of([], tmp_path), config_of(CHANGES[field], tmp_path))
    assert any(line.startswith(field) for line in found), found
    with pytest.raises(BadInput, match="holds another run") as err:
        identity.refuse_if_different("runs/x", config_of([], tmp_path), config_of(CHANGES[field], tmp_path))
    assert field in str(err.value) and "new run_id" in str(err.value) and "--fresh" in str(err.value)


@pytest.mark.parametrize("field", sorted(SAME_RUN))
def test_a_field_that_cannot_change_results_is_the_same_run(field, tmp_path):
    assert identity.differences(config_of([], tmp_path), config_of(SAME_RUN[field], tmp_path)) == []


def test_differences_read_as_the_fix_needs_them(tmp_path):
    old = {**config_of([], tmp_path), "dataset_sha256": "a" * 64, "eval_sha256": "b" * 64}
    new = {**config_of(["training.learning_rate=0.01"], tmp_path), "dataset_sha256": "c" * 64, "eval_sha256": "b" * 64}
    assert identity.differences(old, new) == ["dataset_sha256 changed", "training.learning_rate: 0.005 → 0.01"]
    # An attempt killed before it read its data recorded no hashes: nothing to compare them with yet.
    assert identity.differences({k: v for k, v in old.items() if k != "dataset_sha256"}, old) == []
    assert identity.differences(old, config_of([], tmp_path, seed=1234)) == []


def test_the_weights_and_tokenizer_are_compared_by_content(tmp_path):
    weights = tmp_path / "weights"
    first = config_of(CHANGES["model.preset"], tmp_path)
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "model.safetensors").write_bytes(b"weights")  # the same files elsewhere: the same run
    os.utime(moved / "model.safetensors", (0, os.stat(weights / "model.safetensors").st_mtime))
    assert identity.differences(first, config_of([*CHANGES["model.preset"], f"model.weights_uri=\"{moved}\""],
                                                 tmp_path)) == []
    (weights / "model.safetensors").write_bytes(b"other weights")
    assert identity.differences(first, config_of(CHANGES["model.preset"], tmp_path)) == ["weights changed"]
    other_tokenizer = tmp_path / "tok.model"
    other_tokenizer.write_bytes(SHIPPED_TOKENIZER.read_bytes() + b"\0")
    assert identity.differences(config_of([], tmp_path), config_of([f"model.tokenizer_uri=\"{other_tokenizer}\""],
                                                                   tmp_path)) == ["tokenizer_sha256 changed"]


# ----------------------------------------------------------------------------- whose directory


@pytest.mark.parametrize("contents", [{}, {LEASE_FILE: "{}"},
                                      {"run_manifest.json": json.dumps({"format": RUN_FORMAT}), "other": "x"},
                                      {"run_manifest.json": json.dumps({"versions": {"tunix-rt-job": "0.1.0"}})}])
def test_a_directory_the_job_made_or_an_empty_one_is_ours(tmp_path, contents):
    run = tmp_path / "run"
    if contents:
        run.mkdir()
    for name, text in contents.items():
        (run / name).write_text(text)
    RunDir(str(run)).refuse_if_not_ours()


@pytest.mark.parametrize("contents", [
    {"thesis.tex": "my work"}, {"run_manifest.json": "not json", "a": "1"},
    {"run_manifest.json": json.dumps({"format": "someone-else/1"})}, {"run_manifest.json": "[1, 2]"},
    {"sub/notes.txt": "x", LEASE_FILE: "{}"}, {"status.json": "{}"},
])
def test_any_other_directory_is_refused_naming_what_is_in_it(tmp_path, contents):
    run = tmp_path / "run"
    for name, text in contents.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(BadInput, match="not a run directory of this job") as err:
        RunDir(str(run)).refuse_if_not_ours()
    assert next(iter(contents)).split("/")[0] in str(err.value) and "Nothing was touched" in str(err.value)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_bucket_prefix_follows_the_same_rule(gcs_bucket):
    io.write_text(f"{gcs_bucket}/mine/notes.txt", "x")
    with pytest.raises(BadInput, match="notes.txt"):
        RunDir(f"{gcs_bucket}/mine").refuse_if_not_ours()
    io.write_json(f"{gcs_bucket}/ours/run_manifest.json", {"format": RUN_FORMAT})
    RunDir(f"{gcs_bucket}/ours").refuse_if_not_ours()
    RunDir(f"{gcs_bucket}/new").refuse_if_not_ours()


@pytest.mark.parametrize("run, inside", [
    ("/data", "/data/train.jsonl"), ("/data/", "/data/sub/../train.jsonl"), ("/", "/data/x.jsonl"),
    ("/data/weights/run", "/data/weights"), ("/data/train.jsonl/run", "/data/train.jsonl"),
    ("gs://b/runs/r", "gs://b/runs/r/eval.jsonl"), ("gs://b", "gs://b/x.json"), ("gs://b/a/../c", "gs://b/c/m.json"),
    ("file:///data", "/data/m.json"),
])
def test_a_run_directory_around_or_inside_an_input_is_refused(run, inside):
    with pytest.raises(BadInput, match="apart from the run's inputs"):
        RunDir(run).refuse_inputs_inside({"dataset.uri": inside, "model.weights_uri": None})


@pytest.mark.parametrize("run, other", [("/data/run", "/data/runner.jsonl"), ("gs://b/runs/r", "gs://b/runs/r2/x"),
                                         ("gs://b/r", "gs://c/r/x"), ("/runs/r", "gs://b/runs/r/x")])
def test_a_run_directory_beside_the_inputs_is_fine(run, other):
    RunDir(run).refuse_inputs_inside({"dataset.uri": other})


def test_output_uri_dot_dot_never_touches_the_manifest_dataset_or_eval_set(tmp_path):
    """The reported case: output.uri ".." with --fresh removed the manifest, the dataset and the eval set."""
    from job.run import run_job

    folder = tmp_path / "project"
    folder.mkdir()
    for name in ("data.jsonl", "eval.jsonl"):
        (folder / name).write_bytes((ROOT / ("datasets/arith_train.jsonl" if name == "data.jsonl" else "evalsets/arith_eval.jsonl")).read_bytes())
    manifest = json.loads(DEMO.read_text())
    manifest.update(run_id="project", dataset={"uri": "data.jsonl", "format": "trace"}, output={"uri": ".."})
    manifest["eval"]["uri"] = "eval.jsonl"
    (folder / "m.json").write_text(json.dumps(manifest))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for fresh in (True, False):
        with pytest.raises(BadInput, match="apart from the run's inputs"):
            run_job(str(folder / "m.json"), fresh=fresh)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
