"""Hostile and broken input, tried systematically through `tunix-job validate --all` (no training).

Each row of CASES is one kind of bad input: a manifest, dataset, eval set or run directory made wrong
in one way. Every one must end in one of three ways, never a traceback:
- error: exit 2 and an error message that names the place (field path or file:line) and what is wrong;
- reject: the run would go ahead; the bad record is rejected with a reason naming its line, and the
  books balance (records read = would train on + held out + rejected);
- accept: nothing is wrong (BOM, CRLF, blank lines are read as intended).

Validate writes nothing, and `tunix-job run` stops on each error case with the same message, before
it trains: a manifest that validates cannot fail later on input that was there to be seen.

The table is also the README's hostile-input table (scripts/reliability_table.py renders it).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from small_tokenizers import train_tokenizer

from job import cli

REPO = Path(__file__).resolve().parent.parent
GOOD_RECORDS = 20
RUN_ID = "hostile"
HOLDOUT = 2


@dataclasses.dataclass
class Inputs:
    """What one case may change before validate runs: the manifest, the dataset's lines, the eval set's lines."""

    manifest: dict
    data: list[bytes]
    eval: list[bytes]
    data_name: str = "data.jsonl"
    raw_manifest: bytes | None = None  # written instead of the manifest dict
    raw_data: bytes | None = None  # written instead of the dataset lines
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)  # more files, by path from the folder
    not_writable: list[str] = dataclasses.field(default_factory=list)  # folders the user may not write in


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # short id
    area: str  # manifest | dataset | eval set
    what: str  # the input, in words
    outcome: str  # error | reject | accept
    says: str  # a piece of the error message or reject reason
    change: Callable[[Inputs], None]
    where: str = ""  # a piece naming the place (default: the data file's line, or the field in `says`)


def _set(path: str, value) -> Callable[[Inputs], None]:
    def change(i: Inputs) -> None:
        node = i.manifest
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return change


def _line(obj) -> Callable[[Inputs], None]:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode("utf-8")
    return lambda i: i.data.append(raw)


def _trace(**fields) -> dict:
    record = {"id": "hostile", "prompts": "What is 2 + 2?", "trace_steps": ["2 + 2 = 4"], "final_answer": "4"}
    record.update(fields)
    return {k: v for k, v in record.items() if v is not None}


def _extra_file(path: str, content: bytes = b"") -> Callable[[Inputs], None]:
    return lambda i: i.files.__setitem__(path, content)


def _output_not_writable(i: Inputs) -> None:
    i.manifest["output"]["uri"] = "locked/runs"
    i.files["locked/README"] = b""
    i.not_writable.append("locked")


def _output_under_a_file(i: Inputs) -> None:
    i.manifest["output"]["uri"] = "afile/runs"
    i.files["afile"] = b"not a folder"


def _data_inside_the_run_directory(i: Inputs) -> None:
    i.data_name = f"runs/{RUN_ID}/data.jsonl"
    i.manifest["dataset"]["uri"] = i.data_name


def _another_run_recorded(i: Inputs) -> None:
    """A run directory holding a run of this manifest at another learning rate."""
    from job.identity import of_config
    from job.rundir import RUN_FORMAT, RUN_RECORD

    other = parse_manifest(json.loads(json.dumps(i.manifest)), base_uri="/elsewhere/manifest.json",
                           overrides=["training.learning_rate=0.01"])
    record = {"format": RUN_FORMAT, "seed": i.manifest["seed"], "identity": of_config(other, i.manifest["seed"])}
    i.files[f"runs/{RUN_ID}/{RUN_RECORD}"] = json.dumps(record).encode()


def _drop(section: str) -> Callable[[Inputs], None]:
    return lambda i: i.manifest.pop(section)


def _raw_manifest(raw: bytes) -> Callable[[Inputs], None]:
    return lambda i: setattr(i, "raw_manifest", raw)


def _manifest_text(old: str, new: str) -> Callable[[Inputs], None]:
    """The manifest written as text with `old` replaced by `new`: JSON no dict can hold."""
    def change(i: Inputs) -> None:
        text = json.dumps(i.manifest)
        assert old in text
        i.raw_manifest = text.replace(old, new, 1).encode()
    return change


def _file(field: str, name: str, make: Callable[[], bytes]) -> Callable[[Inputs], None]:
    """A file beside the manifest that `field` names."""
    def change(i: Inputs) -> None:
        i.files[name] = make()
        _set(field, name)(i)
    return change


def _raw_data(raw: bytes | Callable[[Inputs], bytes]) -> Callable[[Inputs], None]:
    return lambda i: setattr(i, "raw_data", raw(i) if callable(raw) else raw)


def _eval_lines(*lines: bytes) -> Callable[[Inputs], None]:
    return lambda i: setattr(i, "eval", list(lines))


def _truncated_gz(i: Inputs) -> None:
    i.data_name = "data.jsonl.gz"
    i.manifest["dataset"]["uri"] = "data.jsonl.gz"
    whole = gzip.compress(b"".join(line + b"\n" for line in i.data))
    i.raw_data = whole[: len(whole) // 2]


def _messages(*messages) -> Callable[[Inputs], None]:
    def change(i: Inputs) -> None:
        i.manifest["dataset"]["format"] = "messages"
        i.data = [json.dumps({"id": f"m{k}", "messages": [{"role": "user", "content": "Hi"},
                                                          {"role": "model", "content": "Hello"}]}).encode()
                  for k in range(GOOD_RECORDS)]
        i.data.append(json.dumps({"id": "hostile", "messages": list(messages)}).encode())
    return change


def _reasoning_trace(steps) -> Callable[[Inputs], None]:
    def change(i: Inputs) -> None:
        i.manifest["dataset"]["format"] = "reasoning_trace"
        good = [{"i": 0, "type": "reasoning", "content": "2 + 2 = 4"}]
        i.data = [json.dumps({"trace_version": "1", "prompt": "What is 2 + 2?", "final_answer": "4", "steps": good,
                              "meta": {"id": f"r{k}"}}).encode() for k in range(GOOD_RECORDS)]
        i.data.append(json.dumps({"trace_version": "1", "prompt": "What is 2 + 2?", "final_answer": "4",
                                  "steps": steps}).encode())
    return change


def _all_data(change_each: Callable[[bytes], bytes]) -> Callable[[Inputs], None]:
    return lambda i: setattr(i, "data", [change_each(line) for line in i.data])


CASES = [
    # --- the manifest ------------------------------------------------------------------------------
    Case("unknown-field", "manifest", "a misspelt field (`training.stpes`)", "error", "training.stpes: unknown field; did you mean training.steps", _set("training.stpes", 10)),
    Case("unknown-section", "manifest", "an unknown top-level section", "error", "colour: unknown field", _set("colour", "red")),
    Case("string-for-number", "manifest", 'a number written as a string (`"steps": "10"`)', "error", "training.steps: must be a whole number", _set("training.steps", "10")),
    Case("bool-for-number", "manifest", "`true` where a number belongs", "error", "training.steps: must be a whole number", _set("training.steps", True)),
    Case("number-for-string", "manifest", "a number where a URI belongs", "error", "dataset.uri: must be a string", _set("dataset.uri", 5)),
    Case("negative-steps", "manifest", "negative steps", "error", "training.steps: too small", _set("training.steps", -5)),
    Case("zero-steps", "manifest", "zero steps", "error", "training.steps: too small", _set("training.steps", 0)),
    Case("absurd-steps", "manifest", "10^12 steps", "error", "training.steps: too large", _set("training.steps", 10**12)),
    Case("absurd-batch", "manifest", "a batch of 10^9 examples", "error", "training.batch_size: too large", _set("training.batch_size", 10**9)),
    Case("nan-learning-rate", "manifest", "`NaN` as the learning rate", "error", "training.learning_rate: NaN is not a JSON number", _set("training.learning_rate", float("nan"))),
    Case("warmup-beyond-steps", "manifest", "more warm-up steps than steps", "error", "training.warmup_steps: more than training.steps", _set("training.warmup_steps", 1000)),
    Case("negative-seed", "manifest", "a negative seed", "error", "seed: too small", _set("seed", -1)),
    Case("bad-enum", "manifest", "an unknown dataset format", "error", "dataset.format: not an allowed value", _set("dataset.format", "csv")),
    Case("lora-rank-zero", "manifest", "LoRA rank 0", "error", "training.lora.rank: too small", _set("training.lora", {"rank": 0})),
    Case("bad-regex", "manifest", "a LoRA module path that is not a regular expression", "error", "training.lora.module_path: not a regular expression", _set("training.lora", {"module_path": "(q_einsum"})),
    Case("missing-section", "manifest", "no `dataset` section", "error", "dataset: required field is missing", _drop("dataset")),
    Case("run-id-escapes", "manifest", "a `run_id` that climbs out of the output prefix (`../../etc`)", "error", "run_id: must be 1-100 letters", _set("run_id", "../../etc")),
    Case("run-id-absolute", "manifest", "an absolute path as `run_id`", "error", "run_id: must be 1-100 letters", _set("run_id", "/tmp/x")),
    Case("run-id-hidden", "manifest", "a `run_id` of `..`", "error", "run_id: must be 1-100 letters", _set("run_id", "..")),
    Case("real-model-no-weights", "manifest", "a Gemma preset without weights", "error", "model.weights_uri: required for preset gemma3_1b_it", _set("model.preset", "gemma3_1b_it")),
    Case("unsupported-scheme", "manifest", "a URI with an unknown scheme (`nosuch://`)", "error", "nosuch://bucket/data.jsonl: unsupported storage location", _set("dataset.uri", "nosuch://bucket/data.jsonl")),
    Case("manifest-not-json", "manifest", "a manifest with a JSON syntax error", "error", "manifest.json:1:", _raw_manifest(b'{"schema_version": 1,,}')),
    Case("manifest-array", "manifest", "a JSON array as the manifest", "error", "must be a JSON object", _raw_manifest(b"[1, 2]")),
    Case("manifest-empty", "manifest", "an empty manifest file", "error", "manifest.json:1:1: not valid JSON", _raw_manifest(b"")),
    Case("manifest-not-utf8", "manifest", "a manifest that is not UTF-8", "error", "manifest.json: not UTF-8 text", _raw_manifest(b'{"run_id": "\xff"}')),
    Case("manifest-deep-nesting", "manifest", "a manifest nested 100,000 levels deep", "error", "manifest.json: nested too deeply", _raw_manifest(b"[" * 100_000 + b"]" * 100_000)),
    Case("manifest-duplicate-key", "manifest", "a key given twice (`training.steps`; the later one would silently win)", "error", "manifest.json: duplicate key 'training.steps'", _manifest_text('"training": {', '"training": {"steps": 5, ')),
    Case("manifest-huge-integer", "manifest", "a number of 5,000 digits (`training.steps`)", "error", "training.steps: a number of 5,000 characters", _manifest_text('"steps": 350', '"steps": ' + "9" * 5000)),
    Case("manifest-huge-float", "manifest", "`1e999` as the learning rate (inf as a float)", "error", "training.learning_rate: the number 1e999 is beyond the range of a float", _manifest_text('"learning_rate": 0.005', '"learning_rate": 1e999')),
    Case("manifest-lone-surrogate", "manifest", 'a lone UTF-16 surrogate escape (`"\\ud800"`) as the `run_id`', "error", "run_id: a string holds a lone UTF-16 surrogate", _manifest_text(f'"run_id": "{RUN_ID}"', '"run_id": "\\ud800"')),
    Case("manifest-too-big", "manifest", "a 2 MB manifest", "error", "bytes is no run manifest", _raw_manifest(json.dumps({"//": "x" * 2_000_000}).encode()), where="manifest.json: 2,000,010 bytes"),
    Case("absurd-eval-batch", "manifest", "an eval batch of 10^9 prompts", "error", "eval.batch_size: too large", _set("eval.batch_size", 10**9)),
    Case("absurd-holdout", "manifest", "10^9 held-out examples", "error", "dataset.holdout: too large", _set("dataset.holdout", 10**9)),
    Case("absurd-grad-accum", "manifest", "10^9 accumulated micro-batches", "error", "training.grad_accum_steps: too large", _set("training.grad_accum_steps", 10**9)),
    Case("absurd-weight-decay", "manifest", "a weight decay of 10^6", "error", "training.weight_decay: too large", _set("training.weight_decay", 10**6)),
    Case("marker-in-step-instruction", "manifest", "`<end_of_turn>` in `template.step_instruction`", "error", "template.step_instruction: holds the reserved marker '<end_of_turn>'", _set("template.step_instruction", "Show steps.<end_of_turn>")),
    Case("marker-in-system-instruction", "manifest", "`<start_of_turn>` in `template.system_instruction`", "error", "template.system_instruction: holds the reserved marker '<start_of_turn>'", _set("template.system_instruction", "<start_of_turn>user\nBe brief.")),
    Case("tokenizer-garbage", "manifest", "a file that is not a SentencePiece model as `model.tokenizer_uri`", "error", "is not a SentencePiece model", _file("model.tokenizer_uri", "garbage.model", lambda: b"\x00garbage" * 100), where="model.tokenizer_uri: "),
    Case("tokenizer-not-gemma", "manifest", "a SentencePiece model without Gemma's ids (no pad, bos 1, eos 2)", "error", "is not a Gemma tokenizer: it has pad id -1", _file("model.tokenizer_uri", "plain.model", lambda: train_tokenizer(user_defined_symbols="<start_of_turn>,<end_of_turn>")), where="model.tokenizer_uri: "),
    Case("seq-len-nothing-fits", "manifest", "a `max_seq_len` no example fits", "error", "records rejected", _set("training.max_seq_len", 16), where="data.jsonl"),
    Case("missing-dataset", "manifest", "a dataset URI that does not exist", "error", "nowhere.jsonl: not found", _set("dataset.uri", "nowhere.jsonl")),
    Case("mesh-two-rests", "manifest", "both mesh axes `-1` (the rest)", "error", "training.mesh: at most one of fsdp and tp may be -1", _set("training.mesh", {"fsdp": -1, "tp": -1})),
    Case("batch-not-divisible", "manifest", "a batch size that does not divide by `training.mesh.fsdp`", "error", "training.batch_size=16 is not divisible by the data-parallel size 3", _set("training.mesh", {"fsdp": 3, "tp": 1})),
    Case("marker-in-instruction", "manifest", "`<end_of_turn>` in `template.step_instruction`", "error", "reserved marker '<end_of_turn>'", _set("template.step_instruction", "Think.<end_of_turn>"), where="template.step_instruction"),
    # --- the run directory -------------------------------------------------------------------------
    Case("output-under-a-file", "run directory", "`output.uri` under a regular file", "error", "is a file, not a folder", _output_under_a_file, where="output.uri"),
    Case("output-not-writable", "run directory", "`output.uri` in a folder the user may not write", "error", "is not writable by this user", _output_not_writable, where="output.uri"),
    Case("run-dir-not-ours", "run directory", "a run directory that holds files this job did not write", "error", "is not a run directory of this job", _extra_file(f"runs/{RUN_ID}/notes.txt", b"mine")),
    Case("input-inside-run-dir", "run directory", "the dataset inside the run directory", "error", "lies inside the run directory", _data_inside_the_run_directory, where="dataset.uri"),
    Case("run-dir-inside-input", "run directory", "the run directory inside the weights folder", "error", "lies around the run directory", _set("model.weights_uri", "."), where="model.weights_uri"),
    Case("another-run", "run directory", "a run directory holding a run at another learning rate", "error", "holds another run: training.learning_rate: 0.01 → 0.005", _another_run_recorded),
    # --- the dataset -------------------------------------------------------------------------------
    Case("malformed-json", "dataset", "a line that is not JSON", "reject", "invalid JSON", _line(b'{"id": "x", "prompts": ')),
    Case("json-array-line", "dataset", "a JSON array on a line", "reject", "a JSON array, not a JSONL object", _line([_trace()])),
    Case("json-scalar-line", "dataset", "a bare string on a line", "reject", "a string, not a JSONL object", _line("hello")),
    Case("invalid-utf8", "dataset", "invalid UTF-8 bytes in a line", "reject", "invalid UTF-8", _line(b'{"id": "\xff\xfe"}')),
    Case("deep-nesting-line", "dataset", "a line nested 100,000 levels deep", "reject", "nested too deeply", _line(b"[" * 100_000 + b"]" * 100_000)),
    Case("duplicate-key-line", "dataset", "a key given twice in a record", "reject", "duplicate key 'final_answer'", _line(b'{"id": "d", "prompts": "q", "trace_steps": ["a"], "final_answer": "4", "final_answer": "5"}')),
    Case("huge-integer-line", "dataset", "a number of 5,000 digits in a record", "reject", "final_answer: a number of 5,000 characters", _line(b'{"id": "n", "prompts": "q", "trace_steps": ["a"], "final_answer": ' + b"9" * 5000 + b"}")),
    Case("huge-float-line", "dataset", "`1e999` in a record", "reject", "final_answer: the number 1e999 is beyond the range of a float", _line(b'{"id": "f", "prompts": "q", "trace_steps": ["a"], "final_answer": 1e999}')),
    Case("nan-line", "dataset", "`NaN` in a record", "reject", "NaN is not a JSON number", _line(b'{"id": "n", "prompts": "q", "trace_steps": ["a"], "final_answer": "4", "meta": NaN}')),
    Case("lone-surrogate-line", "dataset", 'a lone UTF-16 surrogate escape (`"\\ud800"`) in a record', "reject", "prompts: a string holds a lone UTF-16 surrogate", _line(b'{"id": "s", "prompts": "q\\ud800", "trace_steps": ["a"], "final_answer": "4"}')),
    Case("empty-answer", "dataset", "an empty final answer", "reject", "field 'final_answer' is empty", _line(_trace(final_answer=""))),
    Case("blank-prompt", "dataset", "a prompt of spaces", "reject", "field 'prompts' is empty", _line(_trace(prompts="   "))),
    Case("missing-field", "dataset", "a record without its answer", "reject", "missing field 'final_answer'", _line(_trace(final_answer=None))),
    Case("wrong-field-type", "dataset", "steps as a string instead of a list", "reject", "field 'trace_steps' must be an array", _line(_trace(trace_steps="2 + 2 = 4"))),
    Case("id-object", "dataset", "an object as the record id", "reject", "field 'id' must be a string", _line(_trace(id={"a": 1}))),
    Case("marker-in-user-text", "dataset", "`<end_of_turn>` inside user text", "reject", "reserved marker '<end_of_turn>'", _line(_trace(prompts="Hi<end_of_turn>\nok"))),
    Case("marker-in-answer", "dataset", "`<start_of_turn>` inside an answer", "reject", "reserved marker '<start_of_turn>'", _line(_trace(final_answer="4<start_of_turn>user"))),
    Case("other-format-line", "dataset", "a line of another format in a trace file", "reject", "looks like format 'prompt_completion'", _line({"prompt": "a", "completion": "b"})),
    Case("too-long", "dataset", "a record longer than `max_seq_len`", "reject", "longer than training.max_seq_len", _line(_trace(prompts="word " * 500))),
    Case("huge-line", "dataset", "a 50 MB single line", "reject", "bytes long", _line(_trace(prompts="x" * 50_000_000))),
    Case("unknown-role", "dataset", "a message role the template does not know (`tool`)", "reject", "unknown role 'tool'", _messages({"role": "tool", "content": "x"}, {"role": "model", "content": "y"}), where="data.jsonl:21"),
    Case("roles-out-of-order", "dataset", "two user messages in a row", "reject", "must alternate user, model", _messages({"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "model", "content": "c"})),
    Case("duplicate-step-index", "dataset", "duplicate step indices in a ReasoningTrace", "reject", "i=0 appears more than once", _reasoning_trace([{"i": 0, "type": "r", "content": "a"}, {"i": 0, "type": "r", "content": "b"}])),
    Case("zero-steps-trace", "dataset", "a ReasoningTrace with no steps", "reject", "has 0 steps", _reasoning_trace([])),
    Case("negative-step-index", "dataset", "a negative step index", "reject", "step indices must be >= 0", _reasoning_trace([{"i": -1, "type": "r", "content": "a"}])),
    Case("bom", "dataset", "a UTF-8 byte-order mark", "accept", "", lambda i: i.data.__setitem__(0, b"\xef\xbb\xbf" + i.data[0])),
    Case("crlf", "dataset", "Windows (CRLF) line ends", "accept", "", _all_data(lambda line: line + b"\r")),
    Case("blank-lines", "dataset", "blank lines between records", "accept", "", lambda i: i.data.insert(3, b"   ")),
    Case("truncated-gz", "dataset", "a truncated .gz file", "error", "not a complete gzip file", _truncated_gz, where="data.jsonl.gz"),
    Case("empty-dataset", "dataset", "an empty dataset file", "error", "no records left to train on", _raw_data(b""), where="data.jsonl"),
    Case("whole-file-array", "dataset", "a JSON array instead of JSONL", "error", "records rejected", _raw_data(lambda i: json.dumps([json.loads(x) for x in i.data], indent=1).encode()), where="data.jsonl"),
    Case("all-rejected", "dataset", "more rejects than `dataset.max_reject_fraction` allows", "error", "dataset.max_reject_fraction", _all_data(lambda line: line[:-3])),
    # --- the eval set ------------------------------------------------------------------------------
    Case("empty-eval", "eval set", "an eval set with no items", "error", "eval.jsonl has no eval items", _eval_lines()),
    Case("eval-bad-line", "eval set", "a malformed eval line", "error", "eval.jsonl:2: invalid JSON", _eval_lines(b'{"id": "a", "prompt": "p", "expected_answer": "1"}', b"{oops")),
    Case("eval-duplicate-id", "eval set", "duplicate eval ids", "error", "duplicate eval item id 'a'", _eval_lines(b'{"id": "a", "prompt": "p", "expected_answer": "1"}', b'{"id": "a", "prompt": "q", "expected_answer": "2"}')),
    Case("eval-marker", "eval set", "a turn marker in an eval prompt", "error", "reserved marker", _eval_lines(b'{"id": "a", "prompt": "p<end_of_turn>", "expected_answer": "1"}')),
    Case("eval-huge-number", "eval set", "an expected answer of 5,000 digits", "error", "eval.jsonl:1: expected_answer: a number of 5,000 characters", _eval_lines(b'{"id": "a", "prompt": "p", "expected_answer": ' + b"7" * 5000 + b"}")),
    Case("eval-lone-surrogate", "eval set", 'a lone UTF-16 surrogate escape (`"\\udc00"`) in an eval prompt', "error", "eval.jsonl:1: prompt: a string holds a lone UTF-16 surrogate", _eval_lines(b'{"id": "a", "prompt": "p\\udc00", "expected_answer": "1"}')),
    Case("eval-duplicate-key", "eval set", "a key given twice in an eval line", "error", "eval.jsonl:1: duplicate key 'prompt'", _eval_lines(b'{"id": "a", "prompt": "p", "prompt": "q", "expected_answer": "1"}')),
    Case("eval-deep-nesting", "eval set", "an eval line nested 100,000 levels deep", "error", "eval.jsonl:1: nested too deeply", _eval_lines(b"[" * 100_000 + b"]" * 100_000)),
]


def _base(tmp_path: Path) -> Inputs:
    with open(REPO / "manifests" / "local_tiny.json", encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["dataset"].update(uri="data.jsonl", holdout=HOLDOUT, max_reject_fraction=0.5)
    manifest["eval"]["uri"] = "eval.jsonl"
    manifest["output"]["uri"] = "runs"
    manifest["run_id"] = RUN_ID
    with open(REPO / "datasets" / "arith_train.jsonl", "rb") as f:
        data = [next(f).rstrip(b"\n") for _ in range(GOOD_RECORDS)]
    with open(REPO / "evalsets" / "arith_eval.jsonl", "rb") as f:
        evals = [next(f).rstrip(b"\n") for _ in range(3)]
    return Inputs(manifest, data, evals)


def _write(tmp_path: Path, i: Inputs) -> str:
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(i.raw_manifest if i.raw_manifest is not None else json.dumps(i.manifest).encode())
    (tmp_path / i.data_name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / i.data_name).write_bytes(i.raw_data if i.raw_data is not None else b"".join(x + b"\n" for x in i.data))
    (tmp_path / "eval.jsonl").write_bytes(b"".join(x + b"\n" for x in i.eval))
    for name, content in i.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    return str(manifest)


def _deny_writes(monkeypatch, tmp_path: Path, i: Inputs) -> None:
    """The folders of `i.not_writable` refuse writes as they would to another user (tests run as root,
    whom permissions do not stop)."""
    denied = {str(tmp_path / name) for name in i.not_writable}
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
        False if str(path) in denied and mode & os.W_OK else access(path, mode, **kw)))


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"" for p in sorted(folder.rglob("*"))}


def _prepared(case: Case, tmp_path: Path, monkeypatch) -> tuple[Inputs, str]:
    inputs = _base(tmp_path)
    case.change(inputs)
    manifest = _write(tmp_path, inputs)
    _deny_writes(monkeypatch, tmp_path, inputs)
    return inputs, manifest


def _error_messages(err: str) -> str:
    assert "Traceback" not in err and "unexpected error" not in err, err[-3000:]
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    return "\n".join(r["message"] for r in records if r["severity"] == "ERROR")


def test_the_table_is_big_enough():
    assert len({c.kind for c in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.kind for c in CASES])
def test_hostile_input(case: Case, tmp_path, capsys, monkeypatch):
    inputs, manifest = _prepared(case, tmp_path, monkeypatch)
    before = _tree(tmp_path)
    code = cli.main(["validate", "--manifest", manifest, "--all"])
    out, err = capsys.readouterr()
    messages = _error_messages(err)
    assert _tree(tmp_path) == before, "validate writes nothing"
    if case.outcome == "error":
        assert code == 2, (out, err[-3000:])
        assert case.says in messages, messages
        assert case.where in messages, messages
        return
    assert code == 0, messages
    report = json.loads(out)
    assert report["records_read"] == report["would_train_on"] + report["held_out"] + report["rejected"]
    if case.outcome == "accept":
        assert report["rejected"] == 0, report["first_rejects"]
        assert report["records_read"] == GOOD_RECORDS
        return
    assert report["rejected"] == 1, report["first_rejects"]
    assert report["records_read"] == GOOD_RECORDS + 1
    (reject,) = report["first_rejects"]
    where = case.where or f"{inputs.data_name}:{GOOD_RECORDS + 1}:"
    assert where in reject and case.says in reject, reject


ERRORS = [c for c in CASES if c.outcome == "error"]


@pytest.mark.parametrize("case", ERRORS, ids=[c.kind for c in ERRORS])
def test_run_stops_where_validate_does(case: Case, tmp_path, capsys, monkeypatch):
    _, manifest = _prepared(case, tmp_path, monkeypatch)
    code = cli.main(["run", "--manifest", manifest])
    _, err = capsys.readouterr()
    messages = _error_messages(err)
    assert code == 2, err[-3000:]
    assert case.says in messages and case.where in messages, messages
    assert '"state": "training"' not in _tree(tmp_path).get(f"runs/{RUN_ID}/status.json", b"").decode()


def test_readme_reliability_tables_are_rendered_from_these_tests():
    import subprocess
    import sys

    check = subprocess.run([sys.executable, str(REPO / "scripts" / "reliability_table.py"), "--check"],
                           capture_output=True, text=True, cwd=REPO)
    assert check.returncode == 0, check.stderr


# --------------------------------------------------------------------------------- properties

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from job.errors import BadInput  # noqa: E402
from job.formats import FORMATS, Example, Reject, parse_eval_lines, parse_lines  # noqa: E402
from job.manifest import Manifest, parse_manifest  # noqa: E402

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=12)
KEYS = st.sampled_from(["id", "prompts", "trace_steps", "final_answer", "prompt", "response", "completion",
                        "messages", "steps", "trace_version", "meta", "role", "content", "i", "type"])
RECORD = st.dictionaries(KEYS, JSON | st.text(max_size=30), max_size=6)
# JSON Python's json module reads and the job cannot use, spliced into a record under some key.
HOSTILE_JSON = st.sampled_from(["9" * 5000, "-" + "1" * 500, "1e999", "NaN", "-Infinity", '"\\ud800"',
                                '"a\\udfff"', "[" * 5000 + "]" * 5000, '{"k": 1, "k": 2}', "0." + "5" * 200])
HOSTILE_RECORD = st.tuples(RECORD, KEYS, HOSTILE_JSON).map(
    lambda t: (json.dumps(t[0])[:-1] + (", " if t[0] else "") + f'"{t[1]}": {t[2]}}}').encode())
LINE = st.one_of(st.binary(max_size=80), RECORD.map(lambda r: json.dumps(r).encode()), HOSTILE_RECORD)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LINE.filter(lambda b: b"\n" not in b), max_size=12), st.sampled_from(FORMATS))
def test_every_nonblank_line_becomes_exactly_one_example_or_reject(lines, fmt):
    numbered = list(enumerate(lines, 1))
    out = list(parse_lines(numbered, "data.jsonl", fmt))
    records = [n for n, b in numbered if b.replace(b"\xef\xbb\xbf", b"", 1 if n == 1 else 0).strip()]
    assert [o.line for o in out] == records
    for o in out:
        assert isinstance(o, (Example, Reject))
        if isinstance(o, Reject):
            assert o.reason and o.uri == "data.jsonl"


@settings(max_examples=100, deadline=None)
@given(st.lists(LINE.filter(lambda b: b"\n" not in b), max_size=8))
def test_eval_lines_give_items_or_a_bad_input_naming_the_file(lines):
    try:
        items = parse_eval_lines(list(enumerate(lines, 1)), "eval.jsonl")
    except BadInput as e:
        assert "eval.jsonl" in str(e)
    else:
        assert items and len({i.id for i in items}) == len(items)


MANIFEST_FIELDS = ["run_id", "seed", "dataset.uri", "dataset.limit", "dataset.holdout", "dataset.format",
                   "training.steps", "training.batch_size", "training.max_seq_len", "training.learning_rate",
                   "training.lora", "eval.max_new_tokens", "output.uri", "model.preset", "template.recipe",
                   "template.step_instruction", "template.system_instruction", "training.warmup_steps",
                   "training.grad_accum_steps", "training.weight_decay", "training.eval_every_steps",
                   "training.log_every_steps", "training.checkpoint_every_steps", "eval.limit", "eval.batch_size",
                   "model.tokenizer_uri", "training.mesh"]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(MANIFEST_FIELDS), JSON)
def test_any_value_in_any_manifest_field_is_accepted_or_named(field, value):
    data = {"dataset": {"uri": "d.jsonl"}, "eval": {"uri": "e.jsonl"}, "output": {"uri": "runs"}}
    node = data
    *parents, last = field.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    try:
        assert isinstance(parse_manifest(data, base_uri="/m/manifest.json"), Manifest)
    except BadInput as e:
        assert field.split(".")[0] in str(e), str(e)
