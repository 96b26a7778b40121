"""The run manifest: one JSON document that describes a whole run (data, template, model, training,
evaluation, outputs), validated strictly, with command-line overrides, relative URI resolution, a
deterministic run id and a JSON Schema for editors.

A manifest is JSON, so it has no comment syntax; instead any key named "//" or starting with "//",
at any level, is a comment and is dropped before validation:

    {"// why": "small steps: the data set is tiny", "training": {"steps": 20, "//": "see issue 12"}}

Relative URIs (dataset.uri, model.weights_uri, model.tokenizer_uri, eval.uri, output.uri) are
resolved against the folder holding the manifest, so a manifest and its data travel together.
Every problem is reported at once, one per line, as `field.path: what is wrong (got value); fix`.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from job import io, strict_json
from job.errors import BadInput
from job.formats import DETECT_WINDOW, FORMATS, RESERVED_MARKERS, find_marker
from job.template import DEFAULT_RECIPE, RECIPES

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_TITLE = "tunix-rt run manifest"
Preset = Literal[
    "tiny",
    "gemma3_270m",
    "gemma3_270m_it",
    "gemma3_1b_pt",
    "gemma3_1b_it",
    "gemma3_4b_pt",
    "gemma3_4b_it",
    "gemma3_12b_pt",
    "gemma3_12b_it",
    "gemma3_27b_pt",
    "gemma3_27b_it",
]
PRESETS: tuple[str, ...] = get_args(Preset)
_RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,100}")
_RULE = "manifest_rule"  # error type of this module's own checks; ctx["problems"] holds them
# Upper bounds of what a run can use, so that a slip of the keyboard (10^9 for 10^3) is an error
# here rather than an allocation that fails, or a run that never ends, later.
MAX_STEPS = 10_000_000
MAX_URI = 4096  # characters of a URI (GCS object names are at most 1024 bytes)
MAX_INSTRUCTION = 20_000  # characters of a template instruction (added to every example)
MAX_MANIFEST_BYTES = 2**20  # a manifest is a few KB; this much is no manifest


def _problem(*problems: tuple[str | None, str, str, Any]) -> PydanticCustomError:
    """An error carrying (field or None for the validated value itself, what, fix, got) tuples."""
    return PydanticCustomError(_RULE, "{summary}", {"summary": "; ".join(p[1] for p in problems), "problems": problems})


class _Section(BaseModel):
    # Unknown keys are errors (a typo must not silently fall back to a default); no type coercion
    # ("10" is not 10); no NaN/inf. Keys starting with "//" are comments, so schemas allow them.
    model_config = ConfigDict(
        extra="forbid", strict=True, allow_inf_nan=False, json_schema_extra={"patternProperties": {"^//": {}}}
    )


class DatasetSpec(_Section):
    """The training data: where it is, its shape, and how much of it to use."""

    uri: str = Field(
        min_length=1, max_length=MAX_URI,
        description="File to train on (JSONL, optionally .gz); relative to the manifest's folder.",
    )
    format: Literal[("auto", *FORMATS)] = Field(
        "auto", description=f"Record shape; auto detects it from the first {DETECT_WINDOW} records (a file holds one format)."
    )
    limit: int | None = Field(None, ge=1, le=10**9, description="Read at most this many records (null: all).")
    max_reject_fraction: float = Field(
        0.1, ge=0, le=1, description="Fail the run when more than this fraction of records is rejected."
    )
    holdout: int = Field(16, ge=0, le=100_000, description="Examples held out of training to measure eval loss.")
    shuffle: bool = Field(True, description="Shuffle the examples (with the run's seed) before training.")


class TemplateSpec(_Section):
    """How examples are rendered into Gemma chat turns."""

    recipe: Literal[tuple(RECIPES)] = Field(DEFAULT_RECIPE, description="Rendering recipe.")
    system_instruction: str | None = Field(
        None, max_length=MAX_INSTRUCTION, description="System text folded into the first user turn."
    )
    step_instruction: str | None = Field(
        None, max_length=MAX_INSTRUCTION, description="Instruction added to the user turn asking for steps."
    )

    @field_validator("system_instruction", "step_instruction")
    @classmethod
    def _no_markers(cls, value: str | None) -> str | None:
        # Rendered into every prompt, a marker would forge or close a turn (and the eval refuses it).
        marker = find_marker(value) if value is not None else None
        if marker is not None:
            what = f"holds the reserved marker {marker!r}"
            raise _problem((None, what, f"remove it; Gemma's control tokens ({', '.join(RESERVED_MARKERS)}) "
                            "may not appear in instructions", value))
        return value


class ModelSpec(_Section):
    """The model to fine-tune and where its weights and tokenizer come from."""

    preset: Preset = Field("tiny", description="Model architecture; tiny is a small random model for tests.")
    weights_uri: str | None = Field(
        None, min_length=1, max_length=MAX_URI,
        description="Checkpoint to start from (safetensors folder or Orbax checkpoint).",
    )
    weights_format: Literal["auto", "safetensors", "orbax", "job"] = Field(
        "auto", description="Checkpoint format; auto detects it from the files."
    )
    tokenizer_uri: str | None = Field(
        None, min_length=1, max_length=MAX_URI,
        description="SentencePiece model file; null uses the tokenizer shipped with the job (tiny only).",
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Parameter and compute dtype.")

    @model_validator(mode="after")
    def _real_models_need_weights(self) -> ModelSpec:
        if self.preset == "tiny":
            return self
        name = self.preset.replace("_", "-") + ("-pt" if self.preset.count("_") == 1 else "")
        needed = f"required for preset {self.preset}"
        problems = []
        if self.weights_uri is None:
            fix = f"point it at the checkpoint, e.g. gs://gemma-data/checkpoints/{name}"
            problems.append(("weights_uri", needed, fix, None))
        if self.tokenizer_uri is None:
            fix = "e.g. gs://gemma-data/tokenizers/tokenizer_gemma3.model"
            problems.append(("tokenizer_uri", needed, fix, None))
        if problems:
            raise _problem(*problems)
        return self


class LoraSpec(_Section):
    """Low-rank adapters: train small matrices beside the frozen weights."""

    rank: int = Field(8, ge=1, le=1024, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, le=10_000, description="Adapter scale numerator (scale = alpha / rank).")
    module_path: str = Field(
        ".*q_einsum|.*kv_einsum|.*attn_vec_einsum|.*gate_proj|.*up_proj|.*down_proj",
        max_length=1000, description="Regular expression of the module paths that get adapters.",
    )

    @field_validator("module_path")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as e:
            raise _problem((None, f"not a regular expression ({e})", "fix the pattern", value)) from None
        return value


class MeshSpec(_Section):
    """How the devices of all processes are laid out: data-parallel (fsdp, weights sharded too) x tensor-parallel."""

    fsdp: int = Field(-1, ge=-1, le=65536, description="Devices on the fsdp axis (batch rows and weights split); -1: the rest.")
    tp: int = Field(1, ge=-1, le=65536, description="Devices on the tensor-parallel axis; -1: the rest.")

    @model_validator(mode="after")
    def _no_zero(self) -> MeshSpec:
        for name in ("fsdp", "tp"):
            if getattr(self, name) == 0:
                raise _problem((name, "is 0", "use a positive size or -1 for the rest", 0))
        return self


class TrainingSpec(_Section):
    """The optimisation: steps, batch, sequence length, learning rate, adapters, checkpoints."""

    steps: int = Field(100, ge=1, le=MAX_STEPS, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, le=65536, description="Rows per micro-batch (one example each, or several with packing).")
    max_seq_len: int = Field(256, ge=16, le=131072, description="Tokens per row; the longest example allowed, prompt and completion together.")
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Peak learning rate.")
    warmup_steps: int = Field(10, ge=0, le=MAX_STEPS, description="Linear warm-up steps; at most steps.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    grad_accum_steps: int = Field(1, ge=1, le=1024, description="Micro-batches accumulated per optimizer step.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, le=10_000, description="Clip the gradient to this global norm (null: no clipping)."
    )
    lora: LoraSpec | None = Field(
        None, description="Train LoRA adapters instead of all weights (null: full fine-tuning)."
    )
    packing: bool = Field(
        True, description="Pack several whole examples into each row (attention stays within each example)."
    )
    length_policy: Literal["reject", "truncate"] = Field(
        "reject", description="What to do with examples longer than max_seq_len."
    )
    log_every_steps: int = Field(10, ge=1, le=MAX_STEPS, description="Write metrics every this many steps.")
    eval_every_steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="Measure eval loss on the holdout every this many steps."
    )
    checkpoint_every_steps: int = Field(50, ge=1, le=MAX_STEPS, description="Save a checkpoint every this many steps.")
    mesh: MeshSpec = Field(
        default_factory=MeshSpec, description="Device mesh over every process's devices; batch_size must divide by fsdp."
    )

    @model_validator(mode="after")
    def _warmup_within_steps(self) -> TrainingSpec:
        if self.warmup_steps > self.steps:
            what = f"more than training.steps ({self.steps})"
            raise _problem(("warmup_steps", what, f"use at most {self.steps}", self.warmup_steps))
        return self


class EvalSpec(_Section):
    """The evaluation set scored before and after training."""

    uri: str = Field(min_length=1, max_length=MAX_URI, description="Eval set file (JSONL); relative to the manifest's folder.")
    limit: int | None = Field(None, ge=1, le=1_000_000, description="Score at most this many items (null: all).")
    max_new_tokens: int = Field(128, ge=1, le=8192, description="Tokens generated per answer.")
    batch_size: int = Field(16, ge=1, le=1024, description="Prompts decoded together.")
    max_prompt_len: int = Field(128, ge=8, le=131072, description=(
        "Prompts are left-padded to this many tokens (one compiled sampler each), or to the first doubling of it that fits."))


class OutputSpec(_Section):
    """Where the run writes its results."""

    uri: str = Field(min_length=1, max_length=MAX_URI,
                     description="Parent folder of run directories; the run writes to {uri}/{run_id}.")


class Manifest(_Section):
    """A tunix-rt training run: data, template, model, training, evaluation and outputs."""

    schema_version: Literal[1] = Field(1, description="Version of this manifest format.")
    run_id: str | None = Field(
        None, description="Name of the run directory; null derives one from the manifest's content."
    )
    seed: int | None = Field(None, ge=0, lt=2**32, description="Random seed for shuffling and initialisation.")
    dataset: DatasetSpec = Field(description="Training data.")
    template: TemplateSpec = Field(default_factory=TemplateSpec, description="Chat rendering.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Model and weights.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimisation.")
    eval: EvalSpec = Field(description="Evaluation before and after training.")
    output: OutputSpec = Field(description="Run outputs.")

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, value: str | None) -> str | None:
        # The id becomes a directory name: no separators, no "." / ".." / hidden names.
        if value is not None and (not _RUN_ID.fullmatch(value) or value.startswith(".")):
            raise _problem(
                (
                    None,
                    'must be 1-100 letters, digits, "-", "_" or "." and must not start with "."',
                    'choose a name like "gemma-1b-lora-7", or null to derive one',
                    value,
                )
            )
        return value


_URI_FIELDS = (
    ("dataset", "uri"),
    ("model", "weights_uri"),
    ("model", "tokenizer_uri"),
    ("eval", "uri"),
    ("output", "uri"),
)


# ------------------------------------------------------------------------------- error messages


def _show(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _path(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc)


def _model_at(loc: Sequence[Any]) -> type[BaseModel] | None:
    """The section model found by following field names from Manifest (None for non-models)."""
    model: type[BaseModel] = Manifest
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        found = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if found is None:
            return None
        model = found
    return model


def _unknown_field(loc: Sequence[Any]) -> str:
    parent, name = loc[:-1], str(loc[-1])
    model = _model_at(parent)
    known = list(model.model_fields) if model else []
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"{_path(loc)}: unknown field; did you mean {_path([*parent, close[0]])}?"
    return f"{_path(loc)}: unknown field; remove it (known fields here: {', '.join(known)})"


_KINDS = {
    "int": "a whole number",
    "float": "a number",
    "string": "a string",
    "bool": "true or false",
    "dict": "an object {...}",
    "model": "an object {...}",
}


def _describe(error: dict[str, Any]) -> list[str]:
    """One line per problem: `field.path: what is wrong (got value); how to fix it`."""
    loc, kind, ctx = error["loc"], error["type"], error.get("ctx") or {}
    got = f" (got {_show(error.get('input'))})"
    if kind == _RULE:
        return [
            f"{_path([*loc, field] if field else loc)}: {what} (got {_show(value)}); {fix}"
            for field, what, fix, value in ctx["problems"]
        ]
    if kind == "extra_forbidden":
        return [_unknown_field(loc)]
    if kind == "missing":
        return [f"{_path(loc)}: required field is missing; add it"]
    if kind == "literal_error":
        return [f"{_path(loc)}: not an allowed value{got}; use one of {ctx['expected']}"]
    bounds = {
        "greater_than_equal": ("too small", f"use a value >= {ctx.get('ge')}"),
        "greater_than": ("too small", f"use a value > {ctx.get('gt')}"),
        "less_than_equal": ("too large", f"use a value <= {ctx.get('le')}"),
        "less_than": ("too large", f"use a value < {ctx.get('lt')}"),
        "string_too_short": ("too short", f"give at least {ctx.get('min_length')} character(s)"),
        "string_too_long": ("too long", f"use at most {ctx.get('max_length')} characters"),
        "finite_number": ("not a finite number", "use an ordinary number"),
    }
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return [f"{_path(loc)}: must not be empty; give a value"]
    if kind in bounds:
        what, fix = bounds[kind]
        return [f"{_path(loc)}: {what}{got}; {fix}"]
    type_name = kind.split("_")[0]
    if type_name in _KINDS and kind.endswith(("_type", "_parsing", "_from_float", "_attributes_type")):
        return [f"{_path(loc)}: must be {_KINDS[type_name]}{got}; write it as {_KINDS[type_name]}"]
    message = error["msg"][0].lower() + error["msg"][1:]
    return [f"{_path(loc)}: {message}{got}; see the manifest schema (python -m job schema)"]


def _bad_manifest(source: str, problems: list[str]) -> BadInput:
    header = f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''} in the run manifest:"
    return BadInput("\n".join([header, *problems]))


# ----------------------------------------------------------------------------- parse and load


def _drop_comments(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_comments(v) for k, v in value.items() if not (isinstance(k, str) and k.startswith("//"))}
    if isinstance(value, list):
        return [_drop_comments(v) for v in value]
    return value


def _override_value(key: str, raw: str) -> Any:
    """The JSON value of `raw`, or `raw` itself when it is not JSON (a bare string)."""
    try:
        return strict_json.loads(raw)
    except strict_json.JSONError as e:
        if e.line is not None:  # a syntax error: not meant as JSON
            return raw
        raise BadInput(f"--set {key}: {e.reason}") from None


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of data with each "a.b.c=value" applied; value is JSON when it parses, else a string."""
    result = copy.deepcopy(data)
    for override in overrides:
        key, sep, raw = override.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts) or not key.isprintable():
            raise BadInput(f"override {override!r}: expected field.path=value, e.g. training.steps=200")
        value = _override_value(key.strip(), raw)
        node = result
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                where = ".".join(parts[: depth + 1])
                raise BadInput(
                    f"override {override!r}: {where} is not an object, so it has no field {parts[depth + 1]!r}"
                )
        node[parts[-1]] = value
    return result


def parse_manifest(data: dict, base_uri: str | None = None, overrides: Sequence[str] = ()) -> Manifest:
    """Validate a manifest dict (comments dropped, overrides applied) and resolve its URIs."""
    source = base_uri or "manifest"
    if not isinstance(data, dict):
        raise BadInput(f"{source}: a run manifest must be a JSON object {{...}} (got {_show(data)})")
    data = apply_overrides(_drop_comments(data), overrides)
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        raise _bad_manifest(source, [line for error in e.errors() for line in _describe(error)]) from None
    updates: dict[str, dict[str, str]] = {}
    for section, field in _URI_FIELDS:
        value = getattr(getattr(manifest, section), field)
        if value is not None:
            try:
                updates.setdefault(section, {})[field] = io.resolve(value, base_uri)
            except BadInput as e:
                raise _bad_manifest(source, [f"{section}.{field}: {e}"]) from None
    return manifest.model_copy(
        update={section: getattr(manifest, section).model_copy(update=fields) for section, fields in updates.items()}
    )


def load_manifest(uri: str, overrides: Sequence[str] = ()) -> Manifest:
    """Read a manifest by URI (relative URIs in it resolve against its folder) and validate it."""
    size = io.size(uri)
    if size > MAX_MANIFEST_BYTES:
        raise BadInput(f"{uri}: {size:,} bytes is no run manifest (they are a few KB; the limit is "
                       f"{MAX_MANIFEST_BYTES:,}); check the path")
    return parse_manifest(io.read_json(uri), base_uri=uri, overrides=overrides)


# ------------------------------------------------------------------------------- run identity


def derive_run_id(m: Manifest) -> str:
    """run_id when set, else "run-" + 12 hex of the sha256 of the manifest's content.

    The hash covers everything but run_id (and seed while it is unset), so the same manifest
    always maps to the same run directory, which is what lets a rerun resume.
    """
    if m.run_id is not None:
        return m.run_id
    exclude = {"run_id"} | ({"seed"} if m.seed is None else set())
    canonical = json.dumps(m.model_dump(mode="json", exclude=exclude), sort_keys=True, separators=(",", ":"))
    return "run-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


def run_dir(m: Manifest, run_id: str) -> str:
    """The run's own directory: {output.uri}/{run_id}."""
    return io.join(m.output.uri, run_id)


def json_schema() -> dict[str, Any]:
    """The manifest's JSON Schema (manifests/run_manifest.schema.json is this, written out)."""
    schema = Manifest.model_json_schema()
    schema.pop("title", None)
    return {"$schema": JSON_SCHEMA_DIALECT, "title": SCHEMA_TITLE, **schema}
