"""Atomic file and directory writes.

Every output is written under a temporary sibling path and renamed into place, so a process killed at any moment
leaves either the previous complete output or the new complete output, never a half-written one that looks complete.
Temporary names carry the ``.tmp-`` infix so they are easy to recognise (and git-ignored); the next write of the same
path deletes the ones a killed writer left (``remove_stale_siblings``).

A write that fails because the disk (or the quota, or the file-size limit) is full leaves the previous output in
place; ``is_disk_full`` recognises that failure whichever library (pyarrow, safetensors, torch) reported it, so a
stage can say so in one line.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (the rename itself) to disk."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(root))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator:
    """Open a temporary sibling of ``path`` for writing; on success fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path; a library (pyarrow, safetensors, sentencepiece) writes it, then it is renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_state(pid: int) -> tuple[str, float] | None:
    """Process ``pid``'s state letter and start time (epoch seconds), from Linux /proc; None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()      # fields[0] is field 3 (state), fields[19] field 22
        with open("/proc/stat") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
        return fields[0], boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _writer_alive(pid: int, leftover: Path) -> bool:
    """Whether the writer of ``leftover`` (named with its ``pid``) may still be running.

    A killed writer may linger as a zombie until it is reaped, and PIDs are reused (pid_max is often 32768): a zombie
    writes nothing more, and a process that started after the leftover was last modified is not its writer. A second
    of slack keeps the test conservative (the boot time has whole seconds).
    """
    if not _pid_alive(pid):
        return False
    state = _process_state(pid)
    if state is None:
        return True
    letter, started = state
    try:
        modified = leftover.lstat().st_mtime
    except OSError:
        return False
    return letter != "Z" and started <= modified + 1.0


def remove_stale_siblings(path: Path) -> None:
    """Delete ``<name>.tmp-<pid>-*`` / ``<name>.old-<pid>-*`` left by a killed writer (no longer running)."""
    if not path.parent.is_dir():
        return
    for child in path.parent.iterdir():
        for infix in (".tmp-", ".old-"):
            prefix = f"{path.name}{infix}"
            if child.name.startswith(prefix):
                pid = child.name[len(prefix):].split("-", 1)[0]
                if pid.isdigit() and not _writer_alive(int(pid), child):
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces ``path`` as a whole.

    The old directory (if any) is moved aside first and deleted only after the new one is in place, so at every instant
    ``path`` is either absent, the old complete output or the new complete output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = _tmp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if path.exists() or path.is_symlink():
            old = path.with_name(f"{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj, *, indent: int = 2) -> None:
    """Atomically write ``obj`` as JSON with sorted keys (stable bytes for DVC hashing)."""
    with atomic_file(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=indent, sort_keys=True, ensure_ascii=False)
        fh.write("\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
# How libraries that do not raise OSError word it (safetensors: "... File too large (os error 27)").
_DISK_FULL_TEXTS = ("No space left on device", "File too large", "Disk quota exceeded", "os error 28)",
                    "os error 27)", "os error 122)")


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from or during) is a full disk, quota or file-size limit.

    torch.save writing to a Python file object raises RuntimeError("unexpected pos ...") during the OSError, so the
    chain of causes and contexts is searched too.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(exc) for text in _DISK_FULL_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_reason(exc: BaseException) -> str:
    """The OS's words for a full disk found in ``exc``'s chain (for the error line), e.g. "File too large"."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return os.strerror(current.errno)
        current = current.__cause__ or current.__context__
    return next((t for t in _DISK_FULL_TEXTS[:3] if t in str(exc)), "no space left")
