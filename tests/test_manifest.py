"""Tests for job.manifest: validation messages, overrides, URI resolution, run ids, the schema file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from job import io
from job.errors import BadInput
from job.manifest import Manifest, derive_run_id, json_schema, load_manifest, parse_manifest, run_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_FILE = os.path.join(REPO, "manifests", "run_manifest.schema.json")


def minimal(**sections):
    data = {
        "dataset": {"uri": "gs://b/train.jsonl"},
        "eval": {"uri": "gs://b/eval.jsonl"},
        "output": {"uri": "gs://b/runs"},
    }
    data.update(sections)
    return data


def problems(data, **kwargs) -> list[str]:
    """The problem lines of the BadInput that parsing `data` must raise (header dropped)."""
    with pytest.raises(BadInput) as caught:
        parse_manifest(data, **kwargs)
    return str(caught.value).splitlines()[1:]


def test_valid_manifest_with_defaults():
    m = parse_manifest(
        minimal(
            seed=3,
            model={"preset": "gemma3_1b_it", "weights_uri": "gs://w/1b", "tokenizer_uri": "gs://w/t.model"},
            training={"steps": 20, "warmup_steps": 20, "lora": {"rank": 4}},
        )
    )
    assert isinstance(m, Manifest)
    assert m.schema_version == 1 and m.seed == 3 and m.run_id is None
    assert m.dataset.format == "auto" and m.dataset.holdout == 16 and m.dataset.max_reject_fraction == 0.1
    assert m.template.recipe == "trace_sft_v1" and m.model.dtype == "float32"
    assert m.training.lora.rank == 4 and m.training.lora.alpha == 16.0 and m.training.max_grad_norm == 1.0
    assert m.eval.max_new_tokens == 128 and m.output.uri == "gs://b/runs"


def test_every_problem_is_reported_one_per_line():
    lines = problems(
        minimal(dataset={"uri": "x", "fromat": "trace"}, training={"steps": -5, "learning_rate": "1e-3"}, output={}),
        base_uri="/m/manifest.json",
    )
    assert lines == [
        "dataset.fromat: unknown field; did you mean dataset.format?",
        "training.steps: too small (got -5); use a value >= 1",
        'training.learning_rate: must be a number (got "1e-3"); write it as a number',
        "output.uri: required field is missing; add it",
    ]


def test_header_names_the_manifest():
    with pytest.raises(BadInput, match=r"^gs://b/m.json: 1 problem in the run manifest:\ntraining.steps"):
        parse_manifest(minimal(training={"steps": 0}), base_uri="gs://b/m.json")


def test_unknown_field_without_a_close_match_lists_the_known_ones():
    (line,) = problems(minimal(template={"colour": "red"}))
    assert line.startswith("template.colour: unknown field; remove it (known fields here: recipe, system_instruction")


@pytest.mark.parametrize("run_id", ["../x", "..", ".", ".hidden", "a/b", "", "x" * 101, "sp ace"])
def test_unsafe_run_ids_are_rejected(run_id):
    (line,) = problems(minimal(run_id=run_id))
    assert line.startswith("run_id: must be 1-100 letters")
    shown = json.dumps(run_id) if len(run_id) < 50 else json.dumps(run_id)[:77] + "..."  # long values are cut
    assert f"(got {shown})" in line


def test_safe_run_id_is_used_as_given():
    m = parse_manifest(minimal(run_id="gemma-1b_lora.7"))
    assert derive_run_id(m) == "gemma-1b_lora.7"
    assert run_dir(m, derive_run_id(m)) == "gs://b/runs/gemma-1b_lora.7"


def test_ranges_and_types():
    lines = problems(
        minimal(
            seed=2**32,
            dataset={"uri": "", "max_reject_fraction": 1.5},
            training={
                "batch_size": True, "max_seq_len": 8, "steps": 5, "warmup_steps": 6, "lora": {"module_path": "("}
            },
            eval={"uri": "e", "max_prompt_len": 4},
        )
    )
    assert lines == [
        "seed: too large (got 4294967296); use a value < 4294967296",
        "dataset.uri: must not be empty; give a value",
        "dataset.max_reject_fraction: too large (got 1.5); use a value <= 1.0",
        "training.batch_size: must be a whole number (got true); write it as a whole number",
        "training.max_seq_len: too small (got 8); use a value >= 16",
        "training.lora.module_path: not a regular expression (missing ), unterminated subpattern at position 0)"
        ' (got "("); fix the pattern',
        "eval.max_prompt_len: too small (got 4); use a value >= 8",
    ]
    # warm-up against steps is checked once the section's own fields are valid
    assert problems(minimal(training={"steps": 5, "warmup_steps": 6})) == [
        "training.warmup_steps: more than training.steps (5) (got 6); use at most 5"
    ]


def test_non_tiny_preset_needs_weights_and_tokenizer():
    lines = problems(minimal(model={"preset": "gemma3_4b_it"}))
    assert lines == [
        "model.weights_uri: required for preset gemma3_4b_it (got null); point it at the checkpoint, "
        "e.g. gs://gemma-data/checkpoints/gemma3-4b-it",
        "model.tokenizer_uri: required for preset gemma3_4b_it (got null); "
        "e.g. gs://gemma-data/tokenizers/tokenizer_gemma3.model",
    ]
    (line,) = problems(minimal(model={"preset": "gemma3_1b_pt", "weights_uri": "gs://w/1b"}))
    assert line.startswith("model.tokenizer_uri: required for preset gemma3_1b_pt")


def test_bad_preset_lists_the_choices():
    (line,) = problems(minimal(model={"preset": "gemma2_2b"}))
    assert line.startswith('model.preset: not an allowed value (got "gemma2_2b"); use one of \'tiny\'')
    assert "'gemma3_27b_it'" in line


def test_relative_uris_resolve_against_a_gcs_manifest():
    m = parse_manifest(
        {
            "dataset": {"uri": "data/train.jsonl"},
            "model": {"weights_uri": "../weights", "tokenizer_uri": "gs://other/t.model"},
            "eval": {"uri": "./eval.jsonl"},
            "output": {"uri": "runs"},
        },
        base_uri="gs://bkt/exp/m.json",
    )
    assert m.dataset.uri == "gs://bkt/exp/data/train.jsonl"
    assert m.model.weights_uri == "gs://bkt/weights"
    assert m.model.tokenizer_uri == "gs://other/t.model"
    assert m.eval.uri == "gs://bkt/exp/eval.jsonl"
    assert run_dir(m, "r1") == "gs://bkt/exp/runs/r1"


def test_load_manifest_from_a_local_file_resolves_relative_uris(tmp_path):
    path = tmp_path / "exp" / "m.json"
    io.write_json(
        str(path),
        {"dataset": {"uri": "train.jsonl"}, "eval": {"uri": "../evalsets/e.jsonl"}, "output": {"uri": "/abs/out"}},
    )
    m = load_manifest(str(path))
    assert m.dataset.uri == str(tmp_path / "exp" / "train.jsonl")
    assert m.eval.uri == str(tmp_path / "evalsets" / "e.jsonl")
    assert m.output.uri == "/abs/out"


def test_load_manifest_reports_json_errors_with_position(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{"dataset": {"uri": "x"},\n "eval": }')
    with pytest.raises(BadInput, match=rf"^{path}:2:10: not valid JSON"):
        load_manifest(str(path))
    with pytest.raises(BadInput, match="m2.json: not found"):
        load_manifest(str(tmp_path / "m2.json"))


def test_load_manifest_from_memory_store():
    io.write_json("memory://manifests-t/m.json", minimal(dataset={"uri": "d.jsonl"}))
    try:
        assert load_manifest("memory://manifests-t/m.json").dataset.uri == "memory://manifests-t/d.jsonl"
    finally:
        io.remove("memory://manifests-t", recursive=True)


def test_overrides():
    m = parse_manifest(
        minimal(training={"steps": 5, "max_grad_norm": 0.5}),
        overrides=[
            "training.steps=10",  # JSON int
            "training.max_grad_norm=null",
            "training.lora={\"rank\": 4}",
            "training.lora.alpha=8",  # nested into what the previous override made
            "template.system_instruction=Be brief = and exact",  # not JSON: a string, "=" kept
            "seed=7",
            "dataset.shuffle=false",
            "model.weights_uri=gs://w/x",
        ],
    )
    assert m.training.steps == 10 and m.training.max_grad_norm is None
    assert m.training.lora.rank == 4 and m.training.lora.alpha == 8.0
    assert m.template.system_instruction == "Be brief = and exact"
    assert m.seed == 7 and m.dataset.shuffle is False and m.model.weights_uri == "gs://w/x"


def test_overrides_create_missing_sections_and_are_validated():
    m = parse_manifest(minimal(), overrides=["training.lora.rank=2"])  # neither training nor lora given
    assert m.training.lora.rank == 2
    assert problems(minimal(), overrides=["training.stepz=3"]) == [
        "training.stepz: unknown field; did you mean training.steps?"
    ]


@pytest.mark.parametrize("bad", ["foo", "=3", "training..steps=1", "dataset.uri.x=1"])
def test_malformed_override_names_it(bad):
    with pytest.raises(BadInput, match=f"^override {bad!r}"):
        parse_manifest(minimal(), overrides=[bad])


def test_comment_keys_are_dropped_at_every_level():
    m = parse_manifest(
        {
            "//": "top comment",
            "// why lora": "memory",
            "dataset": {"uri": "gs://b/t.jsonl", "//": "newest first"},
            "training": {"lora": {"// rank": "small data", "rank": 2}},
            "eval": {"uri": "gs://b/e.jsonl"},
            "output": {"uri": "gs://b/o"},
        }
    )
    assert m.training.lora.rank == 2
    assert problems(minimal(dataset={"uri": "x", "/ not a comment": 1})) == [
        "dataset./ not a comment: unknown field; remove it (known fields here: uri, format, limit, "
        "max_reject_fraction, holdout, shuffle)"
    ]


def test_derive_run_id_is_stable_and_sensitive():
    base = parse_manifest(minimal())
    run_id = derive_run_id(base)
    assert run_id.startswith("run-") and len(run_id) == 16 and int(run_id[4:], 16) >= 0
    assert derive_run_id(parse_manifest(minimal())) == run_id
    # spelling out a default or adding a comment is the same manifest
    assert derive_run_id(parse_manifest(minimal(training={"steps": 100}, **{"//": "note"}))) == run_id
    changed = [
        minimal(training={"steps": 101}),
        minimal(training={"lora": {}}),
        minimal(seed=0),
        minimal(dataset={"uri": "gs://b/other.jsonl"}),
        minimal(template={"step_instruction": "Show your work as steps"}),
        minimal(eval={"uri": "gs://b/eval.jsonl", "limit": 5}),
    ]
    ids = {derive_run_id(parse_manifest(d)) for d in changed}
    assert len(ids) == len(changed) and run_id not in ids
    assert derive_run_id(parse_manifest(minimal(seed=1))) != derive_run_id(parse_manifest(minimal(seed=2)))


def test_schema_file_is_in_sync():
    expected = json.dumps(json_schema(), indent=2) + "\n"
    with open(SCHEMA_FILE, encoding="utf-8") as f:
        on_disk = f.read()
    assert on_disk == expected, (
        "manifests/run_manifest.schema.json is out of date; regenerate it with "
        "`python -m job schema > manifests/run_manifest.schema.json`"
    )


def test_schema_describes_every_field_and_allows_comments():
    schema = json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/") and schema["title"]
    objects = [schema, *schema["$defs"].values()]
    for obj in objects:
        assert obj["description"] and obj["additionalProperties"] is False
        assert obj["patternProperties"] == {"^//": {}}
        for name, prop in obj["properties"].items():
            assert prop.get("description"), f"{obj.get('title')}.{name} has no description"
    assert set(schema["required"]) == {"dataset", "eval", "output"}


def test_non_object_manifest_is_bad_input():
    with pytest.raises(BadInput, match=r"^manifest: a run manifest must be a JSON object"):
        parse_manifest([1, 2])  # type: ignore[arg-type]


EXAMPLES = sorted(p for p in (Path(__file__).resolve().parent.parent / "manifests").glob("*.json")
                  if not p.name.endswith(".schema.json"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_manifest_is_valid(path):
    m = load_manifest(str(path))
    assert m.output.uri and m.dataset.uri and m.eval.uri


# ------------------------------------------------------------------------------- bounds and reading

# Every numeric field has an upper bound: (field, the first value past it).
PAST_THE_BOUND = [
    ("dataset.limit", 10**9 + 1), ("dataset.holdout", 100_001), ("training.steps", 10_000_001),
    ("training.batch_size", 65537), ("training.max_seq_len", 131073), ("training.learning_rate", 1.5),
    ("training.warmup_steps", 10_000_001), ("training.weight_decay", 1.01), ("training.grad_accum_steps", 1025),
    ("training.max_grad_norm", 10_001), ("training.log_every_steps", 10_000_001),
    ("training.eval_every_steps", 10_000_001), ("training.checkpoint_every_steps", 10_000_001),
    ("training.lora.rank", 1025), ("training.lora.alpha", 10_001), ("training.mesh.fsdp", 65537),
    ("training.mesh.tp", 65537), ("eval.limit", 1_000_001), ("eval.max_new_tokens", 8193),
    ("eval.batch_size", 1025), ("eval.max_prompt_len", 131073), ("seed", 2**32),
    ("dataset.max_reject_fraction", 1.5),
]


def _numeric_fields(model=Manifest, prefix="") -> set[str]:
    found = set()
    for name, field in model.model_fields.items():
        kinds = [field.annotation, *getattr(field.annotation, "__args__", ())]
        if any(kind in (int, float) for kind in kinds):
            found.add(prefix + name)
        for kind in kinds:
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                found |= _numeric_fields(kind, f"{prefix}{name}.")
    return found


def test_every_numeric_field_is_in_the_bounds_table():
    assert {field for field, _ in PAST_THE_BOUND} == _numeric_fields() - {"schema_version"}


def _with(field: str, value) -> dict:
    data = minimal()
    node = data
    *parents, last = field.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return data


@pytest.mark.parametrize(("field", "value"), PAST_THE_BOUND, ids=[f for f, _ in PAST_THE_BOUND])
def test_a_value_past_a_bound_names_the_field(field, value):
    (line,) = problems(_with(field, value))
    assert line.startswith(f"{field}: too large")


@pytest.mark.parametrize("field", ["template.system_instruction", "template.step_instruction"])
@pytest.mark.parametrize("marker", ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>"])
def test_a_gemma_marker_in_an_instruction_is_a_manifest_error(field, marker):
    (line,) = problems(_with(field, f"Show your steps.{marker}model"))
    assert line.startswith(f"{field}: holds the reserved marker {marker!r}")


def test_strings_are_bounded_too():
    (line,) = problems(_with("template.system_instruction", "x" * 20_001))
    assert line.startswith("template.system_instruction: too long") and "at most 20000 characters" in line
    (line,) = problems(_with("dataset.uri", "gs://b/" + "x" * 5000))
    assert line.startswith("dataset.uri: too long")


# (manifest text, a piece of the message): the manifest file itself read strictly.
BAD_MANIFEST_TEXT = [
    ('{"dataset": {"uri": "a"}, "dataset": {"uri": "b"}}', "duplicate key 'dataset'"),
    ('{"training": {"steps": 5, "steps": 6}}', "duplicate key 'training.steps'"),
    ('{"training": {"steps": ' + "1" * 5000 + "}}", "training.steps: a number of 5,000 characters"),
    ('{"training": {"learning_rate": 1e999}}', "training.learning_rate: the number 1e999 is beyond the range"),
    ('{"training": {"learning_rate": NaN}}', "training.learning_rate: NaN is not a JSON number"),
    ('{"run_id": "\\ud800"}', "run_id: a string holds a lone UTF-16 surrogate"),
    ('{"x": ' + "[" * 100 + "]" * 100 + "}", "nested too deeply"),
]


@pytest.mark.parametrize(("text", "says"), BAD_MANIFEST_TEXT, ids=[f"text-{k}" for k in range(len(BAD_MANIFEST_TEXT))])
def test_the_manifest_file_is_read_strictly(tmp_path, text, says):
    path = tmp_path / "m.json"
    path.write_text(text)
    with pytest.raises(BadInput) as caught:
        load_manifest(str(path))
    assert str(caught.value).startswith(f"{path}: ") and says in str(caught.value)


def test_repeated_comment_keys_are_comments(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{"//": "one", "//": "two", ' + json.dumps(minimal())[1:])
    assert load_manifest(str(path)).dataset.uri == "gs://b/train.jsonl"


def test_a_file_too_big_to_be_a_manifest_is_not_read(tmp_path):
    path = tmp_path / "m.json"
    with open(path, "wb") as f:
        f.seek(2**20)
        f.write(b"}")
    with pytest.raises(BadInput, match=rf"^{path}: 1,048,577 bytes is no run manifest"):
        load_manifest(str(path))


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("training.steps=" + "9" * 5000, "--set training.steps: a number of 5,000 characters"),
        ("training.learning_rate=1e999", "--set training.learning_rate: the number 1e999 is beyond the range"),
        ("training.learning_rate=NaN", "--set training.learning_rate: NaN is not a JSON number"),
        ('training.lora={"rank": 2, "rank": 4}', "--set training.lora: duplicate key 'rank'"),
        ('run_id="\\ud800"', "--set run_id: a string holds a lone UTF-16 surrogate"),
        ("run_id=a\udcffb", "--set run_id: the text holds a lone UTF-16 surrogate (\\udcff)"),  # argv not UTF-8
        ("template.system_instruction=" + "[" * 100_000, "--set template.system_instruction: nested too deeply"),
        ("eval.batch_size=1000000000", "eval.batch_size: too large"),
        ("trai\udcffning.steps=1", "override 'trai\\udcffning.steps=1': expected field.path=value"),
    ],
)
def test_set_values_are_read_strictly(override, says):
    with pytest.raises(BadInput) as caught:
        parse_manifest(minimal(), overrides=[override])
    assert says in str(caught.value)


# --------------------------------------------------------------------------------- properties

HOSTILE_VALUES = st.sampled_from(["9" * 5000, "1e999", "NaN", "-Infinity", '"\\ud800"', "[" * 3000 + "]" * 3000,
                                  '{"a": 1, "a": 2}', "0." + "1" * 500, "10" + "0" * 99])
VALUE_TEXT = st.one_of(HOSTILE_VALUES, st.text(max_size=30),
                       st.recursive(st.integers() | st.floats() | st.text(max_size=8) | st.none(),
                                    lambda inner: st.lists(inner, max_size=3), max_leaves=6).map(json.dumps))
FIELDS = st.sampled_from(["training.steps", "training.learning_rate", "eval.batch_size", "dataset.holdout",
                          "template.step_instruction", "run_id", "training.lora", "training.mesh.tp", "seed"])


@settings(max_examples=200, deadline=None)
@given(FIELDS, VALUE_TEXT)
def test_any_set_value_gives_a_manifest_or_a_bad_input_naming_the_field(field, text):
    try:
        m = parse_manifest(minimal(), overrides=[f"{field}={text}"])
    except BadInput as e:
        assert field in str(e) or field.rsplit(".", 1)[0] in str(e), str(e)
    else:
        json.dumps(m.model_dump(mode="json")).encode("utf-8")


@settings(max_examples=100, deadline=None)
@given(FIELDS, VALUE_TEXT)
def test_any_value_in_a_manifest_file_gives_a_manifest_or_a_bad_input(tmp_path_factory, field, text):
    path = tmp_path_factory.mktemp("m") / "m.json"
    section, _, name = field.partition(".")
    body = f'"{section}": {text}' if not name else f'"{section}": {{"{name.split(".")[0]}": {text}}}'
    path.write_text("{" + json.dumps(minimal())[1:-1] + ", " + body + "}", encoding="utf-8", errors="surrogatepass")
    try:
        assert isinstance(load_manifest(str(path)), Manifest)
    except BadInput as e:
        assert str(e).startswith(str(path))
