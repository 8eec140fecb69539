"""Check data/raw against params before any output is touched, and list the clean stage's work (the plan)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline.errors import fail
from pipeline.params import StageParams

_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DOWNLOAD_HINT = "run `dvc repro download`"
ROLES = ("train", "eval")


@dataclass(frozen=True)
class RawFile:
    """One unit of step 1: the raw text of one language in one source."""

    source: str
    lang: str
    path: Path
    parallel: bool


@dataclass(frozen=True)
class EvalSource:
    """A ``role: eval`` source: its raw files, and the pairs its suites hold (never training text)."""

    name: str
    files: dict[str, Path]  # language -> raw file
    pairs: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Plan:
    files: tuple[RawFile, ...]  # language-major (params order), then source (raw manifest order); training only
    pair_sources: dict[tuple[str, str], tuple[str, ...]]  # configured pair -> parallel sources that have it
    eval_sources: tuple[EvalSource, ...] = ()  # raw manifest order

    def in_a_pair(self, raw: RawFile) -> bool:
        """Whether some configured pair reads this file's segments."""
        return any(raw.source in sources and raw.lang in pair for pair, sources in self.pair_sources.items())


@dataclass(frozen=True)
class _RawSource:
    name: str
    parallel: bool
    languages: tuple[str, ...]
    role: str = "train"
    pairs: tuple[tuple[str, str], ...] | None = None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"{path}: unreadable ({exc.__class__.__name__}: {exc}); {DOWNLOAD_HINT} again")
    if not isinstance(data, dict):
        fail(f"{path}: expected a JSON object; {DOWNLOAD_HINT} again")
    return data


def _read_source(raw_dir: Path, name: object) -> _RawSource:
    if not isinstance(name, str) or not _SOURCE_NAME.match(name):
        fail(f"{raw_dir / 'manifest.json'}: bad source name {name!r}; {DOWNLOAD_HINT} again")
    manifest = raw_dir / name / "manifest.json"
    if not manifest.is_file():
        fail(f"{manifest}: not found, although {raw_dir / 'manifest.json'} lists source {name!r}; "
             f"{DOWNLOAD_HINT} again")
    data = _read_json(manifest)
    languages, parallel = data.get("languages"), data.get("parallel")
    if not isinstance(languages, list) or not all(isinstance(x, str) for x in languages):
        fail(f"{manifest}: 'languages' must be a list of language codes, got {languages!r}; {DOWNLOAD_HINT} again")
    if not isinstance(parallel, bool):
        fail(f"{manifest}: 'parallel' must be true or false, got {parallel!r}; {DOWNLOAD_HINT} again")
    role, pairs = data.get("role", "train"), data.get("pairs")  # manifests written before roles: training text
    if role not in ROLES or (role == "eval" and not parallel):
        fail(f"{manifest}: 'role' must be one of {', '.join(ROLES)} (eval only for a parallel source), got "
             f"{role!r}; {DOWNLOAD_HINT} again")
    if pairs is not None and not (isinstance(pairs, list) and all(
            isinstance(p, str) and len(p.split("-")) == 2 and set(p.split("-")) <= set(languages) for p in pairs)):
        fail(f"{manifest}: 'pairs' must be null or a list of src-tgt pairs of its languages, got {pairs!r}; "
             f"{DOWNLOAD_HINT} again")
    return _RawSource(name, parallel, tuple(languages), role,
                      None if pairs is None else tuple(tuple(p.split("-")) for p in pairs))  # type: ignore[misc]


def _describe_sources(sources: Sequence[_RawSource]) -> str:
    return ", ".join(f"{s.name} [{', '.join(s.languages)}]" for s in sources) or "none"


def plan_work(params: StageParams, raw_dir: str | Path) -> Plan:
    """Check data/raw against params (every error the input can cause, before any output is touched); list the work."""
    raw_dir = Path(raw_dir)
    top = raw_dir / "manifest.json"
    if not top.is_file():
        fail(f"{raw_dir}: no raw corpus ({top} not found); {DOWNLOAD_HINT} first")
    names = _read_json(top).get("sources")
    if not isinstance(names, list):
        fail(f"{top}: 'sources' must be a list of source folder names; {DOWNLOAD_HINT} again")
    everything = [_read_source(raw_dir, name) for name in names]
    sources = [s for s in everything if s.role == "train"]
    evals = tuple(_eval_source(raw_dir, s, params) for s in everything if s.role == "eval")

    files = []
    for lang in params.languages:
        providers = [s for s in sources if lang in s.languages]
        if not providers:
            fail(f"language {lang!r} has no raw text: no training source in {raw_dir} provides it (sources: "
                 f"{_describe_sources(sources)}); add a source with it under download.sources and "
                 f"{DOWNLOAD_HINT}, or remove it from languages in params.yaml")
        for source in providers:
            path = raw_dir / source.name / f"{lang}.tsv"
            if not path.is_file():
                fail(f"{path}: not found, although {raw_dir / source.name / 'manifest.json'} lists language "
                     f"{lang!r}; {DOWNLOAD_HINT} again")
            if path.stat().st_size == 0:
                fail(f"{path}: empty file (no segments for {lang!r} in source {source.name!r}); check that source "
                     f"under download.sources in params.yaml and {DOWNLOAD_HINT} again")
            files.append(RawFile(source.name, lang, path, source.parallel))

    pair_sources = {}
    parallel = [s for s in sources if s.parallel]
    for src, tgt in params.pairs:
        providers = tuple(s.name for s in parallel if src in s.languages and tgt in s.languages)
        if not providers:
            fail(f"pairs: {src}-{tgt} is not provided by any parallel source in {raw_dir} (parallel sources: "
                 f"{_describe_sources(parallel)}); remove it from pairs in params.yaml or add a parallel source "
                 f"with both {src} and {tgt}")
        pair_sources[(src, tgt)] = providers
    return Plan(tuple(files), pair_sources, evals)


def _eval_source(raw_dir: Path, source: _RawSource, params: StageParams) -> EvalSource:
    """The files and pairs of an eval source: its own ``pairs``, or else the configured pairs it covers."""
    if source.pairs is not None:
        pairs = source.pairs
        unknown = sorted({lang for pair in pairs for lang in pair if lang not in params.languages})
        if unknown:
            fail(f"source {source.name!r} (role eval): its pairs use {unknown}, not in languages "
                 f"{params.languages}; add them to languages or change the source's pairs in download.sources")
    else:
        pairs = tuple(p for p in params.pairs if set(p) <= set(source.languages))
        if not pairs:
            fail(f"source {source.name!r} (role eval, languages {list(source.languages)}) covers none of the "
                 f"configured pairs {['-'.join(p) for p in params.pairs]}; give it pairs: in download.sources or "
                 f"remove it")
    files = {}
    for lang in sorted({lang for pair in pairs for lang in pair}):
        path = raw_dir / source.name / f"{lang}.tsv"
        if not path.is_file():
            fail(f"{path}: not found, although {raw_dir / source.name / 'manifest.json'} lists language "
                 f"{lang!r}; {DOWNLOAD_HINT} again")
        files[lang] = path
    return EvalSource(source.name, files, pairs)
