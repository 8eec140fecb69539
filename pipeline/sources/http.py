"""HTTP(S) fetching with timeouts, retries, Range resume and progress, on the standard library only.

Two ways in:

- ``fetch_file``: the whole body into ``<cache>/<sha256 of url>.part``; a killed run leaves that file, and the next run
  resumes it with a ``Range`` request. Only a complete (and, when asked, checksum-verified) body is renamed into place.
- ``HttpBody``: a readable stream of the body for reading just the head of a huge file (``max_lines``); it stops
  downloading when the reader stops reading.

Both reconnect after a dropped connection or a timeout by asking for the rest of the body (``Range: bytes=<pos>-``,
checked against the 206 reply's Content-Range), and retry 5xx replies, with exponential backoff. A 4xx reply is the
user's to fix, so it fails at once, and so does a reply whose Content-Type says HTML: every URL source is a text, TSV
or Moses file (possibly compressed), and an HTML page is a landing or login page, never the corpus.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.errors import PipelineError

USER_AGENT = "xlm-pipeline/0.1 (+urllib)"
CHUNK = 1 << 16
MAX_BACKOFF_S = 60.0
# Worth retrying: the server is overloaded or asks us to slow down.
RETRYABLE_4XX = {408, 425, 429}
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass(frozen=True)
class HttpSettings:
    timeout_s: float
    retries: int
    backoff_s: float


class HttpStatusError(PipelineError):
    """The server refused the request for good (a 4xx reply): fix the URL, retrying will not help."""


class HtmlPageError(HttpStatusError):
    """The server answered with an HTML page (Content-Type text/html): a landing or error page, not the corpus."""


HTML_TYPES = ("text/html", "application/xhtml+xml")


def _refuse_html(resp, url: str, label: str) -> None:
    content_type = resp.headers.get("Content-Type", "") or ""
    if content_type.split(";")[0].strip().lower() in HTML_TYPES:
        resp.close()
        shown = content_type if len(content_type) <= 80 else content_type[:80] + f"... ({len(content_type)} chars)"
        raise HtmlPageError(
            f"{label}: GET {url}: the server sent an HTML page (Content-Type {shown!r}), not a text, TSV or Moses "
            f"file; use the URL of the file itself (a direct download link, not the web page that offers it)")


class _Transient(Exception):
    """A failure worth retrying (5xx, dropped connection, timeout, connection refused, DNS)."""


class _RangeIgnored(Exception):
    """The server answered a Range request with the whole body (200) or with the wrong range."""


def partial_path(cache_dir: Path, url: str) -> Path:
    """Where the body of ``url`` accumulates until it is complete: a stable name, so a rerun resumes it."""
    return Path(cache_dir) / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.part"


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else Exception(str(exc.reason))
    if isinstance(exc, socket.gaierror):
        return f"host name lookup failed ({exc.strerror or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class HttpBody(io.RawIOBase):
    """The body of ``GET url`` from byte ``start`` on, reconnecting (with Range) and retrying as needed.

    After construction ``start`` is where the body really begins: 0 if the server ignored the Range request, in which
    case a caller resuming a partial file must start that file over. ``total`` is the full size when the server said.
    """

    def __init__(self, url: str, settings: HttpSettings, label: str, start: int = 0, validator: str | None = None):
        super().__init__()
        self.url, self.settings, self.label = url, settings, label
        self.start = self.pos = start
        self.total: int | None = None
        self.validator = validator  # ETag or Last-Modified, sent as If-Range so a changed file restarts cleanly
        self._resp: http.client.HTTPResponse | None = None
        self._skip = 0  # bytes to throw away after a mid-body reconnect the server answered from byte 0
        self._failures = 0
        self._connect(first=True)

    # -- io.RawIOBase
    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while True:
            if self._resp is None:  # the body was empty from the start (416 on an already complete part)
                return 0
            try:
                n = self._resp.readinto(buf)
            except (OSError, http.client.HTTPException) as exc:
                self._reconnect(exc)
                continue
            if n and self._skip:
                drop = min(n, self._skip)
                self._skip -= drop
                if drop < n:
                    buf[: n - drop] = bytes(buf[drop:n])
                n -= drop
                if not n:
                    continue
            if n:
                self.pos += n
                self._failures = 0
                return n
            if self.total is None or self.pos >= self.total:
                return 0  # the real end of the body
            # http.client returns b"" rather than raising when the server closes before Content-Length.
            self._reconnect(ConnectionError(f"connection closed at byte {self.pos} of {self.total}"))

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None
        super().close()

    # -- connection handling
    def _reconnect(self, exc: BaseException) -> None:
        if self._resp is not None:
            with contextlib.suppress(Exception):
                self._resp.close()
            self._resp = None
        self._count_failure(exc)
        self._connect(first=False)

    def _count_failure(self, exc: BaseException) -> None:
        self._failures += 1
        if self._failures > self.settings.retries:
            raise PipelineError(
                f"{self.label}: GET {self.url} failed after {self._failures} attempts: {_describe_failure(exc)}; "
                f"check the URL and your network or proxy, or raise download.retries / download.timeout_s")
        delay = min(MAX_BACKOFF_S, self.settings.backoff_s * 2 ** (self._failures - 1))
        print(f"download: {self.url}: {_describe_failure(exc)}; retry {self._failures}/{self.settings.retries} "
              f"in {delay:.1f} s", file=sys.stderr, flush=True)
        time.sleep(delay)

    def _connect(self, first: bool) -> None:
        while True:
            try:
                self._open(first)
                return
            except _RangeIgnored:
                if first:  # nothing consumed yet: start over from byte 0 (the caller restarts its partial file)
                    self.start = self.pos = 0
                    self.validator = None
                    continue
                # Mid-body: the reader already has bytes [0, pos); fetch from 0 and throw those away.
                self._open_plain(skip=self.pos)
                return
            except _Transient as exc:
                self._count_failure(exc.__cause__ or exc)

    def _request(self, pos: int) -> urllib.request.Request:
        req = urllib.request.Request(self.url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
        if pos > 0:
            req.add_header("Range", f"bytes={pos}-")
            if self.validator:
                req.add_header("If-Range", self.validator)
        return req

    def _urlopen(self, req: urllib.request.Request) -> http.client.HTTPResponse | urllib.error.HTTPError:
        """The response, or the 416 error reply (a Range past the end); raise for every other failure."""
        try:
            resp = urllib.request.urlopen(req, timeout=self.settings.timeout_s)  # noqa: S310 (scheme checked)
        except urllib.error.HTTPError as exc:
            if exc.code == 416:
                return exc  # handled by the caller: a Range past the end
            exc.close()
            if exc.code >= 500 or exc.code in RETRYABLE_4XX:
                raise _Transient() from exc
            raise HttpStatusError(
                f"{self.label}: GET {self.url}: HTTP {exc.code} {exc.reason}; check the URL") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise _Transient() from exc
        _refuse_html(resp, self.url, self.label)
        return resp

    def _open(self, first: bool) -> None:
        resp = self._urlopen(self._request(self.pos))
        if isinstance(resp, urllib.error.HTTPError):  # 416: nothing at or after pos
            total = _content_range_total(resp.headers.get("Content-Range", ""))
            resp.close()
            if first and total is not None and total == self.pos:
                self.total = total  # the partial file is already complete
                return
            raise _RangeIgnored()
        if self.pos > 0 and resp.status == 200:
            # Range ignored (or If-Range saw a changed file): this is the whole body from byte 0.
            self._accept(resp, _content_length(resp), restart=first)
            return
        if self.pos > 0:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if resp.status != 206 or not m or int(m.group(1)) != self.pos:
                resp.close()
                raise _RangeIgnored()
            self._accept(resp, None if m.group(3) == "*" else int(m.group(3)), restart=False)
        else:
            self._accept(resp, _content_length(resp), restart=False)

    def _accept(self, resp: http.client.HTTPResponse, total: int | None, restart: bool) -> None:
        """Read the body from ``resp``; ``restart``: it starts at byte 0 although we asked for more."""
        if restart:
            self.start = self.pos = 0
            self.validator = None
        elif resp.status == 200 and self.pos > 0:
            self._skip = self.pos  # mid-body: the reader already has [0, pos)
        self.total = total
        self.validator = self.validator or resp.headers.get("ETag") or resp.headers.get("Last-Modified")
        self._resp = resp

    def _open_plain(self, skip: int) -> None:
        while True:
            try:
                resp = self._urlopen(self._request(0))  # no Range, so never the 416 _urlopen passes through
                break
            except _Transient as exc:
                self._count_failure(exc.__cause__ or exc)
        self.total = _content_length(resp)
        self._skip = skip
        self._resp = resp


def _content_length(resp: http.client.HTTPResponse) -> int | None:
    length = resp.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None


def _content_range_total(value: str) -> int | None:
    m = re.match(r"^bytes \*/(\d+)$", value.strip())
    return int(m.group(1)) if m else None


def open_stream(url: str, settings: HttpSettings, label: str) -> HttpBody:
    return HttpBody(url, settings, label)


def fetch_file(url: str, cache_dir: Path, settings: HttpSettings, label: str) -> Path:
    """Download ``url`` completely into its partial file (resuming what a previous run left) and return that path.

    The caller verifies the checksum and renames the file into place (or deletes it on a mismatch).
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    part = partial_path(cache_dir, url)
    meta_path = part.with_suffix(".json")
    start, validator = 0, None
    if part.exists():
        meta = _read_meta(meta_path)
        if meta.get("url") == url:
            start, validator = part.stat().st_size, meta.get("validator")
    try:
        body = HttpBody(url, settings, label, start=start, validator=validator)
        try:
            if start and body.start == 0:
                print(f"download: {url}: the server did not resume the partial download; starting over",
                      file=sys.stderr, flush=True)
            meta_path.write_text(json.dumps({"url": url, "validator": body.validator, "total": body.total}))
            mode = "ab" if body.start > 0 else "wb"
            with open(part, mode) as out, tqdm(total=body.total, initial=body.start, unit="B", unit_scale=True,
                                              unit_divisor=1024, desc=label, file=sys.stderr, leave=False) as bar:
                while chunk := body.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        finally:
            body.close()
    except HttpStatusError:
        discard_partial(cache_dir, url)  # a 404 leaves nothing behind; a refused connection keeps it for a rerun
        raise
    size = part.stat().st_size
    if body.total is not None and size != body.total:  # a server that changed the file mid-download, for one
        discard_partial(cache_dir, url)
        raise PipelineError(f"{label}: GET {url}: got {size} bytes but the server announced {body.total}; "
                            f"the partial file was deleted, run the stage again")
    return part


def discard_partial(cache_dir: Path, url: str) -> None:
    part = partial_path(cache_dir, url)
    part.unlink(missing_ok=True)
    part.with_suffix(".json").unlink(missing_ok=True)


def _read_meta(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
