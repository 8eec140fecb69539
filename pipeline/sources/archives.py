"""Compression and archives, told apart by their magic bytes (never by file name).

A fetched file is peeled layer by layer: gzip / bzip2 / xz are decompressed as streams; then a zip (read in place,
member by member) or a tar (read as a stream, in one pass) is opened, or the bytes are taken as the text itself.
Archive members are never extracted under their own names: every member name is checked first (no absolute paths,
no ``..``, no links or devices), and a tar member we need is copied to a temporary file named by us.
"""
from __future__ import annotations

import bz2
import contextlib
import fnmatch
import gzip
import io
import lzma
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

from pipeline.errors import PipelineError

COMPRESSION_MAGIC = {b"\x1f\x8b": "gz", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
TAR_BLOCK = 512
MAX_LAYERS = 3  # gz inside xz inside bz2 is already absurd; more is a decompression bomb or a bug
IGNORED_MEMBERS = re.compile(r"^(readme|license|licence|copying)([._-].*)?$", re.IGNORECASE)
BUFFER = 1 << 16  # small: when streaming the head of a huge file, read ahead little


@dataclass(frozen=True)
class Selector:
    """Which archive member to read: matching ``glob`` (fnmatch, on the full member path) and ending in ``suffix``.

    With neither, the archive must hold exactly one file (README/LICENSE files aside).
    """

    glob: Optional[str] = None
    suffix: Optional[str] = None

    def matches(self, name: str) -> bool:
        if self.glob is None and self.suffix is None:
            return not IGNORED_MEMBERS.match(name.rsplit("/", 1)[-1])
        return ((self.glob is None or fnmatch.fnmatchcase(name, self.glob))
                and (self.suffix is None or name.endswith(self.suffix)))

    def describe(self) -> str:
        parts = ([f"the glob {self.glob!r}"] if self.glob else []) + ([f"*{self.suffix}"] if self.suffix else [])
        return " and ".join(parts) if parts else "any file"


@dataclass
class Member:
    """A readable, decompressed stream and the name to show in messages (``archive.zip:member``)."""

    name: str
    stream: BinaryIO


class NeedsWholeFile(Exception):
    """A zip cannot be read from a stream (its directory is at the end); download it whole instead."""


class _Prefixed(io.RawIOBase):
    """``prefix`` followed by the rest of ``inner``: lets us look at the first bytes of a stream that cannot seek."""

    def __init__(self, prefix: bytes, inner: BinaryIO):
        super().__init__()
        self._prefix, self._inner = memoryview(prefix), inner

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self._prefix:
            n = min(len(buf), len(self._prefix))
            buf[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        data = self._inner.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._inner.close()
        super().close()


def _peek(stream: BinaryIO, n: int) -> tuple[bytes, BinaryIO]:
    head = bytearray()
    while len(head) < n:
        chunk = stream.read(n - len(head))
        if not chunk:
            break
        head += chunk
    return bytes(head), io.BufferedReader(_Prefixed(bytes(head), stream), BUFFER)


def decompress(stream: BinaryIO) -> tuple[BinaryIO, list[str]]:
    """Peel gzip/bzip2/xz layers off ``stream``; return the inner stream and the layers found, outermost first."""
    layers: list[str] = []
    while True:
        head, stream = _peek(stream, 6)
        kind = next((k for magic, k in COMPRESSION_MAGIC.items() if head.startswith(magic)), None)
        if kind is None or len(layers) == MAX_LAYERS:
            return stream, layers
        layers.append(kind)
        if kind == "gz":
            stream = gzip.GzipFile(fileobj=stream, mode="rb")
        elif kind == "bz2":
            stream = bz2.BZ2File(stream, mode="rb")
        else:
            stream = lzma.LZMAFile(stream, mode="rb")


def _looks_like_tar(head: bytes) -> bool:
    if len(head) < TAR_BLOCK:
        return False
    try:  # a valid header checksum: true of every tar (ustar, GNU and old v7 alike), false of text
        tarfile.TarInfo.frombuf(head[:TAR_BLOCK], "utf-8", "surrogateescape")
        return True
    except tarfile.HeaderError:
        return False


def unsafe_member_reason(name: str) -> Optional[str]:
    """Why an archive member name would escape the target folder (None when it is safe)."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    if ".." in re.split(r"[\\/]+", name):
        return "a '..' component"
    return None


# What gzip / bz2 / xz raise on corrupt or truncated data (gzip.BadGzipFile is an OSError).
DECOMPRESSION_ERRORS = (EOFError, OSError, lzma.LZMAError, zlib.error)


def corrupt_data(label: str, name: str, exc: BaseException, after: str = "") -> PipelineError:
    return PipelineError(f"{label}: {name}: corrupt or truncated compressed data{after} ({exc}); download it again "
                         f"or check the file")


def _refuse(label: str, archive: str, member: str, reason: str) -> PipelineError:
    return PipelineError(f"{label}: {archive}: refusing archive member {member!r}: {reason} could write outside the "
                         f"target folder; the archive is unsafe, use another download")


@contextlib.contextmanager
def open_members(stream: BinaryIO, name: str, wanted: dict[str, Selector], work_dir: Path, label: str,
                 path: Optional[Path] = None) -> Iterator[dict[str, Member]]:
    """Yield one decompressed stream per key of ``wanted`` from a plain, compressed or archived file.

    ``stream`` is the raw file (or HTTP body); ``path`` is its location on disk when it has one (a zip needs it:
    without it, NeedsWholeFile is raised before anything is read past the first bytes).
    A plain (non-archive) file serves a single key whose Selector is empty.
    """
    with contextlib.ExitStack() as stack:
        stack.callback(stream.close)
        try:  # the first bytes are decompressed here already: a small corrupt file fails now
            inner, layers = decompress(stream)
            head, inner = _peek(inner, TAR_BLOCK)
        except DECOMPRESSION_ERRORS as exc:
            raise corrupt_data(label, name, exc) from None
        if head.startswith(ZIP_MAGIC):
            if layers or path is None:
                if path is None and not layers:
                    raise NeedsWholeFile()
                raise PipelineError(f"{label}: {name}: a zip inside a {'/'.join(layers)} file is not supported; "
                                    f"unpack it first")
            inner.close()
            yield _open_zip_members(path, name, wanted, label, stack)
        elif _looks_like_tar(head):
            yield _open_tar_members(inner, name, wanted, work_dir, label, stack)
        else:
            selector = next(iter(wanted.values()))
            if len(wanted) != 1 or selector != Selector():
                need = ", ".join(s.describe() for s in wanted.values())
                raise PipelineError(f"{label}: {name} is a plain {'/'.join(layers + ['text'])} file, not a zip/tar "
                                    f"archive, so it has no member matching {need}; check the URL/path, member and "
                                    f"format")
            yield {next(iter(wanted)): Member(name, inner)}


def _select(names: list[str], wanted: dict[str, Selector], archive: str, label: str) -> dict[str, str]:
    chosen = {}
    for key, selector in wanted.items():
        matches = [n for n in names if selector.matches(n)]
        if len(matches) != 1:
            shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
            what = "no member matches" if not matches else f"{len(matches)} members match"
            raise PipelineError(f"{label}: {archive}: {what} {selector.describe()} (members: {shown or 'none'}); "
                                f"set member: <glob> to pick one")
        chosen[key] = matches[0]
    return chosen


def _open_zip_members(path: Path, name: str, wanted: dict[str, Selector], label: str,
                      stack: contextlib.ExitStack) -> dict[str, Member]:
    try:
        zf = stack.enter_context(zipfile.ZipFile(path))
    except zipfile.BadZipFile as exc:
        raise PipelineError(f"{label}: {name}: not a valid zip archive ({exc}); the download may be corrupt") from None
    files = []
    for info in zf.infolist():
        reason = unsafe_member_reason(info.filename)
        if reason is None and stat.S_ISLNK(info.external_attr >> 16):
            reason = "a symbolic link"
        if reason:
            raise _refuse(label, name, info.filename, reason)
        if not info.is_dir():
            files.append(info.filename)
    members = {}
    for key, member in _select(files, wanted, name, label).items():
        try:
            raw = stack.enter_context(zf.open(member))
        except (RuntimeError, NotImplementedError, zipfile.BadZipFile) as exc:  # encrypted, unknown method, corrupt
            raise PipelineError(f"{label}: {name}:{member}: cannot read this zip member ({exc})") from None
        members[key] = Member(f"{name}:{member}", decompress(raw)[0])
    return members


def _open_tar_members(stream: BinaryIO, name: str, wanted: dict[str, Selector], work_dir: Path, label: str,
                      stack: contextlib.ExitStack) -> dict[str, Member]:
    """One pass over the tar stream: check every member, copy the first match of each selector to a temp file."""
    copies: dict[str, Path] = {}
    files: list[str] = []
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                reason = unsafe_member_reason(info.name)
                if reason is None and info.issym():
                    reason = f"a symbolic link (to {info.linkname!r})"
                elif reason is None and info.islnk():
                    reason = f"a hard link (to {info.linkname!r})"
                elif reason is None and not (info.isreg() or info.isdir()):
                    reason = "a device, FIFO or other special file"
                if reason:
                    raise _refuse(label, name, info.name, reason)
                if info.isdir():
                    continue
                files.append(info.name)
                # Copy only the first match of each selector: a second one is an ambiguity _select reports once the
                # full listing is known, so disk use stays at one member per selector.
                if not any(s.matches(info.name) and not any(s.matches(c) for c in copies) for s in wanted.values()):
                    continue
                target = work_dir / f"member-{len(copies)}"
                with tar.extractfile(info) as src, open(target, "wb") as dst:  # type: ignore[union-attr]
                    shutil.copyfileobj(src, dst, BUFFER)
                copies[info.name] = target
    except tarfile.TarError as exc:
        raise PipelineError(f"{label}: {name}: corrupt tar archive ({exc}); the download may be truncated") from None
    except (EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile) as exc:  # the compression around the tar
        raise corrupt_data(label, name, exc) from None
    members = {}
    for key, member in _select(files, wanted, name, label).items():
        raw = stack.enter_context(open(copies[member], "rb"))
        members[key] = Member(f"{name}:{member}", decompress(raw)[0])
    return members
