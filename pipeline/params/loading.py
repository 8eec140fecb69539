"""Reading params.yaml: the shared keys, one section validated by its schema, problems as one line."""
from __future__ import annotations

import codecs
import dataclasses
import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from pipeline.errors import PipelineError
from pipeline.params.base import LangCode, Strict, _check_langs
from pipeline.params.data import CleanParams, ShardParams, TokenizerParams
from pipeline.params.evaluate import EvaluateParams, ExportParams
from pipeline.params.pretrain import PretrainParams
from pipeline.params.sources import DownloadParams, LocalSource, PypiSource, UrlSource

PARAMS_FILE = "params.yaml"

# --------------------------------------------------------------------------------------------------------------- root
_PAIR = re.compile(r"^([a-z]{2,3})-([a-z]{2,3})$")
_NAMED_RULE = re.compile(r"^(?:[A-Z]\w*\.)?(?P<key>(?:[a-z_]|\[\d)[\w.\[\]]*) = (?P<rest>.*)$", re.S)

SECTIONS: dict[str, type[BaseModel]] = {
    "download": DownloadParams,
    "clean": CleanParams,
    "tokenizer": TokenizerParams,
    "shard": ShardParams,
    "pretrain": PretrainParams,
    "evaluate": EvaluateParams,
    "export": ExportParams,
}
SHARED_KEYS = ("languages", "pairs")


class Shared(Strict):
    languages: list[LangCode] = Field(min_length=1)
    pairs: list[str] = Field(default_factory=list, description="parallel pairs for TLM, e.g. en-fr")

    _langs = field_validator("languages")(classmethod(lambda cls, v: _check_langs(v)))

    @model_validator(mode="after")
    def _pairs(self):
        for pair in self.pairs:
            m = _PAIR.match(pair)
            if not m:
                raise ValueError(f"pairs: {pair!r} is not of the form src-tgt (e.g. en-fr)")
            for lang in m.groups():
                if lang not in self.languages:
                    raise ValueError(f"pairs: {pair!r} uses {lang!r}, which is not in languages {self.languages}")
            if m.group(1) == m.group(2):
                raise ValueError(f"pairs: {pair!r} pairs a language with itself")
        return self

    def pair_tuples(self) -> list[tuple[str, str]]:
        return [tuple(p.split("-")) for p in self.pairs]  # type: ignore[misc]


@dataclass(frozen=True)
class StageParams:
    """Shared keys plus the one validated section, reachable as ``params.<section>`` (e.g. ``params.clean``)."""

    shared: Shared
    section_name: str
    section: Any

    @property
    def languages(self) -> list[str]:
        return self.shared.languages

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return self.shared.pair_tuples()

    def __getattr__(self, name: str):
        if name != "section_name" and name == self.section_name:
            return self.section
        raise AttributeError(name)


def _format_loc(prefix: str, loc: tuple) -> str:
    parts = [prefix] if prefix else []
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
        elif item in ("url", "local", "pypi") and parts and parts[-1].endswith("]"):
            continue  # the discriminated-union tag pydantic inserts; the user never wrote it
        else:
            parts.append(str(item))
    return ".".join(parts)


def _describe(exc: ValidationError, prefix: str, model: type[BaseModel], path: str) -> str:
    err = exc.errors(include_url=False)[0]
    where = _format_loc(prefix, err["loc"])
    value = err.get("input")
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):  # the latter: a library dataclass
        parent = err["loc"][:-1]
        allowed = _allowed_keys(model, parent)
        hint = f"; allowed keys: {_key_list(allowed, str(err['loc'][-1]))}" if allowed else ""
        return f"{path}: unknown key '{where}'{hint}"
    if err["type"] == "missing":
        return f"{path}: missing key '{where}'; add it (see README.md for its meaning)"
    if err["type"] == "union_tag_invalid":
        ctx = err.get("ctx", {})
        return (f"{path}: {where}.{ctx.get('discriminator', 'kind').strip(chr(39))} = {ctx.get('tag')!r}: unknown kind; "
                f"allowed: {ctx.get('expected_tags')}")
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        # A rule of a section or library dataclass that names its key ("[Config.]key = value: why") is reported
        # at that key, not at the whole mapping.
        named = _NAMED_RULE.match(msg)
        if named:
            key = (f"{where}{named['key']}" if named["key"].startswith("[") else f"{where}.{named['key']}") \
                if where else named["key"]
            return f"{path}: {key} = {named['rest']}"
    if isinstance(value, float) and not math.isfinite(value):
        msg = "must be a finite number"     # pydantic would judge NaN against the range ("less than or equal to 1")
    if not where:   # a rule of the whole mapping (e.g. shared keys): its message starts with the key it is about
        return f"{path}: {msg}"
    if isinstance(value, dict):   # a rule of a whole mapping: its message says what is wrong, a dump would not
        return f"{path}: {where}: {msg}"
    return f"{path}: {where} = {_short(value)}: {msg}"


def _key_list(allowed: list[str], typed: str, budget: int = 240) -> str:
    """The allowed keys; past ``budget`` characters the closest to the typo first, then cut (the line stays short)."""
    if len(", ".join(allowed)) <= budget:
        return ", ".join(allowed)
    close = difflib.get_close_matches(typed, allowed, n=3, cutoff=0.5)
    shown: list[str] = []
    for key in close + [k for k in allowed if k not in close]:
        if len(", ".join(shown + [key])) > budget - 30:
            break
        shown.append(key)
    more = len(allowed) - len(shown)
    return ", ".join(shown) + (f" and {more} more (see README.md)" if more > 0 else "")


def _short(value: Any) -> str:
    return _cut(repr(value))


def _cut(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters with its full length named (a 1 MiB string is not echoed whole)."""
    return text if len(text) <= limit else f"{text[:limit - 3]}... ({len(text)} characters)"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Walk the schema along ``loc`` to list the keys allowed at that level (best effort)."""
    current: Any = model
    for item in loc:
        if isinstance(item, int) or current is None:
            continue
        fields = _fields_of(current)
        if fields is None:
            return []
        if item in ("url", "local", "pypi") and item not in fields:
            current = {"url": UrlSource, "local": LocalSource, "pypi": PypiSource}[item]
            continue
        if item not in fields:
            return []
        current = _model_of(fields[item])
    fields = _fields_of(current)
    return sorted(fields) if fields else []


def _fields_of(schema: Any) -> dict[str, Any] | None:
    """Field name -> annotation of a pydantic model or of a library dataclass used as a schema."""
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return {name: f.annotation for name, f in schema.model_fields.items()}
    if dataclasses.is_dataclass(schema):
        return {f.name: f.type for f in dataclasses.fields(schema)}
    return None


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and (issubclass(annotation, BaseModel) or dataclasses.is_dataclass(annotation)):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def read_yaml(path: str | Path = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: file not found; run from the project root or pass --params PATH")
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise PipelineError(f"{path}: looks like UTF-16 (byte-order mark); convert it to UTF-8 "
                            f"(e.g. iconv -f UTF-16 -t UTF-8)")
    try:
        raw = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise PipelineError(f"{path}: line {line} is not valid UTF-8 (byte {exc.object[exc.start]:#04x} at offset "
                            f"{exc.start}); save the file as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PipelineError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    if raw is None:
        raise PipelineError(f"{path}: the file is empty; restore it (git checkout {path.name}) or write its sections")
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return raw


_LONG_WORD = re.compile(r"\S{81,}")


def _cut_long_words(message: str) -> str:
    """A value echoed anywhere in a message (a rule's own f-string too) is cut to 80 characters, its length named."""
    return _LONG_WORD.sub(lambda m: _cut(m[0]), message)


def load_params(section: str, path: str | Path = PARAMS_FILE) -> StageParams:
    """Validate the shared keys and ``section`` of params.yaml; raise PipelineError with one precise line."""
    try:
        return _load_params(section, path)
    except PipelineError as exc:
        raise PipelineError(_cut_long_words(str(exc))) from None


def _load_params(section: str, path: str | Path) -> StageParams:
    if section not in SECTIONS:
        raise ValueError(f"no schema for section {section!r}")  # a bug in the caller, not user input
    raw = read_yaml(path)
    known = set(SECTIONS) | set(SHARED_KEYS)
    unknown = sorted((str(k) for k in raw if k not in known))   # YAML keys may be numbers too
    if unknown:
        raise PipelineError(
            f"{path}: unknown top-level key '{unknown[0]}'; allowed: {', '.join(sorted(known))}")
    shared_raw = {k: raw[k] for k in SHARED_KEYS if k in raw}
    try:
        shared = Shared.model_validate(shared_raw)
    except ValidationError as exc:
        raise PipelineError(_describe(exc, "", Shared, str(path))) from None
    if section not in raw or raw[section] is None:
        raise PipelineError(f"{path}: missing section '{section}'; add a '{section}:' mapping (see README.md)")
    model = SECTIONS[section]
    try:
        validated = model.model_validate(raw[section])
    except ValidationError as exc:
        raise PipelineError(_describe(exc, section, model, str(path))) from None
    _cross_check(section, validated, shared, str(path))
    return StageParams(shared=shared, section_name=section, section=validated)


def _cross_check(section: str, validated: BaseModel, shared: Shared, path: str) -> None:
    if section == "pretrain" and validated.adversarial.enabled and len(shared.languages) < 2:  # type: ignore[attr-defined]
        raise PipelineError(
            f"{path}: pretrain.adversarial.weight = {validated.adversarial.weight}: the language adversary needs "  # type: ignore[attr-defined]
            f"at least two languages (languages = {shared.languages}); set it to 0 or add languages")
    if section == "download":
        for i, src in enumerate(validated.sources):  # type: ignore[attr-defined]
            extra = [lang for lang in src.languages if lang not in shared.languages]
            if extra:
                raise PipelineError(
                    f"{path}: download.sources[{i}].languages = {src.languages}: {extra} not in the top-level "
                    f"languages {shared.languages}; add them there or remove them from the source")
        # Only training text counts: an eval source's sentences are held out, so they cannot be a language's corpus.
        covered = {lang for src in validated.sources if src.role == "train"  # type: ignore[attr-defined]
                   for lang in src.languages}
        missing = [lang for lang in shared.languages if lang not in covered]
        if missing:
            raise PipelineError(
                f"{path}: languages lists {missing} but no entry of download.sources with role: train provides "
                f"them; add a source with those languages or remove them from languages")
