"""Tests for job.io: the same calls on local paths, file://, memory:// and a real GCS-protocol server."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from job import io
from job.errors import BadInput


@pytest.fixture(params=["local", "file", "memory", "gs"])
def store(request, tmp_path):
    """A writable, empty root URI in each kind of storage."""
    if request.param == "local":
        yield str(tmp_path / "root")
    elif request.param == "file":
        yield f"file://{tmp_path}/root"
    elif request.param == "memory":
        root = f"memory://t-{uuid.uuid4().hex[:8]}"
        yield root
        io.remove(root, recursive=True)
    else:
        yield request.getfixturevalue("gcs_bucket")


def test_round_trips(store):
    io.write_bytes(io.join(store, "b.bin"), b"\x00\xffbytes")
    io.write_text(io.join(store, "t.txt"), "héllo\n")
    io.write_json(io.join(store, "sub", "j.json"), {"a": [1, 2], "b": "é"})

    assert io.read_bytes(io.join(store, "b.bin")) == b"\x00\xffbytes"
    assert io.read_text(io.join(store, "t.txt")) == "héllo\n"
    assert io.read_json(io.join(store, "sub/j.json")) == {"a": [1, 2], "b": "é"}
    assert io.read_text(io.join(store, "sub/j.json")).endswith("}\n")
    assert '\n  "a": [' in io.read_text(io.join(store, "sub/j.json"))

    assert io.exists(io.join(store, "t.txt"))
    assert not io.exists(io.join(store, "nope.txt"))
    assert io.size(io.join(store, "t.txt")) == len("héllo\n".encode())
    assert io.sha256(io.join(store, "b.bin")) == hashlib.sha256(b"\x00\xffbytes").hexdigest()
    assert io.listdir(store) == [io.join(store, n) for n in ("b.bin", "sub", "t.txt")]
    assert io.listdir(io.join(store, "missing")) == []

    io.write_text(io.join(store, "t.txt"), "replaced")
    assert io.read_text(io.join(store, "t.txt")) == "replaced"

    io.remove(io.join(store, "t.txt"))
    io.remove(io.join(store, "t.txt"))  # already gone: no error
    io.remove(io.join(store, "sub"), recursive=True)
    assert io.listdir(store) == [io.join(store, "b.bin")]


def test_iter_lines_crlf_gz_and_digest(store):
    content = b'{"a": 1}\r\n{"b": 2}\n\nlast line without newline'
    io.write_bytes(io.join(store, "d.jsonl"), content)
    io.write_bytes(io.join(store, "d.jsonl.gz"), gzip.compress(content))
    expected = [(1, b'{"a": 1}'), (2, b'{"b": 2}'), (3, b""), (4, b"last line without newline")]
    for name in ("d.jsonl", "d.jsonl.gz"):
        digest = hashlib.sha256()
        assert list(io.iter_lines(io.join(store, name), digest)) == expected
        assert digest.hexdigest() == hashlib.sha256(content).hexdigest()


def test_iter_lines_keeps_lone_carriage_returns(tmp_path):
    path = tmp_path / "cr.txt"
    path.write_bytes(b"a\r\r\nb\rc\n")
    assert list(io.iter_lines(str(path))) == [(1, b"a\r"), (2, b"b\rc")]


class _Trickle:
    """A stream that hands out at most `step` bytes per read: every way a line can straddle chunks."""

    def __init__(self, data: bytes, step: int):
        self.data, self.step, self.at = data, step, 0

    def read(self, n: int) -> bytes:
        piece = self.data[self.at:self.at + min(n, self.step)]
        self.at += len(piece)
        return piece


def _expected_lines(content: bytes, max_bytes: int) -> list:
    """What iter_lines must give for `content`: lines without "\\n"/"\\r\\n", long ones as their size."""
    pieces = content.split(b"\n")
    if pieces[-1] == b"":
        pieces.pop()
    ended = content.endswith(b"\n")
    expected = []
    for k, piece in enumerate(pieces):
        if (k < len(pieces) - 1 or ended) and piece.endswith(b"\r"):
            piece = piece[:-1]
        expected.append(piece if len(piece) <= max_bytes else ("long", len(piece), piece[:io.LONG_LINE_HEAD]))
    return expected


def _seen(line) -> object:
    return ("long", line.size, line.head) if isinstance(line, io.LongLine) else line


LINES = st.lists(st.tuples(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), st.sampled_from([b"\n", b"\r\n", b"\r"])),
                 max_size=8)


@settings(max_examples=300, deadline=None)
@given(LINES, st.booleans(), st.integers(1, 9), st.integers(0, 20))
def test_split_lines_matches_a_plain_split_for_any_chunking(lines, ended, step, max_bytes):
    content = b"".join(text + end for text, end in lines)
    if not ended and content.endswith(b"\n"):
        content += b"tail"
    digest = hashlib.sha256()
    got = list(io._split_lines(_Trickle(content, step), max_bytes, io._Digest(digest)))
    assert [_seen(line) for line in got] == _expected_lines(content, max_bytes)
    assert digest.hexdigest() == hashlib.sha256(content).hexdigest()


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz"])
def test_a_line_over_the_limit_comes_as_its_start_and_size_and_numbering_goes_on(store, name):
    long = b'{"id": "x", "text": "' + b"y" * 5000 + b'"}'
    content = b'{"a": 1}\n' + long + b"\r\n" + b"z" * 101 + b"\n" + b"z" * 100 + b"\r\n" + b'{"b": 2}'
    uri = io.join(store, name)
    io.write_bytes(uri, gzip.compress(content) if name.endswith(".gz") else content)
    digest = hashlib.sha256()
    got = list(io.iter_lines(uri, digest, max_line_bytes=100))
    assert got == [(1, b'{"a": 1}'), (2, io.LongLine(long[:io.LONG_LINE_HEAD], len(long))),
                   (3, io.LongLine(b"z" * 101, 101)), (4, b"z" * 100), (5, b'{"b": 2}')]
    assert digest.hexdigest() == hashlib.sha256(content).hexdigest()


class _BreaksAt:
    """A file opened for reading that fails with a connection reset after `limit` bytes (None: never)."""

    def __init__(self, stream, limit: int | None):
        self.stream, self.limit, self.given = stream, limit, 0

    def read(self, n: int) -> bytes:
        if self.limit is not None:
            if self.given >= self.limit:
                raise ConnectionResetError("reset by peer")
            n = min(n, self.limit - self.given)
        chunk = self.stream.read(n)
        self.given += len(chunk)
        return chunk

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stream.close()


def test_a_stream_broken_inside_a_long_line_is_hashed_once(tmp_path, monkeypatch):
    content = b"short\n" + b"L" * 3000 + b"\nafter\n"
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    opened = []
    real_open = io._open_read

    def open_read(fs, p):
        opened.append(p)
        return _BreaksAt(real_open(fs, p), 2000 if len(opened) == 1 else None)  # inside the long line

    monkeypatch.setattr(io, "_open_read", open_read)
    monkeypatch.setattr(io.time, "sleep", lambda s: None)
    monkeypatch.setattr(io, "_CHUNK", 512)
    digest = hashlib.sha256()
    got = list(io.iter_lines(str(path), digest, max_line_bytes=1000))
    assert len(opened) == 2
    assert got == [(1, b"short"), (2, io.LongLine(b"L" * 3000, 3000)), (3, b"after")]
    assert digest.hexdigest() == hashlib.sha256(content).hexdigest()


# Reads a file holding a 100 MiB and a 300 MiB line among short ones, through the line reader and
# the dataset reader, and reports the peak RSS growth while doing it (the peak reset after imports).
# (VmHWM, not getrusage's ru_maxrss: that one also holds the peak of the process that forked the probe.)
_LONG_LINES_PROBE = r"""
import json, sys, time
from job import formats, io

def peak():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak becomes the current RSS
    return peak()

path = sys.argv[1]
base = reset_peak()
started = time.perf_counter()
lines = [(n, line.size if isinstance(line, io.LongLine) else len(line)) for n, line in io.iter_lines(path)]
records = [(r.line, getattr(r, "reason", None), len(getattr(r, "raw", ""))) for r in formats.read_examples(path, "trace")]
print(json.dumps({"growth": peak() - base, "seconds": time.perf_counter() - started,
                  "lines": lines, "records": records}))
"""


def test_long_lines_are_rejected_in_bounded_memory(tmp_path, capsys):
    short = json.dumps({"id": "s", "prompts": "What is 2 + 2?", "trace_steps": ["2 + 2 = 4"], "final_answer": "4"})
    path = tmp_path / "long.jsonl"
    sizes = {2: 100 * 2**20, 4: 300 * 2**20}
    with open(path, "wb") as f:  # the long lines' middles are holes: written in no time, read as zeros
        for number in range(1, 6):
            if number in sizes:
                start = b'{"id": "long", "prompts": "'
                f.write(start)
                f.seek(sizes[number] - len(start) - 2, os.SEEK_CUR)
                f.write(b'"}\n')
            else:
                f.write(short.encode() + b"\n")
    probe = subprocess.run([sys.executable, "-c", _LONG_LINES_PROBE, str(path)], capture_output=True, text=True,
                           timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout)
    with capsys.disabled():
        print(f"\nread 400 MiB with a 100 MiB and a 300 MiB line twice in {seen['seconds']:.1f} s; "
              f"peak RSS growth {seen['growth'] / 2**20:.1f} MiB")
    assert seen["lines"] == [[1, len(short)], [2, sizes[2]], [3, len(short)], [4, sizes[4]], [5, len(short)]]
    rejects = {line: (reason, raw) for line, reason, raw in seen["records"] if reason}
    assert sorted(rejects) == [2, 4] and [line for line, _, _ in seen["records"]] == [1, 2, 3, 4, 5]
    assert f"the line is {sizes[4]:,} bytes long" in rejects[4][0]
    assert 0 < rejects[4][1] <= 10_000 + len("...[truncated]")
    assert seen["growth"] <= 32 * 2**20


def test_truncated_gzip_is_bad_input(store):
    uri = io.join(store, "cut.jsonl.gz")
    whole = gzip.compress(b"".join(b'{"i": %d}\n' % i for i in range(20000)))
    io.write_bytes(uri, whole[: len(whole) // 2])
    with pytest.raises(BadInput, match="cut.jsonl.gz: not a complete gzip file"):
        for _ in io.iter_lines(uri):
            pass


def test_missing_object_is_bad_input(store):
    uri = io.join(store, "absent.jsonl")
    for call in (io.read_bytes, io.size, io.sha256, lambda u: list(io.iter_lines(u))):
        with pytest.raises(BadInput, match=f"^{uri}: not found"):
            call(uri)
    with pytest.raises(BadInput, match="absent.jsonl: not found"):
        io.download(uri, "unused")


def test_missing_bucket_is_bad_input(gcs_server):
    uri = f"gs://no-such-bucket-{uuid.uuid4().hex[:8]}/data.jsonl"
    with pytest.raises(BadInput, match=f"^{uri}: not found"):
        io.read_text(uri)
    with pytest.raises(BadInput, match=f"^{uri}: not found"):
        io.write_text(uri, "x")  # must not create the bucket
    assert not io.exists(uri)


class _Forbidden(http.server.BaseHTTPRequestHandler):
    def _deny(self):
        body = json.dumps({"error": {"code": 403, "message": "caller lacks storage.objects.get"}}).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _deny

    def log_message(self, *args):
        pass


def test_forbidden_is_bad_input_saying_grant_access(gcs_server, monkeypatch):
    import gcsfs

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_address[1]}")
    gcsfs.GCSFileSystem.clear_instance_cache()
    try:
        with pytest.raises(BadInput, match=r"^gs://locked/x.json: permission denied; grant"):
            io.read_json("gs://locked/x.json")
        with pytest.raises(BadInput, match="permission denied"):
            list(io.iter_lines("gs://locked/x.jsonl"))
    finally:
        server.shutdown()
        gcsfs.GCSFileSystem.clear_instance_cache()


def test_bad_json_names_line_and_column(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{\n  "a": 1,\n  "b": }\n')
    with pytest.raises(BadInput, match=rf"^{path}:3:8: not valid JSON"):
        io.read_json(str(path))


def test_unknown_scheme_is_bad_input():
    with pytest.raises(BadInput, match="nosuch://x: unsupported storage location"):
        io.read_bytes("nosuch://x")


def test_local_writes_are_atomic(tmp_path):
    target = tmp_path / "deep" / "dir" / "out.json"
    io.write_json(str(target), {"v": 1})  # creates the parent folders
    assert json.loads(target.read_text()) == {"v": 1}
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~_umask()

    class Exploding:  # the write fails after the temp file was opened
        def __len__(self):
            return 1

    with pytest.raises(TypeError):
        io.write_bytes(str(target), Exploding())
    assert json.loads(target.read_text()) == {"v": 1}, "a failed write must leave the old content"
    assert os.listdir(target.parent) == ["out.json"], "no temp file may be left behind"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    ("uri", "base", "expected"),
    [
        ("data/x.jsonl", "gs://b/dir/m.json", "gs://b/dir/data/x.jsonl"),
        ("../x.jsonl", "gs://b/dir/sub/m.json", "gs://b/dir/x.jsonl"),
        ("./a/../x.jsonl", "gs://b/m.json", "gs://b/x.jsonl"),
        ("x.jsonl", "/abs/dir/m.json", "/abs/dir/x.jsonl"),
        ("../x.jsonl", "/abs/dir/m.json", "/abs/x.jsonl"),
        ("x.jsonl", "file:///abs/dir/m.json", "file:///abs/dir/x.jsonl"),
        ("x.jsonl", "memory://t/m.json", "memory://t/x.jsonl"),
        ("gs://other/y.jsonl", "gs://b/dir/m.json", "gs://other/y.jsonl"),
        ("/abs/y.jsonl", "gs://b/dir/m.json", "/abs/y.jsonl"),
        ("file:///abs/y", "/base/m.json", "file:///abs/y"),
    ],
)
def test_resolve(uri, base, expected):
    assert io.resolve(uri, base) == expected


def test_resolve_relative_base_and_no_base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert io.resolve("d/x.jsonl", "manifests/m.json") == str(tmp_path / "manifests" / "d" / "x.jsonl")
    assert io.resolve("x.jsonl", None) == str(tmp_path / "x.jsonl")


def test_resolve_refuses_to_leave_the_bucket():
    with pytest.raises(BadInput, match="climbs above the top of gs://b"):
        io.resolve("../../x", "gs://b/dir/m.json")


def test_join_and_local_paths(tmp_path, monkeypatch):
    assert io.join("gs://b/", "dir/", "/f.json") == "gs://b/dir/f.json"
    assert io.join("/tmp/x", "y") == "/tmp/x/y"
    assert io.is_local("/a") and io.is_local("rel/a") and io.is_local("file:///a")
    assert not io.is_local("gs://b/a") and not io.is_local("memory://a")
    assert io.local_path("file:///a/b") == "/a/b"
    monkeypatch.chdir(tmp_path)
    assert io.local_path("rel") == str(tmp_path / "rel")


def _make_tree(root):
    io.write_text(io.join(root, "config.json"), "{}")
    io.write_bytes(io.join(root, "params", "shard-0"), b"\x01" * 1000)
    io.write_bytes(io.join(root, "params", "deeper", "shard-1"), b"\x02" * 10)


def _read_tree(local):
    found = {}
    for folder, _, names in os.walk(local):
        for name in names:
            full = os.path.join(folder, name)
            found[os.path.relpath(full, local)] = open(full, "rb").read()
    return found


def test_download_and_upload_trees(store, tmp_path):
    src = io.join(store, "ckpt")
    _make_tree(src)
    local = io.download(src, str(tmp_path / "dl"))
    assert local == str(tmp_path / "dl" / "ckpt")
    tree = _read_tree(local)
    assert tree == {"config.json": b"{}", "params/shard-0": b"\x01" * 1000, "params/deeper/shard-1": b"\x02" * 10}
    assert open(io.download(io.join(src, "config.json"), str(tmp_path / "one")), "rb").read() == b"{}"

    io.upload(local, io.join(store, "copy"))
    io.upload(os.path.join(local, "config.json"), io.join(store, "single", "c.json"))
    assert _read_tree(io.download(io.join(store, "copy"), str(tmp_path / "dl2"))) == tree
    assert io.read_text(io.join(store, "single", "c.json")) == "{}"


def test_fetch_to_cache_downloads_once(gcs_bucket, tmp_path):
    cache = str(tmp_path / "cache")
    _make_tree(io.join(gcs_bucket, "weights"))
    io.write_text(io.join(gcs_bucket, "tok.model"), "spm")

    first = io.fetch_to_cache(io.join(gcs_bucket, "weights"), cache)
    single = io.fetch_to_cache(io.join(gcs_bucket, "tok.model"), cache)
    assert os.path.basename(first) == "weights" and os.path.dirname(os.path.dirname(first)) == cache
    assert open(os.path.join(first, "params", "shard-0"), "rb").read() == b"\x01" * 1000
    assert open(single).read() == "spm"

    io.remove(io.join(gcs_bucket, "weights"), recursive=True)  # a second fetch must not need the bucket
    assert io.fetch_to_cache(io.join(gcs_bucket, "weights"), cache) == first
    assert sorted(os.listdir(cache)) == sorted({os.path.basename(os.path.dirname(p)) for p in (first, single)})

    local = tmp_path / "here.model"
    local.write_text("x")
    assert io.fetch_to_cache(f"file://{local}", cache) == str(local)
    assert io.fetch_to_cache(str(local), cache) == str(local)


# Streams a GCS object in a fresh interpreter and reports its peak RSS above the level reached after
# imports (VmHWM reset through clear_refs), then does the same for a whole-object read as a control.
_PROBE = r"""
import json, sys, time
from job import io

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")

uri = sys.argv[1]
io.exists(uri)  # connect and import everything first
base = reset_peak()
start = time.perf_counter()
lines = sum(1 for _ in io.iter_lines(uri))
seconds = time.perf_counter() - start
stream_growth = status("VmHWM") - base
base = reset_peak()
whole = len(io.read_bytes(uri))
print(json.dumps({"lines": lines, "seconds": seconds, "stream_growth": stream_growth,
                  "read_all_growth": status("VmHWM") - base, "bytes": whole}))
"""


def test_iter_lines_memory_stays_flat_on_gcs(gcs_bucket, capsys):
    line = (json.dumps({"id": "x" * 20, "text": "y" * 400}) + "\n").encode()
    count = 100 * 2**20 // len(line)
    uri = io.join(gcs_bucket, "big.jsonl")
    io.write_bytes(uri, line * count)

    probe = subprocess.run(
        [sys.executable, "-c", _PROBE, uri], capture_output=True, text=True, timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout)
    mib = 2**20
    with capsys.disabled():
        print(
            f"\nstreamed {seen['bytes'] / mib:.0f} MiB in {seen['seconds']:.2f} s "
            f"({seen['bytes'] / mib / seen['seconds']:.0f} MiB/s), peak RSS growth "
            f"{seen['stream_growth'] / mib:.1f} MiB (whole read: {seen['read_all_growth'] / mib:.0f} MiB)"
        )
    assert seen["lines"] == count
    assert seen["read_all_growth"] > 90 * mib, "the probe must see a whole-object read"
    assert seen["stream_growth"] < 60 * mib
