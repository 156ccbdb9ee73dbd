"""pipeline.download against a real HTTP server on 127.0.0.1 that can be told to misbehave.

No mocking of requests: every test goes through sockets, so resume, retry and checksum
handling are exercised the way they run against the real mirror.
"""

from __future__ import annotations

import hashlib
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline import download as download_module
from pipeline.download import download
from pipeline.errors import PipelineError

PAYLOAD = random.Random(20).randbytes(300_000)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
WRONG_SHA256 = "0" * 64


@dataclass
class ServerState:
    """What the server serves, how it misbehaves, and the requests it has seen."""

    payload: bytes = PAYLOAD
    fail_first: int = 0  # answer the first N requests with fail_status
    fail_status: int = 503
    truncate_first: int | None = None  # first request: send full Content-Length, K bytes, close
    stall_first: float = 0.0  # first request: wait this long before answering
    ignore_range: bool = False  # always answer 200 with the whole payload
    not_found: bool = False  # always answer 404
    requests: list[dict[str, str]] = field(default_factory=list)  # lower-cased headers
    lock: threading.Lock = field(default_factory=threading.Lock)


class Handler(BaseHTTPRequestHandler):
    """GET with single byte-range support (206 / 416) and the misbehaviours above."""

    server: _Server

    def do_GET(self) -> None:
        state = self.server.state
        with state.lock:
            state.requests.append({k.lower(): v for k, v in self.headers.items()})
            number = len(state.requests)
        if number == 1 and state.stall_first:
            time.sleep(state.stall_first)
        if state.not_found:
            self._empty(404)
            return
        if number <= state.fail_first:
            self._empty(state.fail_status)
            return

        size = len(state.payload)
        status, start, end = 200, 0, size - 1
        range_header = self.headers.get("Range")
        if range_header and not state.ignore_range:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header)
            assert match, f"client sent an unexpected Range header {range_header!r}"
            start = int(match[1])
            end = min(int(match[2]), size - 1) if match[2] else size - 1
            if start >= size:
                self._empty(416, {"Content-Range": f"bytes */{size}"})
                return
            status = 206
        body = state.payload[start : end + 1]

        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if number == 1 and state.truncate_first is not None:
            body = body[: state.truncate_first]
            self.close_connection = True
        self.wfile.write(body)

    def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    state: ServerState

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the client hanging up on a stalled response is part of some tests


@dataclass
class LocalServer:
    url: str
    state: ServerState


@pytest.fixture
def server() -> Iterator[LocalServer]:
    httpd = _Server(("127.0.0.1", 0), Handler)
    httpd.state = ServerState()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        host, port = httpd.server_address[:2]
        yield LocalServer(url=f"http://{host}:{port}/20news-bydate.tar.gz", state=httpd.state)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def fetch(server: LocalServer, dest: Path, sha256: str = PAYLOAD_SHA256, **kwargs: object) -> Path:
    options: dict[str, object] = {"retries": 5, "timeout": 5.0, "backoff": 0, "progress": False}
    options.update(kwargs)
    return download(server.url, dest, sha256, **options)  # type: ignore[arg-type]


def part_of(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def test_plain_download_writes_verified_file(server: LocalServer, tmp_path: Path) -> None:
    dest = tmp_path / "raw" / "archive.tar.gz"
    assert fetch(server, dest) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not part_of(dest).exists()
    assert len(server.state.requests) == 1
    assert "range" not in server.state.requests[0]


def test_progress_bar_is_named_after_the_file(
    server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fetch(server, tmp_path / "archive.tar.gz", progress=True)
    err = capsys.readouterr().err
    assert "archive.tar.gz" in err
    assert "293k" in err  # 300_000 bytes with unit_scale and a 1024 divisor


def test_existing_good_file_makes_no_request(server: LocalServer, tmp_path: Path) -> None:
    dest = tmp_path / "archive.tar.gz"
    dest.write_bytes(PAYLOAD)
    assert fetch(server, dest) == dest
    assert server.state.requests == []


def test_existing_bad_file_is_replaced(server: LocalServer, tmp_path: Path) -> None:
    dest = tmp_path / "archive.tar.gz"
    dest.write_bytes(b"stale")
    fetch(server, dest)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.state.requests) == 1


def test_truncated_response_is_resumed_with_range(server: LocalServer, tmp_path: Path) -> None:
    cut = 100_000
    server.state.truncate_first = cut
    dest = tmp_path / "archive.tar.gz"
    fetch(server, dest)
    assert dest.read_bytes() == PAYLOAD
    assert not part_of(dest).exists()
    first, second = server.state.requests
    assert "range" not in first
    assert second["range"] == f"bytes={cut}-"


def test_part_from_an_earlier_run_is_resumed(server: LocalServer, tmp_path: Path) -> None:
    dest = tmp_path / "archive.tar.gz"
    part_of(dest).write_bytes(PAYLOAD[:123_456])
    fetch(server, dest)
    assert dest.read_bytes() == PAYLOAD
    assert [r.get("range") for r in server.state.requests] == ["bytes=123456-"]


def test_complete_part_answered_with_416_is_verified(server: LocalServer, tmp_path: Path) -> None:
    dest = tmp_path / "archive.tar.gz"
    part_of(dest).write_bytes(PAYLOAD)
    fetch(server, dest)
    assert dest.read_bytes() == PAYLOAD
    assert not part_of(dest).exists()
    assert [r.get("range") for r in server.state.requests] == [f"bytes={len(PAYLOAD)}-"]


@pytest.mark.parametrize("status", [503, 500, 429])
def test_retries_after_server_errors(server: LocalServer, tmp_path: Path, status: int) -> None:
    server.state.fail_first = 2
    server.state.fail_status = status
    dest = tmp_path / "archive.tar.gz"
    fetch(server, dest)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.state.requests) == 3


def test_retries_after_a_read_timeout(server: LocalServer, tmp_path: Path) -> None:
    server.state.stall_first = 1.0
    dest = tmp_path / "archive.tar.gz"
    fetch(server, dest, timeout=0.2)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.state.requests) == 2


def test_backoff_doubles_between_attempts(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(download_module.time, "sleep", sleeps.append)
    server.state.fail_first = 3
    fetch(server, tmp_path / "archive.tar.gz", backoff=0.5)
    assert sleeps == [0.5, 1.0, 2.0]


def test_gives_up_after_all_attempts(server: LocalServer, tmp_path: Path) -> None:
    server.state.fail_first = 100
    dest = tmp_path / "archive.tar.gz"
    with pytest.raises(PipelineError) as info:
        fetch(server, dest, retries=3)
    message = str(info.value)
    assert f"could not download {server.url} after 3 attempts" in message
    assert "503" in message
    assert "NEWSGROUPS_ARCHIVE" in message
    assert "\n" not in message
    assert len(server.state.requests) == 3
    assert not dest.exists()


def test_connection_refused_is_a_pipeline_error(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/archive.tar.gz"
    dest = tmp_path / "archive.tar.gz"
    with pytest.raises(PipelineError) as info:
        download(url, dest, PAYLOAD_SHA256, retries=2, backoff=0, progress=False)
    message = str(info.value)
    assert f"could not download {url} after 2 attempts" in message
    assert "NEWSGROUPS_ARCHIVE" in message
    assert "\n" not in message
    assert not dest.exists()


def test_wrong_checksum_leaves_nothing_behind(server: LocalServer, tmp_path: Path) -> None:
    dest = tmp_path / "archive.tar.gz"
    with pytest.raises(PipelineError) as info:
        fetch(server, dest, sha256=WRONG_SHA256)
    assert str(info.value) == (
        f"{server.url}: checksum mismatch: expected sha256 {WRONG_SHA256}, "
        f"got {PAYLOAD_SHA256} (the partial download was deleted; retry)"
    )
    assert not dest.exists()
    assert not part_of(dest).exists()


def test_corrupt_part_fails_once_then_rerun_succeeds(server: LocalServer, tmp_path: Path) -> None:
    dest = tmp_path / "archive.tar.gz"
    part_of(dest).write_bytes(b"x" * 1000)  # right length for a prefix, wrong bytes
    with pytest.raises(PipelineError, match="checksum mismatch"):
        fetch(server, dest)
    assert not part_of(dest).exists()
    assert not dest.exists()
    fetch(server, dest)
    assert dest.read_bytes() == PAYLOAD


def test_not_found_fails_at_once(server: LocalServer, tmp_path: Path) -> None:
    server.state.not_found = True
    dest = tmp_path / "archive.tar.gz"
    with pytest.raises(PipelineError) as info:
        fetch(server, dest, retries=5)
    message = str(info.value)
    assert server.url in message
    assert "HTTP 404" in message
    assert "attempts" not in message
    assert len(server.state.requests) == 1  # no retries
    assert not dest.exists()
    assert not part_of(dest).exists()


def test_server_ignoring_range_restarts_from_zero(server: LocalServer, tmp_path: Path) -> None:
    server.state.truncate_first = 100_000
    server.state.ignore_range = True
    dest = tmp_path / "archive.tar.gz"
    fetch(server, dest)
    assert dest.read_bytes() == PAYLOAD
    first, second = server.state.requests
    assert "range" not in first
    assert second["range"] == "bytes=100000-"  # asked to resume, got the whole file


def test_invalid_expected_checksum_is_rejected(server: LocalServer, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="not a sha256"):
        fetch(server, tmp_path / "archive.tar.gz", sha256="abc")
    assert server.state.requests == []
