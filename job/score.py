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
# A comma between thousands; the comma first, so the search skips to commas.
_THOUSANDS = re.compile(r",(?<=\d,)(?=\d{3}(?!\d))")
_SIGNS = str.maketrans({"−": "-", "$": None, "€": None, "£": None, "¥": None})  # U+2212 minus; currencies
# What may follow a number as its unit: "180 degrees", "120 km", "9.8 m/s^2", "12 apples", "180°".
# At most three words, letters only, so "12 or 13" or "3 + 4" are never taken for units.
_UNIT_WORD = r"[a-z°][a-z°/]*(?:\^[23]|[²³])?"
_UNIT = r"(?!(?:or|and|plus|minus|times|to)\b)(?:°\s*[cf]?|" + _UNIT_WORD + r"(?:\s+" + _UNIT_WORD + r"){0,2})"
_NUMBER_WITH_UNIT = re.compile(r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?)\s*" + _UNIT)
_PERCENT = re.compile(r"(?<=\d)\s*(?:%|percent\b|per cent\b)")
_DECIMALS = re.compile(r"\.(\d+)")
_MAX_NUMBER_CHARS = 100  # longer digit strings are compared as text
_ALTERNATIVES = re.compile(r"\s+or\s+", re.IGNORECASE)
_LIST_SEPARATOR = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+")
_WRAPPERS = "\"'“”‘’`*_"
_TRAILING_PUNCTUATION = ".!?;:,"
_QUOTES_AND_SPACES = re.compile("[ " + re.escape(_WRAPPERS) + "]*")
_CANONICAL = re.compile(r"[a-z]*|[0-9]+")  # what normalize leaves as it is, known at a glance


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
    return output.partition(END_OF_TURN)[0]


def answer_line_start(output: str) -> int | None:
    """Offset in `output` of the "Answer:" marker that `extract_answer` reads, or None."""
    found = _answer_line(output)
    return found[0] if found else None


def _answer_line(output: str) -> tuple[int, str] | None:
    text = visible_text(output)
    # The last marker wins; a marker with nothing after it on its line (cut off, or the answer
    # moved to a later line) does not count as an answer line.
    # Each marker reads only to its line's end, so many markers cost one pass over the text.
    for marker in reversed(list(_ANSWER_MARKER.finditer(text))):
        line_end = text.find("\n", marker.end())
        rest = text[marker.end():line_end if line_end != -1 else len(text)].strip()
        if text.endswith("**", 0, marker.start()) and rest.startswith("**"):  # "**Answer:** 42"
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
    text = str(text)
    if _CANONICAL.fullmatch(text):
        return text
    while True:
        once = _normalize_once(text)
        if once == text:
            return text
        text = _peel_ends(once)


def _normalize_once(text: str) -> str:
    text = text.casefold().translate(_SIGNS)
    text = _THOUSANDS.sub("", text)
    text = " ".join(text.split())
    text = text.rstrip(_TRAILING_PUNCTUATION).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in _WRAPPERS:
        text = text[1:-1].strip()
    elif text and text[0] in _WRAPPERS and text[-1] not in _WRAPPERS and text.count(text[0]) == 1:
        text = text[1:].strip()  # an unbalanced opening quote or bold marker
    elif text and text[-1] in _WRAPPERS and text.count(text[-1]) == 1:
        text = text[:-1].strip()
    if "%" in text or "per" in text:  # a quick look first: the pattern tries every position
        text = _PERCENT.sub("%", text)  # "50 %", "50 percent" -> "50%"
    unit = _NUMBER_WITH_UNIT.fullmatch(text)
    return unit.group(1) if unit else text


def _peel_ends(text: str) -> str:
    """`text` after the passes of `_normalize_once` that only take trailing punctuation, spaces and
    pairs of quotes or bold markers off its ends: the same result, without a whole pass per layer.

    `text` is the result of a pass, so the parts of a pass that work on the whole text change nothing
    inside it. Where a pass may do more (take off a lone quote or a unit, turn "percent" into "%"),
    the text as it was before that pass is left to `_normalize_once`; such passes are few: each
    removes a quote character for good, or leaves a number.
    """
    start, end = 0, len(text)
    quotes = {c: text.count(c) for c in _WRAPPERS}  # how often each occurs in text[start:end]
    while True:
        # Each step takes one or more passes; `before` is where the last of them starts.
        before = (start, end)
        new_start, new_end = _strip_end_punctuation(text, start, end)
        width = _mirrored_quotes(text, new_start, new_end)
        if width:
            shell = text[new_start:new_start + width]
            if len(shell.replace(" ", "")) > 1:  # the last pass starts inside a pair of quotes
                before = (new_start + width - 1, new_end - width + 1)
            for quote in set(shell) - {" "}:
                quotes[quote] -= 2 * shell.count(quote)
            new_start, new_end = _strip_spaces(text, new_start + width, new_end - width)
        elif _lone_quote_at_an_end(text, new_start, new_end, quotes):
            return text[start:end]
        else:
            # While the text ends in punctuation a pass does nothing else: strip the rest at once.
            stripped_end = _strip_trailing_punctuation_and_spaces(text, new_start, new_end)
            if stripped_end < new_end:
                before = (new_start, _end_before_last_strip(text, stripped_end, new_end))
            new_end = stripped_end
        if (new_start, new_end) == (start, end):
            return text[start:end]
        if text.endswith(("percent", "per cent"), new_start, new_end) or (
                new_start < new_end and _NUMBER_WITH_UNIT.fullmatch(text, new_start, new_end)):
            return text[before[0]:before[1]]
        start, end = new_start, new_end


def _mirrored_quotes(text: str, start: int, end: int) -> int:
    """How far quote characters (with spaces between them) open `text[start:end]` and close it in
    mirror order: 3 in "* 'x' *". One pass of `_normalize_once` takes off each pair, then the spaces.
    Found by doubling, then halving, the width; 0 when no quote pair encloses the text."""
    if end - start < 2 or text[start] != text[end - 1] or text[start] not in _WRAPPERS:
        return 0

    def mirrored(width: int) -> bool:
        return (2 * width <= end - start and _QUOTES_AND_SPACES.fullmatch(text, start, start + width) is not None
                and text[start:start + width] == text[end - width:end][::-1])

    found, beyond = 1, 2
    while mirrored(beyond):
        found, beyond = beyond, beyond * 2
    while beyond - found > 1:
        middle = (found + beyond) // 2
        found, beyond = (middle, beyond) if mirrored(middle) else (found, middle)
    return len(text[start:start + found].rstrip(" "))  # up to its last quote: the spaces after go with the text


def _lone_quote_at_an_end(text: str, start: int, end: int, quotes: dict[str, int]) -> bool:
    """Whether `_normalize_once` takes a lone opening or closing quote off `text[start:end]`."""
    if start == end:
        return False
    first, last = text[start], text[end - 1]
    return ((first in _WRAPPERS and last not in _WRAPPERS and quotes[first] == 1)
            or (last in _WRAPPERS and quotes[last] == 1))


def _strip_end_punctuation(text: str, start: int, end: int) -> tuple[int, int]:
    """The bounds of `text[start:end].rstrip(_TRAILING_PUNCTUATION).strip()`."""
    while end > start and text[end - 1] in _TRAILING_PUNCTUATION:
        end -= 1
    return _strip_spaces(text, start, end)


def _strip_trailing_punctuation_and_spaces(text: str, start: int, end: int) -> int:
    while end > start and (text[end - 1] in _TRAILING_PUNCTUATION or text[end - 1].isspace()):
        end -= 1
    return end


def _end_before_last_strip(text: str, end: int, limit: int) -> int:
    """Where the text ended before the pass that stripped it to `end`: after spaces, then punctuation."""
    while end < limit and text[end].isspace():
        end += 1
    while end < limit and text[end] in _TRAILING_PUNCTUATION:
        end += 1
    return end


def _strip_spaces(text: str, start: int, end: int) -> tuple[int, int]:
    """The bounds of `text[start:end].strip()`."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


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
    whole, _, decimals = digits.partition(".")
    # From whole numbers: several times quicker than Fraction parsing the text, for the same value.
    value = Fraction(int(whole + decimals or "0"), 10 ** len(decimals) * int(denominator or 1))
    if sign == "-":
        value = -value
    return (value / 100, value) if percent else (value,)


def _decimal_places(normalized: str) -> int:
    m = _DECIMALS.search(normalized)
    return len(m.group(1)) if m else 0


def _numbers_match(predicted: str, expected: str) -> bool | None:
    """True/False when both are numbers (compared exactly), None when the comparison does not apply."""
    return _values_match(predicted, expected, _number_values(expected))


def _values_match(predicted: str, expected: str, e_values: tuple[Fraction, ...] | None) -> bool | None:
    """`_numbers_match` with the expected answer's values known."""
    p_values = _number_values(predicted)
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


def _list_items(normalized: str) -> Iterator[str]:
    return (item for item in map(normalize, _LIST_SEPARATOR.split(normalized)) if item)


def _item_key(item: str) -> str:
    """What an item of a list is compared by: its value for a number, else its text."""
    values = _number_values(item)
    return repr(values[-1]) if values else item


def _same_items(predicted: str, expected_items: list[str]) -> bool:
    """Whether the normalised list `predicted` holds the expected items (in any order, repeats aside)."""
    wanted, found, seen = {_item_key(i) for i in expected_items}, set(), set()
    for item in _list_items(predicted):
        if item not in seen:  # a long list repeats itself: each distinct item is read once
            seen.add(item)
            key = _item_key(item)
            if key not in wanted:  # a long list of other things is not read to its end
                return False
            found.add(key)
    return found == wanted


def _match_one(predicted: str, p: str, expected: str) -> bool:
    """Whether `predicted` (normalised: `p`) is `expected`."""
    e = normalize(expected)
    if p == e:
        # An answer made only of punctuation normalises to nothing; it still matches itself.
        return bool(p) or (predicted.strip() != "" and predicted.strip() == expected.strip())
    if not p or not e:
        return False
    numeric = _numbers_match(p, e)
    if numeric is not None:
        return numeric
    if "," in p or "," in e:
        e_items = list(_list_items(e))
        if len(e_items) > 1:  # the reply's list is read only when a list is expected
            return _same_items(p, e_items)
    return False


def alternatives(expected: str) -> list[str]:
    """The accepted answers: "0.5 or 50%" -> ["0.5", "50%"]."""
    return [a for a in (part.strip() for part in _ALTERNATIVES.split(expected)) if a]


def answers_match(predicted: str, expected: str) -> bool:
    """Whether `predicted` is the expected answer or one of its " or " alternatives."""
    return _answers_match(predicted, normalize(predicted), expected)


def _answers_match(predicted: str, normalized: str, expected: str) -> bool:
    # The whole expected answer first: it also covers an expected answer that contains " or ".
    return any(_match_one(predicted, normalized, answer) for answer in (expected, *alternatives(expected)))


def _appears_in(text: str, expected: str) -> bool:
    """Whether the expected answer appears in `text` (a normalised line) as a whole word, phrase or number."""
    target = normalize(expected)
    if not target:
        return False
    values = _number_values(target)
    if values is not None:
        numbers = set(_NUMBER_IN_TEXT.findall(text))  # each distinct number compared once
        return any(_values_match(normalize(n), target, values) for n in numbers)
    items = _list_items(target) if "," in target else [target]
    return all(re.search(r"(?<!\w)" + re.escape(item) + r"(?!\w)", text) for item in items)


def score_output(output: str, expected: str) -> Score:
    """Strict and flexible correctness of one reply; strict implies flexible."""
    extracted, has_answer_line = extract_answer(output)
    normalized = normalize(extracted) if extracted is not None else ""  # once: a reply may be long
    matches = extracted is not None and _answers_match(extracted, normalized, expected)
    strict = has_answer_line and matches
    flexible = matches or (
        has_answer_line and any(_appears_in(normalized, alt) for alt in alternatives(expected))
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
