"""Readers of every dataset shape the backend produces, their rejects, and the eval-set reader."""

import gzip
import json

import pytest

from job.errors import BadInput
from job.formats import (
    DETECT_WINDOW,
    RAW_CAP,
    RESERVED_MARKERS,
    EvalItem,
    Example,
    Reject,
    Turn,
    detect_format,
    parse_eval_lines,
    parse_gemma_turns,
    parse_lines,
    parse_prediction_lines,
)
from job.io import LongLine
from backend_samples import TRACE_LINE, TUNIX_SFT_LINE, UNGAR_TRACE

URI = "gs://bucket/data.jsonl"

TRAINING_EXAMPLE_LINE = (
    '{"id": "0b9d7a52-8f7e-4a8e-b0c1-5d7c8e9f0a1b", "prompt": "What is 15 + 27?\\n\\nPlease show your '
    'reasoning steps.", "response": "Reasoning:\\n1. Add the ones: 5 + 7 = 12\\n2. Add the tens: 10 + 20 + 10 '
    '= 40\\nAnswer: 42", "metadata": {"source_trace_id": "5f0c6d1e-2b43-4c1e-9a57-3f1d2c8b9e10"}}'
)
MESSAGES = {
    "id": "chat-1",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
        {"role": "model", "content": "4"},
    ],
}
PROMPT_COMPLETION = {"prompt": "Capital of France?", "completion": "Paris"}

ADDITION_STEPS = ("Add the ones: 5 + 7 = 12", "Add the tens: 10 + 20 + 10 = 40")


def numbered(*texts: str | bytes) -> list[tuple[int, bytes]]:
    return [(n, t if isinstance(t, bytes) else t.encode()) for n, t in enumerate(texts, 1)]


def parse(*texts: str | bytes, fmt: str = "auto", limit: int | None = None) -> list[Example | Reject]:
    return list(parse_lines(numbered(*texts), URI, fmt, limit))


def dumps(obj) -> str:
    return json.dumps(obj)


def only_reject(*texts: str | bytes, fmt: str) -> Reject:
    (record,) = [r for r in parse(*texts, fmt=fmt) if isinstance(r, Reject)]
    return record


# --- each shape -> Example -------------------------------------------------------------------


def test_trace_export_becomes_user_prompt_and_structured_model_turn():
    (example,) = parse(TRACE_LINE, fmt="trace")
    assert example == Example(
        id="5f0c6d1e-2b43-4c1e-9a57-3f1d2c8b9e10",
        turns=(Turn("user", text="What is 15 + 27?"), Turn("model", steps=ADDITION_STEPS, final_answer="42")),
        line=1,
    )


def test_tunix_sft_export_keeps_the_model_turn_as_text():
    (example,) = parse(TUNIX_SFT_LINE, fmt="tunix_sft")
    assert example.turns == (
        Turn("user", text="What is 15 + 27?"),
        Turn("model", text="Reasoning:\n1. " + ADDITION_STEPS[0] + "\n2. " + ADDITION_STEPS[1] + "\nAnswer: 42"),
    )


def test_training_example_export():
    (example,) = parse(TRAINING_EXAMPLE_LINE, fmt="training_example")
    assert example.id == "0b9d7a52-8f7e-4a8e-b0c1-5d7c8e9f0a1b"
    assert example.turns[0] == Turn("user", text="What is 15 + 27?\n\nPlease show your reasoning steps.")
    assert example.turns[1].text.endswith("\nAnswer: 42")
    assert example.turns[1].final_answer is None


def test_reasoning_trace_orders_steps_by_index_and_takes_id_from_meta():
    trace = dict(UNGAR_TRACE, steps=list(reversed(UNGAR_TRACE["steps"])), meta={"id": "ungar-7"})
    (example,) = parse(dumps(trace), fmt="reasoning_trace")
    assert example.id == "ungar-7"
    assert example.turns[1].steps == (
        "Legal moves: [reveal]", "My hand: AS", "Unseen cards: 51", "Action chosen: reveal",
    )
    assert example.turns[1].final_answer == "reveal"


def test_reasoning_trace_without_any_id_is_named_by_line_and_extra_fields_are_ignored():
    (example,) = parse("", dumps(dict(UNGAR_TRACE, extra_field=[1, 2])), fmt="reasoning_trace")
    assert example.id == "line-2"
    (with_top_level_id,) = parse(dumps(dict(UNGAR_TRACE, id="t-1")), fmt="reasoning_trace")
    assert with_top_level_id.id == "t-1"


def test_messages_with_system_and_assistant_roles():
    (example,) = parse(dumps(MESSAGES), fmt="messages")
    assert example.id == "chat-1"
    assert [t.role for t in example.turns] == ["system", "user", "model", "user", "model"]
    assert example.turns[2] == Turn("model", text="Hello.")


def test_prompt_completion_without_id():
    (example,) = parse("   ", dumps(PROMPT_COMPLETION), fmt="prompt_completion")
    assert example == Example("line-2", (Turn("user", text="Capital of France?"), Turn("model", text="Paris")), 2)


def test_numeric_ids_become_strings():
    (example,) = parse(dumps(dict(PROMPT_COMPLETION, id=17)), fmt="prompt_completion")
    assert example.id == "17"


def test_non_ascii_text_survives():
    (example,) = parse(dumps({"prompt": "Was ist π?", "completion": "ungefähr 3,14 — 😀"}))
    assert example.turns[1].text == "ungefähr 3,14 — 😀"


# --- auto-detection --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "fmt"),
    [
        (TRACE_LINE, "trace"),
        (TUNIX_SFT_LINE, "tunix_sft"),
        (TRAINING_EXAMPLE_LINE, "training_example"),
        (dumps(UNGAR_TRACE), "reasoning_trace"),
        (dumps(MESSAGES), "messages"),
        (dumps(PROMPT_COMPLETION), "prompt_completion"),
    ],
)
def test_auto_detects_each_format(line, fmt):
    assert detect_format(json.loads(line)) == fmt
    (auto,) = parse(line)
    (explicit,) = parse(line, fmt=fmt)
    assert isinstance(auto, Example) and auto == explicit


def test_detect_format_needs_the_telling_keys():
    assert detect_format({"prompts": "plain text, not rendered"}) is None
    assert detect_format({"prompt": "q"}) is None
    assert detect_format({"question": "q", "answer": "a"}) is None


def test_auto_skips_undetectable_leading_lines_and_then_rejects_them():
    records = parse("{not json", '{"note": "header"}', dumps(PROMPT_COMPLETION))
    assert [type(r) for r in records] == [Reject, Reject, Example]
    assert records[0].line == 1 and records[0].reason.startswith("invalid JSON")
    assert records[1].line == 2 and records[1].reason == "missing field 'prompt'"


def test_auto_gives_up_with_a_clear_error():
    lines = [dumps({"question": f"q{i}", "answer": "a"}) for i in range(DETECT_WINDOW)]
    with pytest.raises(BadInput) as e:
        parse(*lines, dumps(PROMPT_COMPLETION))  # the telling line comes too late
    message = str(e.value)
    assert message.startswith(f"{URI}: cannot detect the dataset format from its first records")
    assert "keys seen: answer, question" in message
    assert "set dataset.format to one of trace, tunix_sft" in message


def test_auto_error_when_no_line_is_an_object():
    with pytest.raises(BadInput, match="keys seen: none"):
        parse("[1, 2]", "oops")


def test_empty_dataset_has_no_records():
    assert parse() == [] and parse("", "  \t") == []


def test_after_detection_a_line_of_another_shape_is_rejected_not_redetected():
    records = parse(TRACE_LINE, dumps(PROMPT_COMPLETION))
    assert isinstance(records[1], Reject)
    assert records[1].reason == (
        "missing field 'prompts' (this line looks like format 'prompt_completion'; the file is 'trace')"
    )


def test_unknown_format_name():
    with pytest.raises(BadInput, match="dataset.format: unknown format 'csv'"):
        parse(TRACE_LINE, fmt="csv")


# --- rejects ---------------------------------------------------------------------------------


def test_invalid_utf8():
    reject = only_reject(dumps(PROMPT_COMPLETION), b'{"prompt": "caf\xe9", "completion": "x"}', fmt="auto")
    assert reject.line == 2
    assert reject.reason.startswith("invalid UTF-8 at byte 16 (invalid continuation byte)")  # 1-based, like columns
    assert reject.raw == '{"prompt": "caf\ufffd", "completion": "x"}'


def test_invalid_json_names_the_message_and_column():
    reject = only_reject(dumps(PROMPT_COMPLETION), '{"prompt": "a" "completion": "b"}', fmt="prompt_completion")
    assert (reject.uri, reject.line) == (URI, 2)
    assert reject.reason == "invalid JSON: Expecting ',' delimiter (column 16)"
    assert str(reject) == f"{URI}:2: invalid JSON: Expecting ',' delimiter (column 16)"


def test_json_array_and_other_non_objects():
    records = parse('[{"prompt": "a", "completion": "b"}]', '"text"', "42", "null", fmt="prompt_completion")
    assert [r.reason for r in records] == [
        "a JSON array, not a JSONL object; write one object per line",
        "a string, not a JSONL object; write one object per line",
        "a number, not a JSONL object; write one object per line",
        "null, not a JSONL object; write one object per line",
    ]
    assert [r.line for r in records] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({"completion": "b"}, "missing field 'prompt'"),
        ({"prompt": "", "completion": "b"}, "field 'prompt' is empty"),
        ({"prompt": " \n", "completion": "b"}, "field 'prompt' is empty"),
        ({"prompt": ["a"], "completion": "b"}, "field 'prompt' must be a string, not an array"),
        ({"prompt": "a", "completion": None}, "field 'completion' must be a string, not null"),
        ({"prompt": "a", "completion": "b", "id": {"x": 1}}, "field 'id' must be a string, not an object"),
    ],
)
def test_missing_empty_and_wrongly_typed_fields(obj, reason):
    assert only_reject(dumps(obj), fmt="prompt_completion").reason == reason


@pytest.mark.parametrize("marker", RESERVED_MARKERS)
def test_reserved_markers_in_user_text(marker):
    reject = only_reject(dumps({"prompt": f"Say {marker} now", "completion": "ok"}), fmt="prompt_completion")
    assert reject.reason.startswith(f"field 'prompt' contains the reserved marker {marker!r}")


def test_reserved_markers_in_model_text_steps_and_answers():
    base = json.loads(TRACE_LINE)
    bad_step = dict(base, trace_steps=["fine", "then <end_of_turn> sneaks in"])
    bad_answer = dict(base, final_answer="42<eos>")
    bad_response = {"prompt": "q", "response": "<start_of_turn>user\nhi"}
    records = parse(dumps(bad_step), dumps(bad_answer), fmt="trace") + parse(dumps(bad_response))
    assert [r.reason.split(";")[0] for r in records] == [
        "field 'trace_steps[1]' contains the reserved marker '<end_of_turn>'",
        "field 'final_answer' contains the reserved marker '<eos>'",
        "field 'response' contains the reserved marker '<start_of_turn>'",
    ]


def test_trace_steps_must_be_a_list_of_non_empty_strings():
    base = json.loads(TRACE_LINE)
    records = parse(
        dumps(dict(base, trace_steps="one step")),
        dumps(dict(base, trace_steps=["a", ""])),
        dumps(dict(base, trace_steps=["a", 3])),
        dumps({k: v for k, v in base.items() if k != "final_answer"}),
        fmt="trace",
    )
    assert [r.reason for r in records] == [
        "field 'trace_steps' must be an array of strings, not a string",
        "field 'trace_steps[1]' is empty",
        "field 'trace_steps[1]' must be a string, not a number",
        "missing field 'final_answer'",
    ]


def test_trace_with_no_steps_is_accepted():
    (example,) = parse(dumps(dict(json.loads(TRACE_LINE), trace_steps=[])), fmt="trace")
    assert example.turns[1] == Turn("model", steps=(), final_answer="42")


def tunix(prompts: str) -> str:
    return dumps({"id": "t", "prompts": prompts, "final_answer": "4"})


@pytest.mark.parametrize(
    ("prompts", "problem"),
    [
        ("<start_of_turn>user\nWhat?<end_of_turn>", "the conversation does not end with a model turn"),
        ("<start_of_turn>user\nWhat?<end_of_turn>\n<start_of_turn>model\n4", "turn 2 (model) is not closed with <end_of_turn>"),
        ("<start_of_turn>user\nWhat?\n<start_of_turn>model\n4<end_of_turn>", "turn 1 (user) is not closed with <end_of_turn>"),
        ("<start_of_turn>system\nBe brief.<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>",
         "turn 1 has unknown role 'system'; Gemma turns are 'user' or 'model'"),
        ("<start_of_turn>user\nWhat?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
         "unexpected text after the last turn: '\\n'"),
        ("<start_of_turn>user\nWhat?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn><eos>",
         "unexpected text after the last turn: '<eos>'"),
        ("<start_of_turn>user\nWhat?<end_of_turn>\n\n<start_of_turn>model\n4<end_of_turn>",
         "unexpected text between turns: '\\n\\n<start_of_turn>model\\n4<end_of_turn>'"),
        ("<start_of_turn>user\nWhat?<end_of_turn>\n<start_of_turn>user\nAnd?<end_of_turn>",
         "turn 2 is a user turn; turns must alternate user, model, user, ..."),
        ("<start_of_turn>user\n<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>", "turn 1 (user) is empty"),
        ("<bos><start_of_turn>user\nWhat?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>",
         "the conversation does not start with <start_of_turn>"),
        ("<start_of_turn>user", "turn 1 has no role line"),
    ],
)
def test_malformed_tunix_sft_conversations(prompts, problem):
    reject = only_reject(TUNIX_SFT_LINE, tunix(prompts), fmt="tunix_sft")
    assert reject.line == 2
    assert reject.reason.startswith("field 'prompts' is not a rendered Gemma conversation: " + problem)


def test_tunix_sft_turn_text_may_not_hold_other_control_tokens():
    reject = only_reject(tunix("<start_of_turn>user\nHi<pad><end_of_turn>\n<start_of_turn>model\n4<end_of_turn>"),
                         fmt="tunix_sft")
    assert reject.reason.startswith("field 'prompts (turn 1, user)' contains the reserved marker '<pad>'")


def test_parse_gemma_turns_multi_turn():
    text = ("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
            "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>")
    assert parse_gemma_turns(text) == (
        Turn("user", text="Hi"), Turn("model", text="Hello."), Turn("user", text="2+2?"), Turn("model", text="4"),
    )


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}],
         "messages[1] has unknown role 'tool'; use user, model (or assistant) or system"),
        ([{"role": "user", "content": "q"}], "the last message must be a model (assistant) message"),
        ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "model", "content": "a"}],
         "messages[1] is a system message; only the first message may be one"),
        ([{"role": "model", "content": "a"}],
         "messages[0] is a model message; after an optional system message, messages must alternate user, model, user, ..."),
        ([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}, {"role": "model", "content": "a"}],
         "messages[1] is a user message; after an optional system message, messages must alternate user, model, user, ..."),
        ([{"role": "user", "content": ""}, {"role": "model", "content": "a"}], "field 'messages[0].content' is empty"),
        ([], "field 'messages' must be a non-empty array of {\"role\", \"content\"} objects"),
        (["hi"], "messages[0] must be an object, not a string"),
    ],
)
def test_malformed_messages(messages, reason):
    assert only_reject(dumps({"messages": messages}), fmt="messages").reason == reason


def ungar(**changes) -> str:
    return dumps(dict(UNGAR_TRACE, **changes))


def step(i, content="c", type_="t"):
    return {"i": i, "type": type_, "content": content}


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (ungar(final_answer=""), "field 'final_answer' is empty"),
        (ungar(steps=[]), "field 'steps' has 0 steps; a trace needs 1 to 1,000"),
        (ungar(steps=[step(i) for i in range(1001)]), "field 'steps' has 1001 steps; a trace needs 1 to 1,000"),
        (ungar(steps=[step(0), step(1), step(0)]), "step indices must be unique; i=0 appears more than once"),
        (ungar(steps=[step(-1)]), "field 'steps[0].i' is -1; step indices must be >= 0"),
        (ungar(steps=[step("1")]), "field 'steps[0].i' must be an integer, not a string"),
        (ungar(steps=[step(True)]), "field 'steps[0].i' must be an integer, not a boolean"),
        (ungar(steps=[step(0, type_="")]), "field 'steps[0].type' is empty"),
        (ungar(steps=[step(0, type_="t" * 65)]), "field 'steps[0].type' is 65 characters long; the limit is 64"),
        (ungar(steps=[step(0, content="x" * 20_001)]),
         "field 'steps[0].content' is 20,001 characters long; the limit is 20,000"),
        (ungar(prompt="p" * 50_001), "field 'prompt' is 50,001 characters long; the limit is 50,000"),
        (ungar(steps=[{"i": 0, "type": "t"}]), "missing field 'steps[0].content'"),
        (ungar(steps=["just text"]), "steps[0] must be an object, not a string"),
        (ungar(meta="ungar"), "field 'meta' must be an object or null, not a string"),
        (dumps({k: v for k, v in UNGAR_TRACE.items() if k != "trace_version"}), "missing field 'trace_version'"),
        (ungar(trace_version="v" * 65), "field 'trace_version' is 65 characters long; the limit is 64"),
    ],
)
def test_reasoning_trace_limits(line, reason):
    reject = only_reject(ungar(), line, fmt="reasoning_trace")
    assert (reject.line, reject.reason) == (2, reason)


def test_reasoning_trace_at_the_limits_is_accepted():
    (example,) = parse(ungar(steps=[step(i) for i in range(1000)], meta=None, prompt="p" * 50_000),
                       fmt="reasoning_trace")
    assert len(example.turns[1].steps) == 1000


def test_reject_raw_is_capped():
    long_line = '{"prompt": "' + "x" * 20_000 + '"'  # broken JSON, long
    reject = only_reject(long_line, fmt="prompt_completion")
    assert len(reject.raw) == RAW_CAP + len("...[truncated]")
    assert reject.raw.endswith("x...[truncated]")


# JSON that Python's json module reads and the job cannot use: each line is a reject naming why.
HOSTILE_JSON = [
    ('{"prompt": "a", "completion": "b", "prompt": "c"}', "duplicate key 'prompt'"),
    ('{"prompt": "a", "completion": ' + "7" * 5000 + "}", "completion: a number of 5,000 characters"),
    ('{"prompt": "a", "completion": "b", "id": ' + "1" * 4301 + "}", "id: a number of 4,301 characters"),
    ('{"prompt": "a", "completion": 1e999}', "completion: the number 1e999 is beyond the range of a float"),
    ('{"prompt": "a", "completion": NaN}', "completion: NaN is not a JSON number"),
    ('{"prompt": "\\ud800", "completion": "b"}', "prompt: a string holds a lone UTF-16 surrogate (\\ud800)"),
    ('{"prompt": "a", "completion": "b", "meta": {"\\udfff": 1}}', "meta: a key holds a lone UTF-16 surrogate"),
    ('{"prompt": "a", "completion": "b", "meta": ' + "[" * 100 + "]" * 100 + "}", "nested too deeply"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
]


@pytest.mark.parametrize(("line", "reason"), HOSTILE_JSON, ids=[f"hostile-{k}" for k in range(len(HOSTILE_JSON))])
def test_json_the_job_cannot_use_is_a_reject_naming_why(line, reason):
    records = parse(dumps(PROMPT_COMPLETION), line, dumps(PROMPT_COMPLETION), fmt="prompt_completion")
    assert [(type(r), r.line) for r in records] == [(Example, 1), (Reject, 2), (Example, 3)]
    assert reason in records[1].reason


@pytest.mark.parametrize(("line", "reason"), HOSTILE_JSON, ids=[f"hostile-{k}" for k in range(len(HOSTILE_JSON))])
def test_json_the_job_cannot_use_in_an_eval_line_is_bad_input(line, reason):
    line = line.replace('"completion"', '"expected_answer"')
    with pytest.raises(BadInput) as e:
        parse_eval_lines(numbered(EVAL_LINES[0], line), URI)
    assert str(e.value).startswith(f"{URI}:2: ") and reason.replace("completion", "expected_answer") in str(e.value)


def test_a_long_line_from_the_reader_is_a_reject_with_its_start_and_size():
    head = b'{"prompt": "' + b"x" * 20_000
    records = list(parse_lines([(1, LongLine(head, 9 * 2**20)), (2, dumps(PROMPT_COMPLETION).encode())], URI))
    assert [(type(r), r.line) for r in records] == [(Reject, 1), (Example, 2)]
    assert records[0].reason.startswith(f"the line is {9 * 2**20:,} bytes long; records are limited to")
    assert records[0].raw == head.decode()[:RAW_CAP] + "...[truncated]"
    with pytest.raises(BadInput, match=f"^{URI}:2: the line is 9,437,184 bytes long"):
        parse_eval_lines([(1, EVAL_LINES[0].encode()), (2, LongLine(head, 9 * 2**20))], URI)


# --- BOM, blank lines, limit -----------------------------------------------------------------


def test_bom_on_the_first_line_is_stripped_and_blank_lines_are_not_records():
    records = parse(b"\xef\xbb\xbf" + dumps(PROMPT_COMPLETION).encode(), b"", b"  \t ", dumps(PROMPT_COMPLETION))
    assert [(type(r), r.line) for r in records] == [(Example, 1), (Example, 4)]


def test_a_bom_only_first_line_is_blank():
    (example,) = parse(b"\xef\xbb\xbf", dumps(PROMPT_COMPLETION))
    assert example.line == 2


def test_limit_counts_records_not_blank_lines():
    lines = ["", dumps(PROMPT_COMPLETION), "", "{bad", dumps(PROMPT_COMPLETION), dumps(PROMPT_COMPLETION)]
    records = parse(*lines, fmt="prompt_completion", limit=3)
    assert [(type(r), r.line) for r in records] == [(Example, 2), (Reject, 4), (Example, 5)]
    assert parse(*lines, limit=0) == []


def test_parse_lines_is_lazy():
    def lines():
        yield 1, dumps(PROMPT_COMPLETION).encode()
        raise AssertionError("read past the limit")

    assert len(list(parse_lines(lines(), URI, "prompt_completion", limit=1))) == 1


# --- eval sets -------------------------------------------------------------------------------

EVAL_LINES = [
    '{"id": "eval-001", "prompt": "What is 15 + 27?", "expected_answer": "42", "category": "arithmetic", '
    '"difficulty": "easy"}',
    '{"id": "eval-009", "prompt": "A fair coin is flipped. What is the probability of heads?", '
    '"expected_answer": "0.5 or 50%", "category": "probability", "difficulty": "easy"}',
    '{"id": "eval-012", "prompt": "Name the three primary colors.", "expected_answer": "red, blue, yellow", '
    '"category": "knowledge", "difficulty": "easy"}',
    '{"id": "eval-015", "prompt": "Pens cost $3 each. How much do 4 pens cost?", "expected_answer": "$12", '
    '"category": "word_problem", "difficulty": "medium"}',
    '{"id": "eval-020", "prompt": "What is the capital of France?", "expected_answer": "Paris", '
    '"category": "knowledge", "difficulty": "easy"}',
]


def test_eval_set_in_the_backend_format():
    items = parse_eval_lines(numbered(*EVAL_LINES), "evalsets/eval_v1.jsonl")
    assert items[0] == EvalItem("eval-001", "What is 15 + 27?", "42", "arithmetic", "easy")
    assert [i.expected_answer for i in items] == ["42", "0.5 or 50%", "red, blue, yellow", "$12", "Paris"]
    assert [i.category for i in items] == ["arithmetic", "probability", "knowledge", "word_problem", "knowledge"]


def test_eval_items_from_traces():
    trace = dict(json.loads(TRACE_LINE), metadata={"category": "arithmetic", "difficulty": "easy"})
    ungar_line = dumps(dict(UNGAR_TRACE, meta=dict(UNGAR_TRACE["meta"], id="hcd-0")))
    items = parse_eval_lines(numbered(dumps(trace), ungar_line, dumps({"prompt": "1+1?", "expected_answer": 2})), URI)
    assert items == [
        EvalItem("5f0c6d1e-2b43-4c1e-9a57-3f1d2c8b9e10", "What is 15 + 27?", "42", "arithmetic", "easy"),
        EvalItem("hcd-0", "High Card Duel: You have 1 hidden card. Action: reveal.", "reveal"),
        EvalItem("line-3", "1+1?", "2"),
    ]


def test_eval_set_bom_blank_lines_and_limit():
    lines = numbered(b"\xef\xbb\xbf" + EVAL_LINES[0].encode(), b"", *[line.encode() for line in EVAL_LINES[1:]])
    assert [i.id for i in parse_eval_lines(lines, URI, limit=2)] == ["eval-001", "eval-009"]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{oops", f"{URI}:3: invalid JSON: Expecting property name enclosed in double quotes (column 2)"),
        ('["a"]', f"{URI}:3: a JSON array, not a JSONL object"),
        ('{"id": "x", "prompt": "q", "answer": "a"}', f"{URI}:3: not an eval item (keys: answer, id, prompt)"),
        ('{"id": "x", "prompt": "", "expected_answer": "a"}', f"{URI}:3: field 'prompt' is empty"),
        ('{"id": "x", "prompt": "q<end_of_turn>", "expected_answer": "a"}',
         f"{URI}:3: field 'prompt' contains the reserved marker '<end_of_turn>'"),
        ('{"id": "x", "prompt": "q", "expected_answer": "a", "category": 3}',
         f"{URI}:3: field 'category' must be a non-empty string"),
        ('{"id": "eval-001", "prompt": "q", "expected_answer": "a"}',
         f"{URI}:3: duplicate eval item id 'eval-001' (first on line 1)"),
    ],
)
def test_any_bad_eval_line_is_bad_input(bad_line, message):
    with pytest.raises(BadInput) as e:
        parse_eval_lines(numbered(EVAL_LINES[0], EVAL_LINES[1], bad_line), URI)
    assert str(e.value).startswith(message)


def test_an_empty_eval_set_is_bad_input():
    with pytest.raises(BadInput, match=f"^{URI} has no eval items"):
        parse_eval_lines(numbered("", " "), URI)


# --- predictions -----------------------------------------------------------------------------


def test_predictions_are_typed_where_read_and_numeric_ids_are_eval_ids():
    lines = numbered(b"\xef\xbb\xbf" + b'{"id": "eval-001", "output": "Answer: 42"}', "",
                     '{"id": 7, "output": ""}', '{"id": "8", "output": "x", "extra": 1}')
    assert parse_prediction_lines(lines, URI) == [
        {"id": "eval-001", "output": "Answer: 42"}, {"id": "7", "output": ""}, {"id": "8", "output": "x"}]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{oops", "invalid JSON: Expecting property name"),
        ('[{"id": "a", "output": "b"}]', "a JSON array, not a JSONL object"),
        ('{"output": "b"}', "field 'id' must be a string or a whole number, not null"),
        ('{"id": true, "output": "b"}', "field 'id' must be a string or a whole number, not a boolean"),
        ('{"id": 7.5, "output": "b"}', "field 'id' must be a string or a whole number, not a number"),
        ('{"id": "a", "output": 42}', "field 'output' must be a string, not a number"),
        ('{"id": "a", "output": "b", "output": "c"}', "duplicate key 'output'"),
        ('{"id": ' + "9" * 5000 + ', "output": "b"}', "id: a number of 5,000 characters"),
        ('{"id": "a", "output": "\\udc00"}', "output: a string holds a lone UTF-16 surrogate"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_a_bad_prediction_line_is_bad_input_naming_it(bad_line, message):
    with pytest.raises(BadInput) as e:
        parse_prediction_lines(numbered('{"id": "a", "output": "b"}', bad_line), URI)
    assert str(e.value).startswith(f"{URI}:2: ") and message in str(e.value)


# --- reading from storage (needs job.io) -----------------------------------------------------


def test_read_examples_and_eval_items_from_files(tmp_path):
    pytest.importorskip("job.io")
    from job.formats import read_eval_items, read_examples

    data = tmp_path / "data.jsonl.gz"
    data.write_bytes(gzip.compress((TRACE_LINE + "\r\n\r\n[1]\n").encode()))
    records = list(read_examples(str(data)))
    assert [(type(r), r.line) for r in records] == [(Example, 1), (Reject, 3)]
    evalset = tmp_path / "eval.jsonl"
    evalset.write_text("\n".join(EVAL_LINES) + "\n")
    assert len(read_eval_items(str(evalset))) == len(EVAL_LINES)
    with pytest.raises(BadInput):
        read_eval_items(str(tmp_path / "missing.jsonl"))
