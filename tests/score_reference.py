"""The scorer as it was before it was made linear in the length of a reply: the reference that
tests/test_score.py holds the linear one to. Quadratic (a pass over the whole answer per layer of
quotes), so only for short texts. The helpers that did not change are the job's own."""

from __future__ import annotations

import re

from job.formats import END_OF_TURN
from job.score import _NUMBER_IN_TEXT, _number_values, _numbers_match, alternatives

_ANSWER_MARKER = re.compile(r"answer\s*:", re.IGNORECASE)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_CURRENCY = re.compile(r"[$€£¥]")
_UNIT_WORD = r"[a-z°][a-z°/]*(?:\^[23]|[²³])?"
_UNIT = r"(?!(?:or|and|plus|minus|times|to)\b)(?:°\s*[cf]?|" + _UNIT_WORD + r"(?:\s+" + _UNIT_WORD + r"){0,2})"
_NUMBER_WITH_UNIT = re.compile(r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?)\s*" + _UNIT)
_PERCENT = re.compile(r"(?<=\d)\s*(?:%|percent\b|per cent\b)")
_LIST_SEPARATOR = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+")
_WRAPPERS = "\"'“”‘’`*_"
_TRAILING_PUNCTUATION = ".!?;:,"


def visible_text(output: str) -> str:
    return output.split(END_OF_TURN, 1)[0]


def _answer_line(output: str) -> tuple[int, str] | None:
    text = visible_text(output)
    for marker in reversed(list(_ANSWER_MARKER.finditer(text))):
        rest = text[marker.end():].split("\n", 1)[0].strip()
        if text[:marker.start()].endswith("**") and rest.startswith("**"):
            rest = rest[2:].strip()
        if rest:
            return marker.start(), rest
    return None


def answer_line_start(output: str) -> int | None:
    found = _answer_line(output)
    return found[0] if found else None


def extract_answer(output: str) -> tuple[str | None, bool]:
    found = _answer_line(output)
    if found:
        return found[1], True
    numbers = _NUMBER_IN_TEXT.findall(visible_text(output))
    if numbers:
        return numbers[-1], False
    return None, False


def normalize(text: str) -> str:
    previous = None
    text = str(text)
    while text != previous:
        previous = text
        text = text.casefold().replace("−", "-")
        text = _CURRENCY.sub("", text)
        text = _THOUSANDS.sub("", text)
        text = " ".join(text.split())
        text = text.rstrip(_TRAILING_PUNCTUATION).strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in _WRAPPERS:
            text = text[1:-1].strip()
        elif text and text[0] in _WRAPPERS and text[-1] not in _WRAPPERS and text.count(text[0]) == 1:
            text = text[1:].strip()
        elif text and text[-1] in _WRAPPERS and text.count(text[-1]) == 1:
            text = text[:-1].strip()
        text = _PERCENT.sub("%", text)
        unit = _NUMBER_WITH_UNIT.fullmatch(text)
        if unit:
            text = unit.group(1)
    return text


def _list_items(normalized: str) -> list[str]:
    return [normalize(part) for part in _LIST_SEPARATOR.split(normalized) if normalize(part)]


def _item_key(item: str) -> str:
    values = _number_values(item)
    return repr(values[-1]) if values else item


def _match_one(predicted: str, expected: str) -> bool:
    p, e = normalize(predicted), normalize(expected)
    if p == e:
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


def answers_match(predicted: str, expected: str) -> bool:
    if _match_one(predicted, expected):
        return True
    return any(_match_one(predicted, alt) for alt in alternatives(expected))


def _appears_in(line: str, expected: str) -> bool:
    target = normalize(expected)
    if not target:
        return False
    text = normalize(line)
    if _number_values(target) is not None:
        return any(_numbers_match(normalize(n), target) for n in _NUMBER_IN_TEXT.findall(text))
    items = _list_items(target) if "," in target else [target]
    return all(re.search(r"(?<!\w)" + re.escape(item) + r"(?!\w)", text) for item in items)


def score_output(output: str, expected: str) -> tuple[str | None, bool, bool, bool]:
    """(extracted, has_answer_line, strict, flexible)."""
    extracted, has_answer_line = extract_answer(output)
    matches = extracted is not None and answers_match(extracted, expected)
    strict = has_answer_line and matches
    flexible = matches or (
        has_answer_line and any(_appears_in(extracted, alt) for alt in alternatives(expected))
    )
    return extracted, has_answer_line, strict, flexible
