"""Log lines a person or a log collector can read.

On a terminal: short human lines. Elsewhere (a container, a Kubernetes pod): one JSON object per
line with a `severity` field, which Cloud Logging parses into structured entries. Everything goes
to stderr so that stdout stays free for command output (render, score, schema).
"""

from __future__ import annotations

import datetime
import json
import sys


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def log(message: str, severity: str = "INFO", **fields) -> None:
    stream = sys.stderr
    if stream.isatty():
        extra = " ".join(f"{k}={_short(v)}" for k, v in fields.items())
        print(f"{severity[0]} {message}" + (f"  {extra}" if extra else ""), file=stream, flush=True)
    else:
        record = {"severity": severity, "message": message, "time": _now(), **fields}
        print(json.dumps(record, default=str), file=stream, flush=True)


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def info(message: str, **fields) -> None:
    log(message, "INFO", **fields)


def warning(message: str, **fields) -> None:
    log(message, "WARNING", **fields)


def error(message: str, **fields) -> None:
    log(message, "ERROR", **fields)
