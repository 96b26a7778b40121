"""Dataset readers: every shape the tunix-rt backend produces becomes an Example or a Reject.

One small function per input shape turns a parsed JSON object into the common Example record
(a conversation of turns). A line that does not fit becomes a Reject that says why, so a run can
report bad lines instead of training on them. The eval-set reader is strict instead: the eval set
is fixed, so any bad line is a BadInput; so is the reader of predictions to score against it.

The core (`parse_lines`, `parse_eval_lines`, `parse_gemma_turns`) is pure: it takes numbered lines
and never touches storage. `read_examples` and `read_eval_items` add the streaming from a URI.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from job import io, strict_json
from job.errors import BadInput
from job.io import LongLine

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
EOS = "<eos>"
STOP_TOKENS = (END_OF_TURN, EOS)  # where decoding stops: the end of the model's turn, or of the text
# Gemma's special tokens, in the order they are reported. The turn markers in a prompt or an answer
# would be tokenized as the markers themselves and could forge or close a turn; the others must not
# read as control tokens either. Text holding one is refused rather than silently escaped.
RESERVED_MARKERS = (START_OF_TURN, END_OF_TURN, "<bos>", EOS, "<pad>")

DETECT_WINDOW = 20  # records looked at before auto-detection gives up
RAW_CAP = 10_000  # characters of a rejected line kept in its Reject
GEMMA_ROLES = ("user", "model")

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Turn:
    role: str  # "system" | "user" | "model"
    text: str = ""  # the turn's text (for model turns given as text)
    steps: tuple[str, ...] = ()  # model turns built from a trace: step contents ...
    final_answer: str | None = None  # ... and the final answer; the recipe renders them

    @property
    def structured(self) -> bool:
        """True for a model turn built from steps and a final answer rather than given as text."""
        return self.final_answer is not None


@dataclass(frozen=True)
class Example:
    id: str
    turns: tuple[Turn, ...]  # an optional leading system turn, then user/model alternating, ending with model
    line: int  # 1-based line number in the source file


@dataclass(frozen=True)
class Reject:
    uri: str
    line: int
    reason: str
    raw: str  # the line as read (decoded with errors="replace"), capped at RAW_CAP characters

    def __str__(self) -> str:
        return f"{self.uri}:{self.line}: {self.reason}"


@dataclass(frozen=True)
class EvalItem:
    id: str
    prompt: str
    expected_answer: str
    category: str = "uncategorized"
    difficulty: str | None = None


class _Invalid(Exception):
    """A record that does not fit its shape; the message becomes the Reject reason."""


# ---------------------------------------------------------------------------------------------
# Small checks shared by the shape readers


def find_marker(text: str) -> str | None:
    """The first reserved marker that occurs in text, or None."""
    for marker in RESERVED_MARKERS:
        if marker in text:
            return marker
    return None


def _check_markers(text: str, name: str) -> None:
    marker = find_marker(text)
    if marker is not None:
        raise _Invalid(
            f"field {name!r} contains the reserved marker {marker!r}; "
            "Gemma control tokens may not appear in prompt or answer text"
        )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _check_text(value: Any, name: str, max_len: int | None = None) -> str:
    """A non-blank string free of reserved markers; raises _Invalid naming the field otherwise."""
    if not isinstance(value, str):
        raise _Invalid(f"field {name!r} must be a string, not {_json_type(value)}")
    if not value.strip():
        raise _Invalid(f"field {name!r} is empty")
    if max_len is not None and len(value) > max_len:
        raise _Invalid(f"field {name!r} is {len(value):,} characters long; the limit is {max_len:,}")
    _check_markers(value, name)
    return value


def _text(obj: dict, field: str, name: str | None = None, max_len: int | None = None) -> str:
    """A required text field of obj (see _check_text)."""
    name = name or field
    if field not in obj:
        raise _Invalid(f"missing field {name!r}")
    return _check_text(obj[field], name, max_len)


def id_text(value: Any) -> str | None:
    """An id as ids are compared: a string as it is, a whole number as its digits (7 is "7"); else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _record_id(value: Any, n: int) -> str:
    """The record's id; records without one are named by their line."""
    if value is None or value == "":
        return f"line-{n}"
    text = id_text(value)
    if text is None:
        raise _Invalid(f"field 'id' must be a string, not {_json_type(value)}")
    return text


def _object(obj: dict, field: str) -> dict:
    """An optional object field (absent or null reads as empty)."""
    value = obj.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(f"field {field!r} must be an object or null, not {_json_type(value)}")
    return value


# ---------------------------------------------------------------------------------------------
# The rendered Gemma conversation (tunix_sft)


def parse_gemma_turns(text: str) -> tuple[Turn, ...]:
    """Split a rendered Gemma conversation back into its turns.

    Expects `<start_of_turn>{role}\\n{text}<end_of_turn>` turns joined by "\\n", user first, roles
    alternating, ending with a model turn: the shape the backend's tunix_sft export writes. Turn texts
    are kept verbatim, so rendering the turns again reproduces `text` byte for byte.
    Raises ValueError saying what is malformed.
    """
    turns: list[Turn] = []
    pos = 0
    if not text.startswith(START_OF_TURN):
        raise ValueError(f"the conversation does not start with {START_OF_TURN}")
    while True:
        number = len(turns) + 1
        pos += len(START_OF_TURN)
        newline = text.find("\n", pos)
        if newline == -1:
            raise ValueError(f"turn {number} has no role line ({START_OF_TURN} followed by a role and a newline)")
        role = text[pos:newline]
        if role not in GEMMA_ROLES:
            raise ValueError(f"turn {number} has unknown role {role[:40]!r}; Gemma turns are 'user' or 'model'")
        body_start = newline + 1
        end = text.find(END_OF_TURN, body_start)
        next_start = text.find(START_OF_TURN, body_start)
        if end == -1 or (next_start != -1 and next_start < end):
            raise ValueError(f"turn {number} ({role}) is not closed with {END_OF_TURN}")
        body = text[body_start:end]
        if not body.strip():
            raise ValueError(f"turn {number} ({role}) is empty")
        expected = GEMMA_ROLES[(number - 1) % 2]
        if role != expected:
            raise ValueError(f"turn {number} is a {role} turn; turns must alternate user, model, user, ...")
        turns.append(Turn(role=role, text=body))
        pos = end + len(END_OF_TURN)
        if pos == len(text):
            break
        if not text.startswith("\n" + START_OF_TURN, pos):
            rest = text[pos:]
            where = "between turns" if START_OF_TURN in rest else "after the last turn"
            raise ValueError(f"unexpected text {where}: {rest[:60]!r}")
        pos += 1
    if turns[-1].role != "model":
        raise ValueError("the conversation does not end with a model turn")
    return tuple(turns)


# ---------------------------------------------------------------------------------------------
# One reader per shape: a parsed JSON object -> the turns of an Example (and its id)


def _from_trace(obj: dict, n: int) -> tuple[str, tuple[Turn, ...]]:
    prompt = _text(obj, "prompts")
    steps = obj.get("trace_steps")
    if "trace_steps" not in obj:
        raise _Invalid("missing field 'trace_steps'")
    if not isinstance(steps, list):
        raise _Invalid(f"field 'trace_steps' must be an array of strings, not {_json_type(steps)}")
    contents = tuple(_check_text(step, f"trace_steps[{i}]") for i, step in enumerate(steps))
    answer = _text(obj, "final_answer")
    model = Turn("model", steps=contents, final_answer=answer)
    return _record_id(obj.get("id"), n), (Turn("user", text=prompt), model)


def _from_tunix_sft(obj: dict, n: int) -> tuple[str, tuple[Turn, ...]]:
    if "prompts" not in obj:
        raise _Invalid("missing field 'prompts'")
    text = obj["prompts"]
    if not isinstance(text, str):
        raise _Invalid(f"field 'prompts' must be a string, not {_json_type(text)}")
    try:
        turns = parse_gemma_turns(text)
    except ValueError as e:
        raise _Invalid(f"field 'prompts' is not a rendered Gemma conversation: {e}") from None
    for i, turn in enumerate(turns, 1):
        # The turn markers cannot survive parsing; the other control tokens can.
        _check_markers(turn.text, f"prompts (turn {i}, {turn.role})")
    return _record_id(obj.get("id"), n), turns


def _from_training_example(obj: dict, n: int) -> tuple[str, tuple[Turn, ...]]:
    prompt = _text(obj, "prompt")
    response = _text(obj, "response")
    return _record_id(obj.get("id"), n), (Turn("user", text=prompt), Turn("model", text=response))


def _from_prompt_completion(obj: dict, n: int) -> tuple[str, tuple[Turn, ...]]:
    prompt = _text(obj, "prompt")
    completion = _text(obj, "completion")
    return _record_id(obj.get("id"), n), (Turn("user", text=prompt), Turn("model", text=completion))


def _from_messages(obj: dict, n: int) -> tuple[str, tuple[Turn, ...]]:
    if "messages" not in obj:
        raise _Invalid("missing field 'messages'")
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise _Invalid("field 'messages' must be a non-empty array of {\"role\", \"content\"} objects")
    turns: list[Turn] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _Invalid(f"messages[{i}] must be an object, not {_json_type(message)}")
        role = message.get("role")
        if role not in ("system", "user", "model", "assistant"):
            raise _Invalid(f"messages[{i}] has unknown role {role!r}; use user, model (or assistant) or system")
        role = "model" if role == "assistant" else role
        content = _text(message, "content", name=f"messages[{i}].content")
        if role == "system" and i != 0:
            raise _Invalid(f"messages[{i}] is a system message; only the first message may be one")
        conversation = len(turns) - (1 if turns and turns[0].role == "system" else 0)
        expected = GEMMA_ROLES[conversation % 2]
        if role != "system" and role != expected:
            raise _Invalid(f"messages[{i}] is a {role} message; after an optional system message, "
                           "messages must alternate user, model, user, ...")
        turns.append(Turn(role, text=content))
    if turns[-1].role != "model":
        raise _Invalid("the last message must be a model (assistant) message")
    return _record_id(obj.get("id"), n), tuple(turns)


# The backend's ReasoningTrace limits (a trace breaking one is answered with HTTP 422 there).
# The backend's ReasoningTrace limits (contract.md): what a trace read here, or written by the job, may hold.
MAX_TRACE_VERSION = 64
MAX_TEXT = 50_000  # prompt, final_answer
MAX_STEPS = 1_000
MAX_STEP_TYPE = 64
MAX_STEP_CONTENT = 20_000


def _from_reasoning_trace(obj: dict, n: int) -> tuple[str, tuple[Turn, ...]]:
    _text(obj, "trace_version", max_len=MAX_TRACE_VERSION)
    prompt = _text(obj, "prompt", max_len=MAX_TEXT)
    answer = _text(obj, "final_answer", max_len=MAX_TEXT)
    meta = _object(obj, "meta")
    if "steps" not in obj:
        raise _Invalid("missing field 'steps'")
    steps = obj["steps"]
    if not isinstance(steps, list):
        raise _Invalid(f"field 'steps' must be an array of step objects, not {_json_type(steps)}")
    if not 1 <= len(steps) <= MAX_STEPS:
        raise _Invalid(f"field 'steps' has {len(steps)} steps; a trace needs 1 to {MAX_STEPS:,}")
    indexed: dict[int, str] = {}
    for k, step in enumerate(steps):
        name = f"steps[{k}]"
        if not isinstance(step, dict):
            raise _Invalid(f"{name} must be an object, not {_json_type(step)}")
        i = step.get("i")
        if isinstance(i, bool) or not isinstance(i, int):
            raise _Invalid(f"field '{name}.i' must be an integer, not {_json_type(i)}")
        if i < 0:
            raise _Invalid(f"field '{name}.i' is {i}; step indices must be >= 0")
        if i in indexed:
            raise _Invalid(f"step indices must be unique; i={i} appears more than once")
        _text(step, "type", name=f"{name}.type", max_len=MAX_STEP_TYPE)
        indexed[i] = _text(step, "content", name=f"{name}.content", max_len=MAX_STEP_CONTENT)
    contents = tuple(indexed[i] for i in sorted(indexed))
    record_id = _record_id(meta.get("id", obj.get("id")), n)
    return record_id, (Turn("user", text=prompt), Turn("model", steps=contents, final_answer=answer))


_READERS = {
    "trace": _from_trace,
    "tunix_sft": _from_tunix_sft,
    "training_example": _from_training_example,
    "reasoning_trace": _from_reasoning_trace,
    "messages": _from_messages,
    "prompt_completion": _from_prompt_completion,
}
FORMATS = tuple(_READERS)  # dataset.format's values besides "auto"


def detect_format(obj: dict) -> str | None:
    """The export format a JSON object's keys reveal, or None."""
    prompts = obj.get("prompts")
    if isinstance(prompts, str) and prompts.startswith(START_OF_TURN):
        return "tunix_sft"
    if "trace_steps" in obj:
        return "trace"
    if {"steps", "prompt", "final_answer"} <= obj.keys():
        return "reasoning_trace"
    if {"prompt", "response"} <= obj.keys():
        return "training_example"
    if {"prompt", "completion"} <= obj.keys():
        return "prompt_completion"
    if "messages" in obj:
        return "messages"
    return None


# ---------------------------------------------------------------------------------------------
# Lines -> records


def _raw(data: bytes | LongLine) -> str:
    text = (data.head if isinstance(data, LongLine) else data).decode("utf-8", errors="replace")
    if len(text) > RAW_CAP:
        return text[:RAW_CAP] + "...[truncated]"
    return text


def _records(lines: Iterable[tuple[int, bytes | LongLine]], limit: int | None
             ) -> Iterator[tuple[int, bytes | LongLine]]:
    """The non-blank lines (records), the BOM stripped from the first line, at most `limit` of them.
    A LongLine is a record: it was not read, so it is not known to be blank."""
    if limit is not None and limit <= 0:
        return
    count = 0
    first = True
    for n, data in lines:
        if first and isinstance(data, bytes) and data.startswith(_BOM):
            data = data[len(_BOM):]
        first = False
        if isinstance(data, bytes) and not data.strip():
            continue
        yield n, data
        count += 1
        if limit is not None and count >= limit:
            return  # stop before reading another line


def _too_long(size: int) -> _Invalid:
    return _Invalid(f"the line is {size:,} bytes long; records are limited to {io.MAX_LINE_BYTES:,} bytes "
                    "(far more than training.max_seq_len can hold)")


def _decode(data: bytes | LongLine) -> dict:
    """One line as a JSON object; raises _Invalid saying why it is not one."""
    if isinstance(data, LongLine) or len(data) > io.MAX_LINE_BYTES:
        raise _too_long(data.size if isinstance(data, LongLine) else len(data))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Invalid(f"invalid UTF-8 at byte {e.start + 1} ({e.reason}); save the file as UTF-8") from None
    try:
        value = strict_json.loads(text)
    except strict_json.JSONError as e:  # a syntax error has a column; the others name their place
        raise _Invalid(f"invalid JSON: {e.reason} (column {e.column})" if e.column else e.reason) from None
    if isinstance(value, list):
        raise _Invalid("a JSON array, not a JSONL object; write one object per line")
    if not isinstance(value, dict):
        raise _Invalid(f"{_json_type(value)}, not a JSONL object; write one object per line")
    return value


def _reject(uri: str, n: int, reason: str, data: bytes | LongLine) -> Reject:
    return Reject(uri=uri, line=n, reason=reason, raw=_raw(data))


def _convert(fmt: str, n: int, data: bytes | LongLine, uri: str) -> Example | Reject:
    try:
        obj = _decode(data)
    except _Invalid as e:
        return _reject(uri, n, str(e), data)
    try:
        record_id, turns = _READERS[fmt](obj, n)
    except _Invalid as e:
        # A file holds one format: a line of another shape is rejected, and the reason says so.
        reason = str(e)
        looks_like = detect_format(obj)
        if looks_like not in (None, fmt):
            reason += f" (this line looks like format {looks_like!r}; the file is {fmt!r})"
        return _reject(uri, n, reason, data)
    return Example(id=record_id, turns=turns, line=n)


def parse_lines(
    lines: Iterable[tuple[int, bytes | LongLine]], uri: str, fmt: str = "auto", limit: int | None = None
) -> Iterator[Example | Reject]:
    """Parse numbered JSONL lines of one dataset into Examples and Rejects, in file order.

    `fmt` is one of FORMATS or "auto" (detected from the first records; a file holds one format).
    `limit` caps the number of records (non-blank lines) read. Raises BadInput when `fmt` is unknown
    or "auto" finds no format in the first DETECT_WINDOW records.
    """
    if fmt != "auto" and fmt not in _READERS:
        raise BadInput(f"dataset.format: unknown format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
    records = _records(lines, limit)
    pending: list[tuple[int, bytes | LongLine]] = []
    if fmt == "auto":
        fmt, pending = _detect(records, uri)
        if fmt is None:
            return
    for n, data in pending:
        yield _convert(fmt, n, data, uri)
    for n, data in records:
        yield _convert(fmt, n, data, uri)


def _detect(records: Iterator[tuple[int, bytes | LongLine]], uri: str
            ) -> tuple[str | None, list[tuple[int, bytes | LongLine]]]:
    """Read records until one reveals the format; returns it with the records read so far.

    (None, []) for a dataset without records; BadInput when DETECT_WINDOW records reveal nothing.
    """
    pending: list[tuple[int, bytes | LongLine]] = []
    keys_seen: set[str] = set()
    for n, data in records:
        pending.append((n, data))
        try:
            obj = _decode(data)
        except _Invalid:
            obj = None
        if obj is not None:
            fmt = detect_format(obj)
            if fmt is not None:
                return fmt, pending
            keys_seen.update(obj)
        if len(pending) >= DETECT_WINDOW:
            break
    if not pending:
        return None, []
    keys = ", ".join(sorted(keys_seen)[:30]) if keys_seen else "none; no line was a JSON object"
    raise BadInput(
        f"{uri}: cannot detect the dataset format from its first records (keys seen: {keys}); "
        f"set dataset.format to one of {', '.join(FORMATS)}"
    )


def read_examples(
    uri: str, fmt: str = "auto", limit: int | None = None, digest: Any = None
) -> Iterator[Example | Reject]:
    """Stream a dataset from a URI (local path, gs://, .gz) as Examples and Rejects."""
    return parse_lines(io.iter_lines(uri, digest), uri, fmt, limit)


# ---------------------------------------------------------------------------------------------
# The eval set


def _eval_text(obj: dict, field: str) -> str:
    value = obj.get(field)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a bare number is a fine expected answer
    return _text(obj, field)


def _eval_item(obj: dict, n: int) -> EvalItem:
    if "expected_answer" in obj:
        record_id = _record_id(obj.get("id"), n)
        prompt, expected, labels = _text(obj, "prompt"), _eval_text(obj, "expected_answer"), obj
    elif "trace_steps" in obj:
        record_id = _record_id(obj.get("id"), n)
        prompt, expected, labels = _text(obj, "prompts"), _eval_text(obj, "final_answer"), _object(obj, "metadata")
    elif {"steps", "prompt", "final_answer"} <= obj.keys():
        labels = _object(obj, "meta")
        record_id = _record_id(labels.get("id", obj.get("id")), n)
        prompt, expected = _text(obj, "prompt"), _eval_text(obj, "final_answer")
    else:
        keys = ", ".join(sorted(obj)[:30]) or "none"
        raise _Invalid(
            f"not an eval item (keys: {keys}); write {{\"id\", \"prompt\", \"expected_answer\", \"category\", "
            "\"difficulty\"}} objects, or traces (the trace export or ReasoningTrace objects)"
        )
    category = labels.get("category")
    if category is not None and not (isinstance(category, str) and category.strip()):
        raise _Invalid("field 'category' must be a non-empty string")
    difficulty = labels.get("difficulty")
    if difficulty is not None and not isinstance(difficulty, str):
        raise _Invalid(f"field 'difficulty' must be a string, not {_json_type(difficulty)}")
    return EvalItem(
        id=record_id,
        prompt=prompt,
        expected_answer=expected,
        category=category or "uncategorized",
        difficulty=difficulty or None,
    )


def parse_eval_lines(lines: Iterable[tuple[int, bytes | LongLine]], uri: str, limit: int | None = None) -> list[EvalItem]:
    """Parse an eval set's numbered JSONL lines; any bad line, a duplicate id or no items is a BadInput."""
    items: list[EvalItem] = []
    first_line: dict[str, int] = {}
    for n, data in _records(lines, limit):
        try:
            item = _eval_item(_decode(data), n)
        except _Invalid as e:
            raise BadInput(f"{uri}:{n}: {e}; the eval set is fixed, so fix this line rather than skip it") from None
        if item.id in first_line:
            raise BadInput(
                f"{uri}:{n}: duplicate eval item id {item.id!r} (first on line {first_line[item.id]}); "
                "ids must be unique"
            )
        first_line[item.id] = n
        items.append(item)
    if not items:
        raise BadInput(f"{uri} has no eval items; write one JSON object per line")
    return items


def read_eval_items(uri: str, limit: int | None = None, digest: Any = None) -> list[EvalItem]:
    """Read an eval set from a URI (local path, gs://, .gz)."""
    return parse_eval_lines(io.iter_lines(uri, digest), uri, limit)


# ---------------------------------------------------------------------------------------------
# Predictions to score against an eval set


def _prediction(obj: dict) -> dict[str, str]:
    prediction_id = id_text(obj.get("id"))
    if prediction_id is None:
        raise _Invalid(f"field 'id' must be a string or a whole number, not {_json_type(obj.get('id'))}")
    if not isinstance(obj.get("output"), str):
        raise _Invalid(f"field 'output' must be a string, not {_json_type(obj.get('output'))}")
    return {"id": prediction_id, "output": obj["output"]}


def parse_prediction_lines(lines: Iterable[tuple[int, bytes | LongLine]], uri: str) -> list[dict[str, str]]:
    """Predictions {"id", "output"} from numbered JSONL lines; a bad line is a BadInput naming it.
    Ids compare as eval ids do: 7 names the eval item "7"."""
    predictions = []
    for n, data in _records(lines, None):
        try:
            predictions.append(_prediction(_decode(data)))
        except _Invalid as e:
            raise BadInput(f"{uri}:{n}: {e}; write one {{\"id\", \"output\"}} object per line") from None
    return predictions


def read_predictions(uri: str) -> list[dict[str, str]]:
    """Read predictions from a URI (local path, gs://, .gz)."""
    return parse_prediction_lines(io.iter_lines(uri), uri)
