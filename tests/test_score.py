"""Answer extraction and scoring: the free-text answers of the backend's eval set, and fairness."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from job.errors import BadInput
from job.formats import EvalItem
from job.score import answers_match, extract_answer, normalize, score_output, score_predictions

# Text made of what answers are made of, so the rules (separators, units, signs) get exercised.
ANSWERISH = st.one_of(st.text(max_size=40), st.text(alphabet="0123456789,.$%-+/ abcdegkmor°*`\"'", max_size=20))

# ----------------------------------------------------------------------------------- extraction


def test_extracts_text_after_answer_marker():
    assert extract_answer("Reasoning:\n1. 15 + 27 = 42\nAnswer: 42<end_of_turn>") == ("42", True)


def test_last_answer_line_wins_and_marker_is_case_insensitive():
    output = "Answer: 41\nWait, let me recheck.\nfinal ANSWER:  42  \n"
    assert extract_answer(output) == ("42", True)


def test_text_after_end_of_turn_is_not_the_reply():
    assert extract_answer("Answer: 42<end_of_turn>\n<start_of_turn>user\nAnswer: 7") == ("42", True)


def test_bold_answer_marker():
    assert extract_answer("**Answer:** Paris") == ("Paris", True)


def test_empty_answer_line_is_not_an_answer_line():
    # Cut off right after the marker: no answer was given; the last number is a fallback only.
    assert extract_answer("So 6 * 7 = 42.\nAnswer:") == ("42", False)


def test_fallback_to_last_number():
    assert extract_answer("First 3 apples, then 9 more, total 12 apples.") == ("12", False)
    assert extract_answer("The total is $1,234.") == ("1,234", False)


def test_no_answer_and_no_number():
    assert extract_answer("I think it is a city in France, famous for a tower") == (None, False)
    assert extract_answer("") == (None, False)


# -------------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Paris", "paris"),
        ("  PARIS.  ", "paris"),
        ('"Paris"', "paris"),
        ("**Paris**", "paris"),
        ("`42`", "42"),
        ("$12", "12"),
        ("€12.50", "12.50"),
        ("1,234", "1234"),
        ("1,234,567", "1234567"),
        ("red, blue", "red, blue"),
        ("180 degrees", "180"),
        ("180°", "180"),
        ("120 km", "120"),
        ("9.8 m/s^2", "9.8"),
        ("50 %", "50%"),
        ("50 percent", "50%"),
        ("12 or 13", "12 or 13"),
        ("42!", "42"),
    ],
)
def test_normalize(raw, expected):
    assert normalize(raw) == expected


# ------------------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    "predicted, expected",
    [
        # every free-text answer of the backend's eval set, in the forms a model writes them
        ("0.5", "0.5 or 50%"),
        ("50%", "0.5 or 50%"),
        ("1/2", "0.5 or 50%"),
        ("50 percent", "0.5"),
        ("0.50", "0.5 or 50%"),
        ("red, blue, yellow", "red, blue, yellow"),
        ("Yellow, red and blue", "red, blue, yellow"),
        ("red, blue, and yellow.", "red, blue, yellow"),
        ("$12", "$12"),
        ("12", "$12"),
        ("12.00 dollars", "$12"),
        ("180 degrees", "180 degrees"),
        ("180", "180 degrees"),
        ("180°", "180 degrees"),
        ("120 km", "120 km"),
        ("120", "120 km"),
        ("120 kilometers", "120 km"),
        ("Paris", "Paris"),
        ("paris.", "Paris"),
        ("42", "42"),
        ("42.0", "42"),
        ("+42", "42"),
        ("1,234", "1234"),
        ("1234", "1,234"),
        ("0.33", "1/3"),
        ("-5", "−5"),
        ("0.5 or 50%", "0.5 or 50%"),
    ],
)
def test_answers_match(predicted, expected):
    assert answers_match(predicted, expected)


@pytest.mark.parametrize(
    "predicted, expected",
    [
        ("12", "120 km"),
        ("120", "12"),
        ("$120", "$12"),
        ("41", "42"),
        ("4.2", "42"),
        ("0.05", "0.5 or 50%"),
        ("5%", "0.5 or 50%"),
        ("red, blue", "red, blue, yellow"),
        ("red, blue, green", "red, blue, yellow"),
        ("London", "Paris"),
        ("12 or 13", "12"),  # hedging between answers is not an answer
        ("0", "1/2"),
        ("0.3", "1/3"),
        ("", "42"),
    ],
)
def test_answers_do_not_match(predicted, expected):
    assert not answers_match(predicted, expected)


# -------------------------------------------------------------------------------------- scoring


def test_strict_needs_an_answer_line():
    score = score_output("Reasoning:\n1. 15 + 27 = 42\nAnswer: 42<end_of_turn>", "42")
    assert (score.extracted, score.has_answer_line, score.strict, score.flexible) == ("42", True, True, True)


def test_fallback_number_is_flexible_but_not_strict():
    score = score_output("15 + 27 makes 42", "42")
    assert (score.extracted, score.has_answer_line, score.strict, score.flexible) == ("42", False, False, True)


def test_expected_answer_inside_answer_line_is_flexible_only():
    score = score_output("Answer: The capital is Paris.", "Paris")
    assert score.has_answer_line and not score.strict and score.flexible
    score = score_output("Answer: the probability is 50% overall", "0.5 or 50%")
    assert not score.strict and score.flexible
    score = score_output("Answer: the colors are red, blue and yellow", "red, blue, yellow")
    assert not score.strict and score.flexible


def test_number_inside_a_longer_number_is_not_found():
    score = score_output("Answer: The distance is 120 km", "12")
    assert not score.strict and not score.flexible
    score = score_output("Answer: 12.5", "12")
    assert not score.flexible


def test_wrong_answer_line_is_not_rescued_by_earlier_numbers():
    score = score_output("Reasoning:\n1. 15 + 27 = 42\nAnswer: 41", "42")
    assert not score.strict and not score.flexible


def test_rambling_output_without_answer_or_number_scores_false():
    output = "Let me think about this question carefully and consider each possibility. " * 200
    score = score_output(output, "Paris")
    assert score == score_output(output, "Paris")
    assert (score.extracted, score.strict, score.flexible) == (None, False, False)


def test_whole_reply_is_not_compared_to_the_answer():
    # The backend's earlier scoring compared whole replies; a reply that only mentions the answer
    # word in passing without an answer line gets no credit.
    score = score_output("Paris is lovely but I am not sure what you are asking", "Paris")
    assert not score.flexible


@given(ANSWERISH, ANSWERISH)
@settings(max_examples=200, deadline=None)
def test_strict_implies_flexible(output, expected):
    score = score_output(output, expected)
    assert not score.strict or score.flexible


@given(ANSWERISH.filter(lambda s: s.strip()))
@settings(max_examples=200, deadline=None)
def test_an_answer_matches_itself(answer):
    assert answers_match(answer, answer)


@given(ANSWERISH)
@settings(max_examples=300, deadline=None)
def test_normalize_is_idempotent(text):
    once = normalize(text)
    assert normalize(once) == once


@given(st.integers(min_value=-10**9, max_value=10**9))
@settings(max_examples=200, deadline=None)
def test_numbers_match_their_thousands_form_and_not_a_neighbour(n):
    assert answers_match(f"{n:,}", str(n))
    assert answers_match(f"{n}.0", str(n))
    assert not answers_match(str(n + 1), str(n))
    assert not answers_match(str(n * 10 + 1), str(n))


# ------------------------------------------------------------------------------ score command


ITEMS = [
    EvalItem("eval-001", "What is 15 + 27?", "42", "arithmetic", "easy"),
    EvalItem("eval-002", "Capital of France?", "Paris", "knowledge"),
]


def test_score_predictions_in_eval_order():
    predictions = [{"id": "eval-002", "output": "Answer: Paris"}, {"id": "eval-001", "output": "it is 41"}]
    assert list(score_predictions(ITEMS, predictions)) == [
        {"id": "eval-001", "extracted": "41", "strict": False, "flexible": False},
        {"id": "eval-002", "extracted": "Paris", "strict": True, "flexible": True},
    ]


def test_score_predictions_unknown_id():
    predictions = [{"id": "eval-001", "output": "42"}, {"id": "eval-002", "output": "x"}, {"id": "eval-999", "output": "x"}]
    with pytest.raises(BadInput, match="eval-999"):
        list(score_predictions(ITEMS, predictions))


def test_score_predictions_missing_item():
    with pytest.raises(BadInput, match="eval-002"):
        list(score_predictions(ITEMS, [{"id": "eval-001", "output": "42"}]))


def test_score_predictions_duplicate_and_malformed():
    with pytest.raises(BadInput, match="eval-001"):
        list(score_predictions(ITEMS, [{"id": "eval-001", "output": "1"}, {"id": "eval-001", "output": "2"}]))
    with pytest.raises(BadInput, match="output"):
        list(score_predictions(ITEMS, [{"id": "eval-001"}]))


# ------------------------------------------------------------------- linear in the reply's length

import time  # noqa: E402

import score_reference as before  # noqa: E402

from job.score import answer_line_start  # noqa: E402

# What answers and their wrappings are made of: each rule of `normalize` gets something to act on.
PIECES = st.sampled_from([
    "4", "42", "1,234", "0.5", ".5", "1/3", "-", "+", "−", "$", "€", "%", " percent", " per cent", "50", "1,2",
    " ", "  ", "\t", "\n", ".", "!", "?", ",", ";", ":", "\"", "'", "“", "”", "‘", "’", "`", "*", "**", "_",
    "km", " km", " degrees", "°", "°c", "m/s^2", "²", "or", " or ", " and ", "Paris", "red", "x", "ß", "İ",
    "Answer:", "answer :", "**Answer:**", "<end_of_turn>", "(", ")",
])
PIECED = st.lists(PIECES, max_size=14).map("".join)
QUOTES = st.sampled_from(["\"", "'", "“", "”", "‘", "’", "`", "*", "**", "_", " ", ".", ",", "!"])


@st.composite
def _wrapped(draw) -> str:
    """An answer inside layers of quotes, bold markers, punctuation and spaces, mirrored or not."""
    layers = draw(st.lists(QUOTES, max_size=8))
    inner = draw(PIECED)
    closing = layers[::-1] if draw(st.booleans()) else draw(st.lists(QUOTES, max_size=8))
    return "".join(layers) + inner + "".join(closing)


TEXTS = st.one_of(ANSWERISH, PIECED, _wrapped())
EXPECTED = st.one_of(st.sampled_from(["42", "Paris", "0.5 or 50%", "red, blue, yellow", "$12", "180 degrees", "1/3",
                                      "1,234", "12", "-5"]), PIECED)


@given(TEXTS)
@settings(max_examples=1500, deadline=None)
def test_normalize_is_what_it_was(text):
    assert normalize(text) == before.normalize(text)


@given(st.one_of(TEXTS, st.lists(TEXTS, max_size=4).map("\n".join)), EXPECTED)
@settings(max_examples=1500, deadline=None)
def test_scores_are_what_they_were(output, expected):
    score = score_output(output, expected)
    assert (score.extracted, score.has_answer_line, score.strict, score.flexible) == before.score_output(output, expected)
    assert answer_line_start(output) == before.answer_line_start(output)
    assert answers_match(output, expected) == before.answers_match(output, expected)


MEGABYTE = 1_000_000
HOSTILE_REPLIES = {
    "\"Answer:\" on every line": "Answer:\n" * (MEGABYTE // 8),
    "one digit run": "7" * MEGABYTE,
    "an answer line of commas": "Answer: " + "1," * (MEGABYTE // 2),
    "an answer line of distinct numbers": "Answer: " + ",".join(map(str, range(MEGABYTE // 7))),
    "nested parentheses": "Answer: " + "(" * (MEGABYTE // 2) + ")" * (MEGABYTE // 2),
    "nested quotes and bold": "Answer: " + "*\"" * (MEGABYTE // 4) + "42" + "\"*" * (MEGABYTE // 4),
    "quotes between spaces": "Answer: " + "* " * (MEGABYTE // 4) + "42" + " *" * (MEGABYTE // 4),
    "full stops between spaces": "Answer: 12 km" + " ." * (MEGABYTE // 2),
    "underscores around a percentage": "Answer: " + "_" * (MEGABYTE // 2) + "5 percent" + "_" * (MEGABYTE // 2),
}


@pytest.mark.parametrize("kind", HOSTILE_REPLIES)
def test_a_megabyte_reply_is_scored_in_time(kind):
    # A guard against quadratic time, with a wide margin (scripts/score_timing.py measures): such
    # replies took minutes when each layer of quotes cost a pass over the whole answer.
    answers = ("42", "Paris", "red, blue, yellow", "0.5 or 50%")
    started = time.perf_counter()
    for expected in answers:
        score_output(HOSTILE_REPLIES[kind], expected)
    assert (time.perf_counter() - started) / len(answers) < 2.0
