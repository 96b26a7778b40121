"""Every read and write the job makes, addressed by URI through fsspec.

The same calls serve gs:// (gcsfs), file://, plain local paths, memory:// (tests) and any other
fsspec scheme whose package is installed (s3:// with s3fs). Storage failures come out as the job's
own errors: a missing or forbidden object is BadInput (naming the URI and the fix), never retried;
anything else that goes wrong talking to storage (connection refused or reset, timeouts, 429/5xx
after the client's own retries) is retried here too, `TUNIX_JOB_IO_RETRIES` times (default 4) with
exponential backoff from `TUNIX_JOB_IO_BACKOFF_S` seconds (default 2: 2, 4, 8, 16 s), and is
Retriable when it lasts. gcsfs itself retries a dead connection for ~34 s before giving up;
`TUNIX_JOB_IO_TIMEOUT_S` (unset by default) bounds each call instead; the three are parsed once, in
job/settings.py. A stream that breaks mid-file is reopened and continues after the last line it gave.
"""

from __future__ import annotations

import os

# gcsfs enables its zonal/HNS bucket support by default and then asks every bucket's type over
# gRPC, which hangs for 60 s per call against emulators and private endpoints; must precede import.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import contextlib
import contextvars
import dataclasses
import gzip
import hashlib
import json
import posixpath
import re
import shutil
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import fsspec.asyn

from job import logs, settings, strict_json
from job.errors import BadInput, JobError, Retriable

# Object-store reads: a readahead cache fetches whole blocks in order (the default "adaptive"
# cache starts with hundreds of 8 KiB range requests); the block size bounds memory per open file.
READ_BLOCK_SIZE = 8 * 2**20
_CHUNK = 2**20  # bytes asked of a stream per read when splitting lines or hashing
# iter_lines hands over lines up to this long; a longer one is read through and comes as a LongLine:
# no training.max_seq_len holds one, and tokenizing a 50 MB line would take minutes.
MAX_LINE_BYTES = 8 * 2**20
LONG_LINE_HEAD = 2**16  # bytes kept of a LongLine: enough to show what it is
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_LOCAL_SCHEMES = ("file", "local")
_UNBUFFERED_PROTOCOLS = {"file", "local", "memory"}


# ---------------------------------------------------------------------------------------- URIs


def scheme(uri: str) -> str | None:
    """The URI's scheme ("gs", "file", ...), or None for a plain local path."""
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else None


def is_local(uri: str) -> bool:
    """True for plain paths and file:// URIs."""
    return scheme(uri) in (None, *_LOCAL_SCHEMES)


def local_path(uri: str) -> str:
    """The absolute local path of a plain path or file:// URI."""
    if not is_local(uri):
        raise ValueError(f"{uri}: not a local path")
    path = _SCHEME.sub("", uri, count=1)
    return os.path.abspath(os.path.expanduser(path))


def join(uri: str, *parts: str) -> str:
    """Append path parts to a URI or path with "/" (the separator every supported scheme uses)."""
    pieces = [uri.rstrip("/")] + [part.strip("/") for part in parts if part.strip("/")]
    return "/".join(pieces)


def basename(uri: str) -> str:
    """The last path component ("gs://b/dir/" -> "dir")."""
    return posixpath.basename(_SCHEME.sub("", uri, count=1).rstrip("/"))


def resolve(uri: str, base_uri: str | None) -> str:
    """Resolve a relative path against the directory of the file `base_uri`.

    gs://b/dir/m.json + "data/x.jsonl" -> gs://b/dir/data/x.jsonl; a local base gives an absolute
    local path; no base resolves against the working directory. URIs with a scheme, absolute paths
    and "~/..." paths are returned as given.
    """
    if not uri or scheme(uri) is not None or os.path.isabs(uri):
        return uri
    if uri.startswith("~"):
        return os.path.expanduser(uri)
    if base_uri is None:
        return os.path.abspath(uri)
    base_scheme = scheme(base_uri)
    if base_scheme is None:
        return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(base_uri)), uri))
    if base_scheme in _LOCAL_SCHEMES:
        path = os.path.normpath(os.path.join(os.path.dirname(local_path(base_uri)), uri))
        return f"{base_scheme}://{path}"
    # scheme://bucket/key: normalise the key and never climb out of the bucket.
    prefix, rest = base_uri[: len(base_scheme) + 3], base_uri[len(base_scheme) + 3 :]
    bucket, _, key = rest.partition("/")
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(key), uri))
    if joined == ".." or joined.startswith("../"):
        raise BadInput(f"{uri}: climbs above the top of {prefix}{bucket} (relative to {base_uri}); use a full URI")
    return f"{prefix}{bucket}" if joined == "." else f"{prefix}{bucket}/{joined}"


# -------------------------------------------------------------------------------------- errors


def _http_status(exc: BaseException) -> int | None:
    # gcsfs's HttpError carries the status as .code, aiohttp's response errors as .status.
    for attr in ("code", "status"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            return value
    return None


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    try:
        import aiohttp
        from gcsfs.retry import HttpError
    except ImportError:
        return False
    return isinstance(exc, (aiohttp.ClientError, HttpError))


@contextlib.contextmanager
def _storage_errors(uri: str) -> Iterator[None]:
    """Turn storage exceptions into BadInput (the user must act) or Retriable (try again)."""
    try:
        yield
    except JobError:
        raise
    except FileNotFoundError as e:
        raise BadInput(f"{uri}: not found; check the path and that the bucket exists") from e
    except (IsADirectoryError, NotADirectoryError) as e:
        raise BadInput(f"{uri}: is a directory where a file was expected, or the reverse ({e})") from e
    except Exception as e:
        forbidden = isinstance(e, PermissionError) or _http_status(e) in (401, 403) or (
            isinstance(e, OSError) and str(e).startswith("Forbidden")
        )
        if forbidden:
            raise BadInput(
                f"{uri}: permission denied; grant the job's service account access to it "
                "(roles/storage.objectViewer to read, roles/storage.objectAdmin to write)"
            ) from e
        if _is_transient(e):
            raise Retriable(f"{uri}: storage error after retries ({type(e).__name__}: {e}); run the job again") from e
        raise


def _deadline(fs: fsspec.AbstractFileSystem) -> dict:
    """{"timeout": seconds} for one call of an async filesystem (gcsfs, s3fs) when TUNIX_JOB_IO_TIMEOUT_S
    is set: the call then fails (and is retried) instead of waiting out the client's own retries."""
    timeout = settings.current().io_timeout_s
    if timeout is None or not isinstance(fs, fsspec.asyn.AsyncFileSystem):
        return {}
    return {"timeout": timeout}


_SINGLE_ATTEMPT = contextvars.ContextVar("single_attempt", default=False)


@contextlib.contextmanager
def single_attempt() -> Iterator[None]:
    """Storage calls inside make one attempt (still with the client's own retries): for best-effort
    writes after a failure, when the storage may be what failed."""
    token = _SINGLE_ATTEMPT.set(True)
    try:
        yield
    finally:
        _SINGLE_ATTEMPT.reset(token)


def _back_off(uri: str, attempt: int, err: Retriable) -> None:
    """Log and wait before retry number `attempt + 1`; re-raise when the retries are spent."""
    current = settings.current()
    retries, backoff = current.io_retries, current.io_backoff_s
    if _SINGLE_ATTEMPT.get():
        raise err
    if attempt >= retries:
        if retries:
            raise Retriable(f"{err} (gave up after {retries + 1} attempts)") from err.__cause__
        raise err
    wait = min(backoff * 2**attempt, 60.0)
    logs.warning("storage error; retrying", uri=uri, attempt=attempt + 1, retries=retries, wait_s=wait,
                 error=str(err.__cause__ or err))
    time.sleep(wait)


def _retrying(uri: str, call: Callable[[], Any]) -> Any:
    """call() with storage errors translated, transient ones retried with backoff."""
    attempt = 0
    while True:
        try:
            with _storage_errors(uri):
                return call()
        except BadInput:
            raise
        except Retriable as err:
            _back_off(uri, attempt, err)
            attempt += 1


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as e:
        raise BadInput(f"{uri}: unsupported storage location ({e}); use gs://, file:// or a local path") from e


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def _open_read(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    if _protocols(fs) & _UNBUFFERED_PROTOCOLS:
        return fs.open(path, "rb")
    return fs.open(path, "rb", block_size=READ_BLOCK_SIZE, cache_type="readahead")


# --------------------------------------------------------------------------------------- reads


@dataclasses.dataclass(frozen=True)
class LongLine:
    """A line longer than the reader's limit, in place of its bytes: read through, never kept whole."""

    head: bytes  # its first LONG_LINE_HEAD bytes, to show where it starts
    size: int  # its length in bytes, without the line ending


class _Digest:
    """Feeds a hashlib object (or nothing) every byte exactly once, by offset in the stream: a stream
    reopened after a break is split again from its start, and bytes hashed before are skipped."""

    def __init__(self, digest: Any):
        self.digest, self.done = digest, 0

    def feed(self, offset: int, data: bytes | memoryview) -> None:
        end = offset + len(data)
        if end > self.done and self.digest is not None:
            self.digest.update(data if offset >= self.done else data[self.done - offset:])
            self.done = end


def _start_of(parts: list[bytes]) -> bytes:
    """The first LONG_LINE_HEAD bytes of the parts, without joining them all."""
    head = bytearray()
    for part in parts:
        head += part[:LONG_LINE_HEAD - len(head)]
        if len(head) == LONG_LINE_HEAD:
            break
    return bytes(head)


class _Line:
    """A line read in pieces: kept until it proves longer than `max_bytes`, then only its start."""

    def __init__(self, max_bytes: int, digest: _Digest):
        self.max_bytes, self.digest = max_bytes, digest
        self._reset()

    def _reset(self) -> None:
        self.parts: list[bytes] = []
        self.head: bytearray | None = None  # once the line is too long: its first LONG_LINE_HEAD bytes
        self.offset = self.size = 0  # where the line starts in the stream; its bytes so far
        self.last = 0  # its last byte so far (a "\r" before the "\n" belongs to the ending)

    def add(self, piece: memoryview, offset: int) -> None:
        """The next bytes of the line (no "\\n" among them), found at `offset` in the stream."""
        if not piece:
            return
        if not self.size:
            self.offset = offset
        self.digest.feed(offset, piece)
        self.size += len(piece)
        self.last = piece[-1]
        if self.head is None:
            self.parts.append(bytes(piece))
            if self.size > self.max_bytes + 1:  # too long even without a "\r" ending: keep only its start
                self.head, self.parts = bytearray(_start_of(self.parts)), []
        elif len(self.head) < LONG_LINE_HEAD:
            self.head += piece[:LONG_LINE_HEAD - len(self.head)]

    def end(self, newline: bool) -> bytes | LongLine:
        """The line without its "\\n" or "\\r\\n" (or a LongLine); the next line starts after it."""
        crlf = newline and self.last == 13  # "\r"
        size = self.size - crlf
        if newline:
            self.digest.feed(self.offset + self.size, b"\n")
        if self.head is None and size <= self.max_bytes:
            if crlf:
                self.parts[-1] = self.parts[-1][:-1]
            line: bytes | LongLine = b"".join(self.parts)
        else:
            head = self.head if self.head is not None else _start_of(self.parts)
            line = LongLine(bytes(head[:size]), size)  # [:size]: without a "\r" of its ending
        self._reset()
        return line


def _split_lines(stream: Any, max_bytes: int, digest: _Digest) -> Iterator[bytes | LongLine]:
    """Yield each line without its ending, or a LongLine for one over max_bytes: memory stays within
    max_bytes plus a few chunks whatever the line lengths. Bytes are hashed as their line is read."""
    line, base, hashing = _Line(max_bytes, digest), 0, digest.digest is not None
    while chunk := stream.read(_CHUNK):
        view, start = memoryview(chunk), 0
        while (newline := chunk.find(b"\n", start)) != -1:
            if line.size or newline - start > max_bytes:
                line.add(view[start:newline], base + start)
                yield line.end(newline=True)
            else:  # the whole line is in this chunk (the common case): only the line itself is copied
                if hashing:
                    digest.feed(base + start, view[start:newline + 1])
                yield chunk[start:newline - (newline > start and chunk[newline - 1] == 13)]
            start = newline + 1
        line.add(view[start:], base + start)
        base += len(chunk)
    if line.size:
        yield line.end(newline=False)


def _raw_lines(uri: str, raw: Any, max_bytes: int, digest: _Digest) -> Iterator[tuple[int, bytes | LongLine]]:
    stream = gzip.GzipFile(fileobj=raw, mode="rb") if uri.endswith(".gz") else raw
    lines = _split_lines(stream, max_bytes, digest)
    number = 0
    while True:
        try:
            line = next(lines)
        except StopIteration:
            return
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise BadInput(f"{uri}: not a complete gzip file after line {number} ({e}); upload it again") from e
        number += 1
        yield number, line


def iter_lines(uri: str, digest: Any = None, max_line_bytes: int = MAX_LINE_BYTES
               ) -> Iterator[tuple[int, bytes | LongLine]]:
    """Stream (1-based line number, line without its "\\n" or "\\r\\n") in bounded memory.

    A line longer than `max_line_bytes` comes as a LongLine (its start and length), read through
    without being kept. A ".gz" URI is decompressed. `digest` (a hashlib object) is updated with
    every byte read (decompressed), so afterwards it holds the hash of exactly what the caller saw.
    A transient storage error reopens the file and carries on after the last line given.
    """
    fs, path = _fs(uri)
    hashed = _Digest(digest)
    given, attempt = 0, 0
    while True:
        try:
            with _storage_errors(uri), _open_read(fs, path) as raw:
                for number, line in _raw_lines(uri, raw, max_line_bytes, hashed):
                    if number <= given:
                        continue  # given before the stream broke
                    given = number
                    yield number, line
            return
        except BadInput:
            raise
        except Retriable as err:
            _back_off(uri, attempt, err)
            attempt += 1


def read_bytes(uri: str) -> bytes:
    """The whole object (for small files: manifests, configs)."""
    fs, path = _fs(uri)
    return _retrying(uri, lambda: fs.cat_file(path, **_deadline(fs)))


def read_text(uri: str) -> str:
    """The whole object decoded as UTF-8."""
    data = read_bytes(uri)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{uri}: not UTF-8 text (byte {e.start}); save it as UTF-8") from e


def read_json(uri: str) -> Any:
    """The object parsed as strict JSON (job/strict_json.py); a syntax error names URI:line:column."""
    text = read_text(uri)
    try:
        return strict_json.loads(text)
    except strict_json.JSONError as e:
        if e.line is not None:
            raise BadInput(f"{uri}:{e.line}:{e.column}: not valid JSON ({e.reason})") from None
        raise BadInput(f"{uri}: {e.reason}") from None


def exists(uri: str) -> bool:
    """True when the object or directory exists."""
    fs, path = _fs(uri)

    def call() -> bool:
        fs.invalidate_cache(path)  # others (Orbax, other hosts) write behind gcsfs's listing cache
        return fs.exists(path, **_deadline(fs))

    return _retrying(uri, call)


def size(uri: str) -> int:
    """Size in bytes of the object."""
    fs, path = _fs(uri)
    return _retrying(uri, lambda: fs.size(path, **_deadline(fs)))


def sha256(uri: str) -> str:
    """Hex sha256 of the object's bytes, streamed."""
    fs, path = _fs(uri)

    def call() -> str:
        digest = hashlib.sha256()
        with _open_read(fs, path) as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    return _retrying(uri, call)


def fingerprint(uri: str) -> str:
    """A digest of what is at `uri` (a file, or every file under a folder) from its listing alone: each
    file's relative path, size and the store's own checksum (GCS crc32c or md5) or else its modification
    time. Cheap for a many-GB checkpoint, and it changes when any file does."""
    fs, path = _fs(uri)

    def call() -> str:
        fs.invalidate_cache(path)
        found = fs.find(path, withdirs=False, detail=True, **_deadline(fs))
        root = path.rstrip("/")
        digest = hashlib.sha256()
        for name, info in sorted(found.items()):
            stamp = next((info[k] for k in ("crc32c", "md5Hash", "ETag", "etag", "mtime", "updated") if info.get(k)), "")
            digest.update(json.dumps([name[len(root):].lstrip("/"), info.get("size"), str(stamp)]).encode("utf-8"))
        return digest.hexdigest()

    return _retrying(uri, call)


def canonical(uri: str) -> str:
    """One spelling per location, for comparing where things are: a local path made absolute with its
    links resolved ("file://" dropped), any other URI with "." and ".." resolved and repeated or
    trailing "/" removed."""
    if is_local(uri):
        return os.path.realpath(local_path(uri))
    kind = scheme(uri)
    bucket, _, key = uri[len(kind) + 3:].partition("/")
    key = posixpath.normpath("/" + key).lstrip("/") if key else ""
    return f"{kind}://{bucket}/{key}".rstrip("/")


def is_within(uri: str, folder: str) -> bool:
    """True when `uri` is `folder` or lies under it (both canonical)."""
    uri, folder = canonical(uri), canonical(folder)
    return uri == folder or uri.startswith(folder.rstrip("/") + "/")


def listdir(uri: str) -> list[str]:
    """Full URIs of the directory's entries, sorted; [] when it does not exist."""
    fs, path = _fs(uri)

    def call() -> list[str]:
        fs.invalidate_cache(path)
        try:
            return fs.ls(path, detail=False, **_deadline(fs))
        except FileNotFoundError:
            return []

    entries = _retrying(uri, call)
    if not entries:
        return []
    own = path.rstrip("/")
    names = {posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != own}
    return sorted(join(uri, name) for name in names)


def remove(uri: str, recursive: bool = False) -> None:
    """Delete a file (or a tree with recursive=True); nothing happens when it is missing."""
    fs, path = _fs(uri)

    def call() -> None:
        try:
            fs.rm(path, recursive=recursive, **_deadline(fs))
        except FileNotFoundError:
            pass

    _retrying(uri, call)


# -------------------------------------------------------------------------------------- writes


def write_bytes(uri: str, data: bytes) -> None:
    """Write the object atomically: readers see the old content or the new, never a part."""
    if is_local(uri):
        path = local_path(uri)
        parent = os.path.dirname(path)
        with _storage_errors(uri):
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        return
    # One object upload only becomes visible when complete, so it is atomic already.
    fs, path = _fs(uri)
    _retrying(uri, lambda: fs.pipe_file(path, data, **_deadline(fs)))


def write_text(uri: str, text: str) -> None:
    """Write UTF-8 text atomically."""
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    """Write JSON (indent=2, trailing newline) atomically."""
    write_text(uri, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------ copying trees


def _tree(fs: fsspec.AbstractFileSystem, path: str) -> list[str] | None:
    """Relative paths of every file under a directory, or None when `path` is a file."""
    if not fs.isdir(path, **_deadline(fs)):
        if not fs.exists(path, **_deadline(fs)):
            raise FileNotFoundError(path)
        return None
    root = path.rstrip("/")
    return sorted(posixpath.relpath(f, root) for f in fs.find(root, **_deadline(fs)))


def download(uri: str, local_dir: str) -> str:
    """Copy a file or directory tree into local_dir; returns local_dir/<its name>."""
    fs, path = _fs(uri)
    target = os.path.join(local_path(local_dir), basename(uri))
    _retrying(uri, lambda: _download(fs, path, target))
    return target


def _download(fs: fsspec.AbstractFileSystem, path: str, target: str) -> None:
    fs.invalidate_cache(path)
    files = _tree(fs, path)
    if files is None:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(path, target, **_deadline(fs))
        return
    os.makedirs(target, exist_ok=True)
    sources = [posixpath.join(path.rstrip("/"), f) for f in files]
    targets = [os.path.join(target, *f.split("/")) for f in files]
    for t in targets:
        os.makedirs(os.path.dirname(t), exist_ok=True)
    if sources:
        fs.get(sources, targets, **_deadline(fs))  # one call: gcsfs fetches the files concurrently


def _make_parents(fs: fsspec.AbstractFileSystem, paths: list[str]) -> None:
    # Local and memory filesystems need folders; on buckets gcsfs's makedirs would create a
    # missing (perhaps misspelt) bucket instead of failing, so it is never called there.
    if _protocols(fs) & _UNBUFFERED_PROTOCOLS:
        for parent in sorted({posixpath.dirname(p) for p in paths}):
            fs.makedirs(parent, exist_ok=True)


def upload(local: str, uri: str) -> None:
    """Copy a local file to the object `uri`, or a local directory tree to the prefix `uri`."""
    source = local_path(local)
    fs, path = _fs(uri)
    if not os.path.exists(source):
        raise BadInput(f"{local}: not found")
    if not os.path.isdir(source):
        sources, targets = [source], [path]
    else:
        sources, targets = [], []
        for root, _, names in os.walk(source):
            for name in sorted(names):
                full = os.path.join(root, name)
                sources.append(full)
                targets.append(posixpath.join(path.rstrip("/"), os.path.relpath(full, source).replace(os.sep, "/")))

    def call() -> None:
        _make_parents(fs, targets)
        if sources:
            fs.put(sources, targets, **_deadline(fs))

    _retrying(uri, call)


def fetch_to_cache(uri: str, cache_root: str) -> str:
    """A local path for `uri`: itself when local, else a copy downloaded once under cache_root.

    The copy lives in cache_root/<first 16 hex of sha256(uri)>/<name>. It is downloaded into a
    temporary folder and renamed into place, so an interrupted download is never reused.
    """
    if is_local(uri):
        return local_path(uri)
    root = local_path(cache_root)
    final = os.path.join(root, hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16])
    target = os.path.join(final, basename(uri))
    if os.path.exists(target):
        return target
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=".partial-")
    try:
        download(uri, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.exists(target):  # not a concurrent fetch that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
