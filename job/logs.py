"""Log lines a person or a log collector can read.

On a terminal: short human lines. Elsewhere (a container, a Kubernetes pod): one JSON object per
line with a `severity` field, which Cloud Logging parses into structured entries. Everything goes
to stderr so that stdout stays free for command output (render, score, schema), which `output` writes.

Nothing secret is logged: `redact` removes the password part of URIs (`user:pass@`), the values of
signed-URL and token query parameters (`X-Goog-Signature`, `X-Amz-Signature`, `token`, ...) and the
value of any environment variable whose name says it is secret (a word of the name is TOKEN,
SECRET, PASSWORD, PWD, CREDENTIALS, ... or API/ACCESS/PRIVATE/SECRET KEY; `is_secret_name`)
wherever it appears. It is the one redaction for every channel: log lines, command output
(`output`) and every text file the job writes in a run directory (rundir.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Any

from job.provenance import utc_now

REDACTED = "REDACTED"
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#@\s\"']+)@")
_SECRET_PARAMS = re.compile(
    r"(?P<key>[?&;](?:x-goog-signature|x-goog-credential|x-amz-signature|x-amz-credential|x-amz-security-token"
    r"|signature|sig|token|access_token|id_token|refresh_token|api_key|apikey|key|password|passwd|secret"
    r"|client_secret|code|auth)=)(?P<value>[^&#\s\"']*)", re.IGNORECASE)
# A variable holds a secret when a word of its name says so (words: split at "_", "-", "." and
# lower-to-upper case changes): DB_PASSWORD, BACKEND_API_TOKEN, awsSecretAccessKey. Matching whole
# words, not substrings, keeps KEYBOARD, AUTHOR, MONKEY or TOKENIZER_URI out.
_SECRET_WORDS = {"TOKEN", "TOKENS", "SECRET", "SECRETS", "PASSWORD", "PASSWD", "PASS", "PWD", "PASSPHRASE",
                 "CREDENTIAL", "CREDENTIALS", "APIKEY", "SIGNATURE", "AUTH", "PRIVATE", "COOKIE"}
_SECRET_KEY_PREFIXES = {"API", "ACCESS", "PRIVATE", "SECRET", "SIGNING", "ENCRYPTION", "MASTER", "LICENSE", "SSH"}
# POSIX shell variables that name directories, whatever their name looks like (PWD is "print working directory").
_NOT_SECRET = {"PWD", "OLDPWD"}
_NAME_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z0-9]+(?![a-z])")
_MIN_SECRET_LEN = 8  # shorter values ("1", "true", "dummy") would redact ordinary words


def is_secret_name(name: str) -> bool:
    """True when an environment variable's name says it holds a credential."""
    if name.upper() in _NOT_SECRET:
        return False
    words = [w.upper() for w in _NAME_WORD.findall(name)]
    return any(w in _SECRET_WORDS for w in words) or any(
        w == "KEY" and k > 0 and words[k - 1] in _SECRET_KEY_PREFIXES for k, w in enumerate(words))


def _secret_env_values() -> list[str]:
    values = {v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact(value: Any) -> Any:
    """`value` (a string, or lists/dicts of them) with credentials replaced by REDACTED."""
    if isinstance(value, str):
        text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", value)
        text = _SECRET_PARAMS.sub(lambda m: f"{m['key']}{REDACTED}", text)
        for secret in _secret_env_values():
            text = text.replace(secret, REDACTED)
        return text
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def log(message: str, severity: str = "INFO", **fields) -> None:
    stream = sys.stderr
    message, fields = redact(message), {k: redact(v) if isinstance(v, (str, list, dict)) else v
                                        for k, v in fields.items()}
    if stream.isatty():
        extra = " ".join(f"{k}={_short(v)}" for k, v in fields.items())
        print(redact(f"{severity[0]} {message}" + (f"  {extra}" if extra else "")), file=stream, flush=True)
    else:
        record = {"severity": severity, "message": message, "time": utc_now("milliseconds"), **fields}
        print(redact(json.dumps(record, default=str)), file=stream, flush=True)


def output(obj: Any, indent: int | None = None, ensure_ascii: bool = True) -> None:
    """Command output (validate's report, render's and score's lines): one JSON document on stdout,
    credentials redacted as in every log line and every file the job writes."""
    print(redact(json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii)), flush=True)


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


class _LibraryHandler(logging.Handler):
    """Library log records (gcsfs, asyncio, Orbax, absl...) as this module's lines: redacted, and an
    exception as one `error` field rather than a multi-line traceback."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a library's malformed format arguments
            message = str(record.msg)
        fields = {"logger": record.name}
        if record.exc_info and record.exc_info[1] is not None:
            fields["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        severity = {"CRITICAL": "CRITICAL", "ERROR": "ERROR", "WARNING": "WARNING"}.get(record.levelname, "INFO")
        if record.name == "asyncio" and "exception was never retrieved" in message:
            # A storage call the retry layer gave up on leaves its task behind; asyncio reports it when the
            # task is collected, often after the run's own final error, which must stay the last ERROR.
            severity = "WARNING"
        log(message, severity, **fields)


def capture_library_logs(level: int = logging.WARNING) -> None:
    """Route Python logging (which libraries use) through `log`, at `level` and above."""
    root = logging.getLogger()
    if not any(isinstance(h, _LibraryHandler) for h in root.handlers):
        root.addHandler(_LibraryHandler())
    root.setLevel(level)
