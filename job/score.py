"""Answer extraction and scoring: strict and flexible correctness of one generated answer.

The model is trained to end its reply with a line `Answer: X` and to stop at `<end_of_turn>`.
Two scores are kept apart so a report can tell "learned the format" from "learned the answer":

- strict: the reply has an answer line and that line's text matches the expected answer;
- flexible: the extracted answer (answer line, else the last number in the reply) matches, or
  the expected answer appears in the answer line as a whole word or number.

Matching normalises case, currency signs, thousands separators, trailing punctuation, quotes,
markdown and units, compares numbers numerically (fractions and percentages included), compares
comma lists as sets, and accepts any alternative of an expected answer written with " or ".
Everything here is a pure function.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction

from job.errors import BadInput
from job.formats import END_OF_TURN, EvalItem

_ANSWER_MARKER = re.compile(r"answer\s*:", re.IGNORECASE)
# A number as written in text: sign, thousands separators, decimals, a fraction, a percent sign.
_NUMBER_IN_TEXT = re.compile(r"(?<![\w.])[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?%?")
# A whole normalised answer that is one number (thousands separators already removed).
_NUMBER = re.compile(r"([-+]?)(\d+(?:\.\d*)?|\.\d+)(?:/(\d+))?(%?)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_CURRENCY = re.compile(r"[$€£¥]")
# What may follow a number as its unit: "180 degrees", "120 km", "9.8 m/s^2", "12 apples", "180°".
# At most three words, letters only, so "12 or 13" or "3 + 4" are never taken for units.
_UNIT_WORD = r"[a-z°][a-z°/]*(?:\^[23]|[²³])?"
_UNIT = r"(?!(?:or|and|plus|minus|times|to)\b)(?:°\s*[cf]?|" + _UNIT_WORD + r"(?:\s+" + _UNIT_WORD + r"){0,2})"
_NUMBER_WITH_UNIT = re.compile(r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?)\s*" + _UNIT)
_PERCENT = re.compile(r"(?<=\d)\s*(?:%|percent\b|per cent\b)")
_MAX_NUMBER_CHARS = 100  # longer digit strings are compared as text
_ALTERNATIVES = re.compile(r"\s+or\s+", re.IGNORECASE)
_LIST_SEPARATOR = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+")
_WRAPPERS = "\"'“”‘’`*_"
_TRAILING_PUNCTUATION = ".!?;:,"


@dataclass(frozen=True)
class Score:
    extracted: str | None
    has_answer_line: bool
    strict: bool
    flexible: bool


@dataclass(frozen=True)
class ItemResult:
    item: EvalItem
    output: str
    finished: bool  # generation stopped at <end_of_turn> instead of running out of tokens
    score: Score


def visible_text(output: str) -> str:
    """The reply as the model meant it: anything after its first <end_of_turn> is not part of it."""
    return output.split(END_OF_TURN, 1)[0]


def answer_line_start(output: str) -> int | None:
    """Offset in `output` of the "Answer:" marker that `extract_answer` reads, or None."""
    found = _answer_line(output)
    return found[0] if found else None


def _answer_line(output: str) -> tuple[int, str] | None:
    text = visible_text(output)
    # The last marker wins; a marker with nothing after it on its line (cut off, or the answer
    # moved to a later line) does not count as an answer line.
    for marker in reversed(list(_ANSWER_MARKER.finditer(text))):
        rest = text[marker.end():].split("\n", 1)[0].strip()
        if text[:marker.start()].endswith("**") and rest.startswith("**"):  # "**Answer:** 42"
            rest = rest[2:].strip()
        if rest:
            return marker.start(), rest
    return None


def extract_answer(output: str) -> tuple[str | None, bool]:
    """The text after the last "Answer:" on its line -> (text, True); else the last number -> (number, False)."""
    found = _answer_line(output)
    if found:
        return found[1], True
    numbers = _NUMBER_IN_TEXT.findall(visible_text(output))
    if numbers:
        return numbers[-1], False
    return None, False


def normalize(text: str) -> str:
    """A canonical form for comparing answers; idempotent (applied until nothing changes)."""
    previous = None
    text = str(text)
    while text != previous:
        previous = text
        text = text.casefold().replace("−", "-")  # U+2212 minus sign
        text = _CURRENCY.sub("", text)
        text = _THOUSANDS.sub("", text)
        text = " ".join(text.split())
        text = text.rstrip(_TRAILING_PUNCTUATION).strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in _WRAPPERS:
            text = text[1:-1].strip()
        elif text and text[0] in _WRAPPERS and text[-1] not in _WRAPPERS and text.count(text[0]) == 1:
            text = text[1:].strip()  # an unbalanced opening quote or bold marker
        elif text and text[-1] in _WRAPPERS and text.count(text[-1]) == 1:
            text = text[:-1].strip()
        text = _PERCENT.sub("%", text)  # "50 %", "50 percent" -> "50%"
        unit = _NUMBER_WITH_UNIT.fullmatch(text)
        if unit:
            text = unit.group(1)
    return text


def _number_values(normalized: str) -> tuple[Fraction, ...] | None:
    """The exact values a normalised answer can mean as a number, or None when it is not one number.

    A percentage means both its ratio and its bare number: "50%" is 0.5 and 50, so it matches
    "0.5" for a probability and "50" for "what percent".
    """
    m = _NUMBER.fullmatch(normalized) if len(normalized) <= _MAX_NUMBER_CHARS else None
    if not m:
        return None
    sign, digits, denominator, percent = m.groups()
    if denominator is not None and int(denominator) == 0:
        return None
    value = Fraction(digits.rstrip(".") or "0") / int(denominator or 1)
    if sign == "-":
        value = -value
    return (value / 100, value) if percent else (value,)


def _decimal_places(normalized: str) -> int:
    m = re.search(r"\.(\d+)", normalized)
    return len(m.group(1)) if m else 0


def _numbers_match(predicted: str, expected: str) -> bool | None:
    """True/False when both are numbers (compared exactly), None when the comparison does not apply."""
    p_values, e_values = _number_values(predicted), _number_values(expected)
    if p_values is None or e_values is None:
        return None
    places = _decimal_places(predicted)
    for p in p_values:
        for e in e_values:
            if p == e:
                return True
            # "1/3" answered as "0.33" or "0.333": the fraction rounded to the places written.
            if "/" in expected and "/" not in predicted and places >= 2 and round(e, places) == p:
                return True
    return False


def _list_items(normalized: str) -> list[str]:
    return [normalize(part) for part in _LIST_SEPARATOR.split(normalized) if normalize(part)]


def _item_key(item: str) -> str:
    values = _number_values(item)
    return repr(values[-1]) if values else item


def _match_one(predicted: str, expected: str) -> bool:
    p, e = normalize(predicted), normalize(expected)
    if p == e:
        # An answer made only of punctuation normalises to nothing; it still matches itself.
        return bool(p) or (predicted.strip() != "" and predicted.strip() == expected.strip())
    if not p or not e:
        return False
    numeric = _numbers_match(p, e)
    if numeric is not None:
        return numeric
    if "," in p or "," in e:
        p_items, e_items = _list_items(p), _list_items(e)
        if len(e_items) > 1:
            return {_item_key(i) for i in p_items} == {_item_key(i) for i in e_items}
    return False


def alternatives(expected: str) -> list[str]:
    """The accepted answers: "0.5 or 50%" -> ["0.5", "50%"]."""
    return [a for a in (part.strip() for part in _ALTERNATIVES.split(expected)) if a]


def answers_match(predicted: str, expected: str) -> bool:
    """Whether `predicted` is the expected answer or one of its " or " alternatives."""
    if _match_one(predicted, expected):  # also covers an expected answer that contains " or "
        return True
    return any(_match_one(predicted, alt) for alt in alternatives(expected))


def _appears_in(line: str, expected: str) -> bool:
    """Whether the expected answer appears in `line` as a whole word, phrase or number."""
    target = normalize(expected)
    if not target:
        return False
    text = normalize(line)
    if _number_values(target) is not None:
        return any(
            _numbers_match(normalize(n), target) for n in _NUMBER_IN_TEXT.findall(text)
        )
    items = _list_items(target) if "," in target else [target]
    return all(re.search(r"(?<!\w)" + re.escape(item) + r"(?!\w)", text) for item in items)


def score_output(output: str, expected: str) -> Score:
    """Strict and flexible correctness of one reply; strict implies flexible."""
    extracted, has_answer_line = extract_answer(output)
    matches = extracted is not None and answers_match(extracted, expected)
    strict = has_answer_line and matches
    flexible = matches or (
        has_answer_line and any(_appears_in(extracted, alt) for alt in alternatives(expected))
    )
    return Score(extracted=extracted, has_answer_line=has_answer_line, strict=strict, flexible=flexible)


def score_predictions(items: list[EvalItem], predictions: Iterable[dict]) -> Iterator[dict]:
    """Score {"id", "output"} predictions against an eval set, in eval-set order."""
    known = {item.id for item in items}
    outputs: dict[str, str] = {}
    for n, prediction in enumerate(predictions, start=1):
        if not isinstance(prediction, dict) or not isinstance(prediction.get("id"), str):
            raise BadInput(f"prediction {n}: expected an object with a string \"id\" and \"output\"")
        pid = prediction["id"]
        if not isinstance(prediction.get("output"), str):
            raise BadInput(f"prediction {pid!r}: \"output\" must be a string")
        if pid not in known:
            raise BadInput(f"prediction {pid!r} is not in the eval set; score it against the eval set it was made for")
        if pid in outputs:
            raise BadInput(f"prediction {pid!r} appears more than once; keep one output per eval item")
        outputs[pid] = prediction["output"]
    missing = [item.id for item in items if item.id not in outputs]
    if missing:
        raise BadInput(f"eval item {missing[0]!r} has no prediction ({len(missing)} missing); give one output per eval item")
    for item in items:
        score = score_output(outputs[item.id], item.expected_answer)
        yield {"id": item.id, "extracted": score.extracted, "strict": score.strict, "flexible": score.flexible}
