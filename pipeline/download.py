"""Resumable, checksum-verified HTTP download for the ``fetch`` stage.

The archive comes from a public mirror over a network we do not control, so the download
must survive dropped connections and flaky servers without ever leaving a file at ``dest``
that is not exactly the expected bytes. Data goes to ``<dest>.part`` first; a retry (or a
later run) resumes it with an HTTP ``Range`` request, and the part is renamed into place
only after its sha256 matches.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import requests
import urllib3
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.io import sha256_file

OFFLINE_HINT = "Offline? Set NEWSGROUPS_ARCHIVE=/path/to/20news-bydate.tar.gz"

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
# "HTTPConnectionPool(host='h', port=1): " / "<...Connection object at 0x..>: " prefixes
_POOL_PREFIX_RE = re.compile(r"^(?:<[^>]*>|\w+\([^)]*\)): ")

# Failures worth another attempt: the network or the server, not the request itself.
_RETRYABLE_EXCEPTIONS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
    urllib3.exceptions.HTTPError,  # raised by resp.raw: protocol errors, read timeouts
)


class _TransientError(Exception):
    """A failed attempt that another attempt may fix (5xx, 429, a short read)."""


def download(
    url: str,
    dest: Path,
    sha256: str,
    *,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 1.0,
    progress: bool = True,
    chunk_size: int = 1 << 16,
) -> Path:
    """Download ``url`` to ``dest`` and return ``dest`` once its sha256 is ``sha256``.

    ``retries`` is the total number of attempts; after failed attempt ``i`` (from 0) we
    sleep ``backoff * 2**i`` seconds. The partial file is kept between attempts (and
    between runs) so each attempt resumes where the last one stopped. Raises
    :class:`PipelineError` with a one-line message for every failure a user can act on.
    """
    dest = Path(dest)
    expected = sha256.strip().lower()
    if not _SHA256_RE.fullmatch(expected):
        raise PipelineError(f"{url}: expected checksum {sha256!r} is not a sha256 hex digest")
    if dest.is_file() and sha256_file(dest) == expected:
        return dest
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"{url}: cannot create {dest.parent}: {exc}") from exc

    _fetch_part(url, part, max(1, retries), timeout, backoff, progress, chunk_size, dest.name)
    actual = sha256_file(part)
    if actual != expected:
        part.unlink(missing_ok=True)
        raise PipelineError(
            f"{url}: checksum mismatch: expected sha256 {expected}, got {actual} "
            "(the partial download was deleted; retry)"
        )
    os.replace(part, dest)
    return dest


def _fetch_part(
    url: str,
    part: Path,
    attempts: int,
    timeout: float,
    backoff: float,
    progress: bool,
    chunk_size: int,
    desc: str,
) -> None:
    """Complete ``part`` in up to ``attempts`` attempts, backing off as :func:`download` says.

    Raises:
        PipelineError: an attempt failed in a way no retry fixes, or every attempt failed.
    """
    last_error = "no attempt was made"
    with requests.Session() as session:
        for attempt in range(attempts):
            try:
                _attempt(session, url, part, timeout, progress, chunk_size, desc)
                break
            except _RETRYABLE_EXCEPTIONS as exc:
                last_error = _describe(exc)
            except _TransientError as exc:
                last_error = str(exc)
            except requests.RequestException as exc:  # bad URL, bad scheme, too many redirects
                raise PipelineError(f"could not download {url}: {_describe(exc)}") from exc
            except OSError as exc:  # after RequestException, which subclasses OSError
                raise PipelineError(f"{url}: cannot write {part}: {exc}") from exc
            if attempt + 1 < attempts:
                time.sleep(backoff * 2**attempt)
        else:
            raise PipelineError(
                f"could not download {url} after {attempts} attempt{'s' * (attempts > 1)}: "
                f"{last_error}. {OFFLINE_HINT}"
            )


def _attempt(
    session: requests.Session,
    url: str,
    part: Path,
    timeout: float,
    progress: bool,
    chunk_size: int,
    desc: str,
) -> None:
    """One request that extends ``part``; returns when the server says the body is complete.

    Raises :class:`_TransientError` or a requests exception for failures worth a retry,
    and :class:`PipelineError` for those that are not.
    """
    offset = part.stat().st_size if part.is_file() else 0
    # identity: byte ranges and Content-Length must refer to the bytes we store.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with session.get(url, headers=headers, stream=True, timeout=timeout) as resp:
        status = resp.status_code
        if status == 416 and offset:
            return  # nothing left to send: the part may be complete; the checksum decides
        if status == 429 or status >= 500:
            raise _TransientError(f"HTTP {status} {resp.reason}".rstrip())
        if status not in (200, 206):
            raise PipelineError(f"could not download {url}: HTTP {status} {resp.reason}".rstrip())

        total = _content_length(resp)
        if status == 206:
            start, total = _content_range(resp)
            if start != offset:
                # Not the range we asked for: the part cannot be trusted to line up.
                part.unlink(missing_ok=True)
                raise _TransientError(f"server sent bytes from {start}, asked for {offset}")
            mode = "ab"
        else:  # 200: the whole body, whether or not we asked for a range
            offset, mode = 0, "wb"

        written = offset
        with (
            open(part, mode) as fh,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                disable=not progress,
            ) as bar,
        ):
            # Raw bytes, not iter_content: when the connection drops, iter_content discards
            # the chunk it was filling, and we want every byte received kept for the resume.
            for chunk in resp.raw.stream(chunk_size, decode_content=False):
                fh.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    if total is not None and written < total:
        raise _TransientError(f"connection closed after {written} of {total} bytes")


def _content_length(resp: requests.Response) -> int | None:
    """Size of the whole file from a 200 response, or None if the server did not say."""
    value = resp.headers.get("Content-Length", "")
    return int(value) if value.isdigit() else None


def _content_range(resp: requests.Response) -> tuple[int, int | None]:
    """(first byte, whole-file size or None) from a 206 response's Content-Range."""
    header = resp.headers.get("Content-Range", "")
    match = _CONTENT_RANGE_RE.fullmatch(header.strip())
    if match is None:
        raise _TransientError(f"206 response with a bad Content-Range: {header!r}")
    size = match.group(3)
    return int(match.group(1)), None if size == "*" else int(size)


def _describe(exc: Exception) -> str:
    """A one-line description of a network error, without urllib3's nested reprs."""
    cause: BaseException = exc
    inner = exc.args[0] if exc.args else None
    if isinstance(inner, urllib3.exceptions.MaxRetryError) and inner.reason is not None:
        cause = inner.reason  # requests wraps the real failure in MaxRetryError
    elif isinstance(inner, BaseException):
        cause = inner
    args = cause.args
    if isinstance(cause, urllib3.exceptions.ProtocolError) and args and isinstance(args[0], str):
        text = args[0]  # args[1] repeats the underlying exception
    else:
        text = str(cause)
    text = _POOL_PREFIX_RE.sub("", " ".join(text.split()))
    return f"{type(exc).__name__}: {text or type(cause).__name__}"
