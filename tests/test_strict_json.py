"""Tests for job.strict_json: the one JSON reader for outside input, and its bounds."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from job.strict_json import MAX_DEPTH, MAX_NUMBER_CHARS, JSONError, loads

# (JSON text, a piece of the error): each a way Python's json reads what the job cannot use.
REFUSED = [
    ('{"steps": 1, "steps": 2}', "duplicate key 'steps'"),
    ('{"training": {"lora": {"rank": 1, "rank": 2}}}', "duplicate key 'training.lora.rank'"),
    ('[{"a": 1}, {"b": [1, {"c": 1, "c": 1}]}]', "duplicate key '[1].b[1].c'"),
    ("1" * 5000, "a number of 5,000 characters"),
    ('{"steps": ' + "9" * 4301 + "}", "steps: a number of 4,301 characters"),
    ('{"x": -' + "1" * 101 + "}", "x: a number of 102 characters"),
    ('{"lr": 0.' + "1" * 200 + "}", "lr: a number of 202 characters"),
    ('{"lr": 1e999}', "lr: the number 1e999 is beyond the range of a float"),
    ('{"lr": -1.5e400}', "lr: the number -1.5e400 is beyond the range of a float"),
    ('{"lr": NaN}', "lr: NaN is not a JSON number"),
    ('[Infinity]', "[0]: Infinity is not a JSON number"),
    ('{"a": [-Infinity]}', "a[0]: -Infinity is not a JSON number"),
    ('"\\ud800"', "lone UTF-16 surrogate (\\ud800)"),
    ('{"prompt": "a\\udfffb"}', "prompt: a string holds a lone UTF-16 surrogate (\\udfff)"),
    ('{"p": ["ok", "\\ude00\\ud83d"]}', "p[1]: a string holds a lone UTF-16 surrogate"),
    ('{"\\udc80": 1}', "a key holds a lone UTF-16 surrogate (\\udc80)"),
    ('"\udc80"', "the text holds a lone UTF-16 surrogate (\\udc80)"),  # not from UTF-8: an argv value
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"a":' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
    ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), f"more than {MAX_DEPTH} levels"),
]

ACCEPTED = [
    ('{"//": "a", "//": "b", "x": 1}', {"//": "b", "x": 1}),  # comments may repeat
    ('"\\ud83d\\ude00"', "\U0001F600"),  # a surrogate pair is one character
    ('"\\\\ud800"', "\\ud800"),  # an escaped backslash: the text, not an escape
    ("9" * MAX_NUMBER_CHARS, int("9" * MAX_NUMBER_CHARS)),
    ("1e-999", 0.0),  # underflows to zero: harmless
    ("[" * MAX_DEPTH + "]" * MAX_DEPTH, json.loads("[" * MAX_DEPTH + "]" * MAX_DEPTH)),
    ('{"a": [1, 2.5, true, null, "x"]}', {"a": [1, 2.5, True, None, "x"]}),
]


@pytest.mark.parametrize(("text", "says"), REFUSED, ids=[f"refused-{k}" for k in range(len(REFUSED))])
def test_what_python_json_takes_and_the_job_cannot_use_is_refused(text, says):
    with pytest.raises(JSONError) as caught:
        loads(text)
    assert says in str(caught.value)
    assert caught.value.line is None  # not a syntax error: callers name the place themselves


@pytest.mark.parametrize(("text", "value"), ACCEPTED, ids=[f"accepted-{k}" for k in range(len(ACCEPTED))])
def test_json_within_the_bounds_is_read_as_python_reads_it(text, value):
    assert loads(text) == value


@pytest.mark.parametrize("text", ['{"a": 1,}', "{oops", "", '{"a": 1} {"b": 2}', "'single'"])
def test_syntax_errors_carry_line_and_column(text):
    with pytest.raises(JSONError) as caught:
        loads(text)
    assert caught.value.line == 1 and caught.value.column >= 1


# --------------------------------------------------------------------------------- properties

BOUNDED = st.recursive(
    st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"]), max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(st.characters(exclude_categories=["Cs"]), max_size=8), inner, max_size=4),
    max_leaves=20,
)
# Pieces of hostile JSON, spliced into otherwise good documents.
HOSTILE = st.sampled_from([
    "9" * 5000, "-" + "1" * 300, "1e999", "-1e999", "0." + "5" * 150, "NaN", "Infinity", "-Infinity",
    '"\\ud800"', '"x\\udbff"', '"\\udc00y"', "[" * 500 + "]" * 500, '{"k": 1, "k": 2}',
])


@settings(max_examples=300, deadline=None)
@given(BOUNDED)
def test_any_bounded_document_round_trips(value):
    assert loads(json.dumps(value)) == value
    assert loads(json.dumps(value, ensure_ascii=False)) == value


@settings(max_examples=300, deadline=None)
@given(BOUNDED, HOSTILE, st.sampled_from(["list", "object", "alone"]))
def test_a_hostile_piece_anywhere_is_a_json_error(value, piece, where):
    document = json.dumps(value)
    text = {"list": f"[{document}, {piece}]", "object": f'{{"a": {document}, "b": {piece}}}', "alone": piece}[where]
    with pytest.raises(JSONError):
        loads(text)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60) | st.binary(max_size=60).map(lambda b: b.decode("utf-8", "surrogateescape")))
def test_any_text_is_a_value_or_a_json_error_and_never_anything_else(text):
    try:
        value = loads(text)
    except JSONError as e:
        assert e.reason
    else:
        json.dumps(value).encode("utf-8")  # what was read can be written back
        assert not (isinstance(value, float) and not math.isfinite(value))
