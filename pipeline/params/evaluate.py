"""The `evaluate` and `export` sections."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, model_validator

from pipeline.params.base import LangCode, Strict, _check_lang

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
    max_probe_sentences: int = Field(default=2000, ge=2, description="test sentences per language for the "
                                     "language-ID and genre probes (a sample by evaluate.seed)")
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

    @model_validator(mode="after")
    def _license_is_one_line(self):
        if any(ord(c) < 32 for c in self.license):
            raise ValueError(f"license = {self.license[:40]!r}: must be one line, a license id such as apache-2.0, "
                             f"mit or cc-by-4.0 (it becomes the card's license field)")
        return self

