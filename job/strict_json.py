"""The one JSON reader for everything the job reads from outside: manifests, `--set` values, data,
eval and prediction lines, weight headers.

Python's json module takes more than JSON and less than the job can use: a repeated key keeps the
last value silently, NaN and Infinity are read, a 5,000-digit number raises a ValueError of its own
and a 400-digit float becomes inf, "\\ud800" gives a string that cannot be written back as UTF-8,
and deep nesting raises RecursionError. `loads` refuses each of these with a JSONError that says
where (a path such as `training.steps` or `steps[2].i`). Keys starting with "//" are comments (the
manifest drops them, nothing reads them) and may repeat.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 64  # objects and arrays inside each other; records and manifests need 4
MAX_NUMBER_CHARS = 100  # characters of one number as written; longer ones belong in a string
COMMENT_PREFIX = "//"
_SURROGATE = re.compile("[\ud800-\udfff]")


class JSONError(ValueError):
    """Text that is not JSON the job reads. `line`/`column` locate a syntax error (None otherwise)."""

    def __init__(self, reason: str, line: int | None = None, column: int | None = None):
        super().__init__(reason)
        self.reason, self.line, self.column = reason, line, column


class _Refused:
    """A value the parser met but the job refuses, reported with its path once parsing is done."""

    def __init__(self, reason: str):
        self.reason = reason


class _RepeatedKey(dict):
    """An object in which `key` appears more than once."""

    key: str


def _number(text: str, convert: type) -> Any:
    if len(text) > MAX_NUMBER_CHARS:
        return _Refused(f"a number of {len(text):,} characters; numbers may have at most {MAX_NUMBER_CHARS}")
    value = convert(text)
    if isinstance(value, float) and math.isinf(value):
        return _Refused(f"the number {text[:20]} is beyond the range of a float")
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict:
    result = dict(pairs)
    if len(result) == len(pairs):
        return result
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen and not key.startswith(COMMENT_PREFIX):
            repeated = _RepeatedKey(result)
            repeated.key = key
            return repeated
        seen.add(key)
    return result


_DECODER = json.JSONDecoder(
    object_pairs_hook=_object,
    parse_int=lambda text: _number(text, int),
    parse_float=lambda text: _number(text, float),
    parse_constant=lambda name: _Refused(f"{name} is not a JSON number"),
)


def path_text(path: tuple[str | int, ...]) -> str:
    """`training.steps`, `steps[2].i` ("" for the document itself)."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")


def _at(path: tuple[str | int, ...], reason: str) -> JSONError:
    return JSONError(f"{path_text(path)}: {reason}" if path else reason)


def _surrogate(text: str, what: str = "a string") -> str | None:
    """Why `text` cannot be written as UTF-8, or None."""
    found = _SURROGATE.search(text)
    if found is None:
        return None
    return (f"{what} holds a lone UTF-16 surrogate (\\u{ord(found.group()):04x}), which is not a character; "
            "write valid Unicode text")


def _check_tree(value: Any, strings: bool) -> None:
    """Raise JSONError for the first refused value, repeated key, too-deep nesting or (with `strings`)
    lone surrogate, in document order; iterative, so no depth of input can exhaust the stack."""
    pending: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while pending:
        node, path = pending.pop()
        if isinstance(node, _Refused):
            raise _at(path, node.reason)
        if isinstance(node, str):
            if reason := _surrogate(node):
                raise _at(path, reason)
            continue
        if not isinstance(node, (dict, list)):
            continue
        if len(path) >= MAX_DEPTH:
            raise JSONError(f"nested too deeply (more than {MAX_DEPTH} levels)")
        if isinstance(node, _RepeatedKey):
            raise JSONError(f"duplicate key {path_text((*path, node.key))!r}; keep one of its values")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        children = []
        for key, item in items:
            if strings and isinstance(key, str) and (reason := _surrogate(key, "a key")):
                raise _at(path, reason)
            if isinstance(item, (dict, list, _Refused)) or (strings and isinstance(item, str)):
                children.append((item, (*path, key)))  # plain leaves need no look (and no path)
        pending.extend(reversed(children))


def loads(text: str) -> Any:
    """Parse one JSON document strictly; JSONError says what is wrong and where."""
    if reason := _surrogate(text, "the text"):  # only text that was not UTF-8 (a command-line argument) holds one
        raise JSONError(reason)
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as e:
        raise JSONError(e.msg, e.lineno, e.colno) from None
    except RecursionError:  # "[[[[...": the parser recurses per level, before any depth check can run
        raise JSONError(f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    # A surrogate can only come from a "\\u" escape once the text itself holds none.
    _check_tree(value, strings="\\u" in text)
    return value
