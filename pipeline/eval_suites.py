"""The evaluation suites, read and tokenized: the user's of params.yaml (evaluate.retrieval, evaluate.classification)
and the out-of-domain suites the clean stage writes (data/clean/eval/suites.parquet).

Each problem is one error naming the file (and line), the params.yaml entry and the fix; everything is read before
any scoring starts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pyarrow as pa

from pipeline.errors import PipelineError
from pipeline.params import ClassificationSuite, RetrievalSuite
from xlm_core.evaluation.inputs import ClassificationData, OutOfDomainSuite, RetrievalData, out_of_domain_suites
from xlm_core.evaluation.suite_file import read_suites
from xlm_core.metrics import label_indices
from xlm_core.model_dir import ModelDir


def _read_lines(path_text: str, where: str) -> list[str]:
    """The lines of a UTF-8 text file, or one error naming the file (and line) and the fix."""
    path = Path(path_text)
    if not path.is_file():
        raise PipelineError(f"{path}: not found (params.yaml {where}); fix the path or create the file")
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for number, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            raise PipelineError(f"{path}:{number}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8") from None
        out.append(text)
    if not out:
        raise PipelineError(f"{path}: empty file (params.yaml {where}); it needs one example per line")
    return out


def _check_suite_lang(lang: str, where: str, model: ModelDir) -> None:
    if model.config.use_lang_emb and lang not in model.languages:
        raise PipelineError(f"params.yaml: {where} = {lang!r}: this model has language embeddings for "
                            f"{model.languages} only; use one of those")


def load_retrieval_suite(suite: RetrievalSuite, index: int, model: ModelDir) -> RetrievalData:
    where = f"evaluate.retrieval[{index}]"
    _check_suite_lang(suite.src_lang, f"{where}.src_lang", model)
    _check_suite_lang(suite.tgt_lang, f"{where}.tgt_lang", model)
    src = _read_lines(suite.src, f"{where}.src")
    tgt = _read_lines(suite.tgt, f"{where}.tgt")
    if len(src) != len(tgt):
        raise PipelineError(f"{suite.src}: {len(src)} lines but {suite.tgt} has {len(tgt)}; the two files of "
                            f"suite {suite.name!r} must be line-aligned (line i translates line i)")
    for path, lines in ((suite.src, src), (suite.tgt, tgt)):
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                raise PipelineError(f"{path}:{number}: empty line; every line of suite {suite.name!r} must hold a "
                                    f"sentence (remove line {number} from both files)")
    if len(src) < 2:
        raise PipelineError(f"{suite.src}: one line; retrieval needs at least two sentence pairs")
    return RetrievalData(suite.name, suite.src_lang, suite.tgt_lang, model.tokenizer.encode_batch(src),
                         model.tokenizer.encode_batch(tgt))


def _read_labelled(path: str, where: str) -> tuple[list[str], list[str], list[int]]:
    labels, texts, numbers = [], [], []
    for number, line in enumerate(_read_lines(path, where), start=1):
        label, tab, text = line.partition("\t")
        if not tab:
            raise PipelineError(f"{path}:{number}: no tab; each line must be `label<TAB>text`")
        if not label.strip() or not text.strip():
            raise PipelineError(f"{path}:{number}: empty {'label' if not label.strip() else 'text'}; each line must "
                                f"be `label<TAB>text` with both parts non-empty")
        labels.append(label.strip())
        texts.append(text)
        numbers.append(number)
    return labels, texts, numbers


def load_classification_suite(suite: ClassificationSuite, index: int, model: ModelDir) -> ClassificationData:
    where = f"evaluate.classification[{index}]"
    for lang in suite.files:
        _check_suite_lang(lang, f"{where}.files.{lang}", model)
    read = {lang: _read_labelled(path, f"{where}.files.{lang}") for lang, path in suite.files.items()}
    classes = sorted(set(read[suite.train_lang][0]))
    if len(classes) < 2:
        raise PipelineError(f"{suite.files[suite.train_lang]}: one label ({classes[0]!r}); a classifier needs "
                            f"examples of at least two labels in the training language's file")
    for lang, (labels, _texts, numbers) in read.items():
        for label, number in zip(labels, numbers):
            if label not in classes:
                raise PipelineError(f"{suite.files[lang]}:{number}: label {label!r} does not occur in the training "
                                    f"file {suite.files[suite.train_lang]} (labels {classes}); fix the label or add "
                                    f"training examples of it")
    return ClassificationData(
        name=suite.name, train_lang=suite.train_lang, classes=classes,
        labels={lang: label_indices(labels, classes) for lang, (labels, _t, _n) in read.items()},
        texts={lang: model.tokenizer.encode_batch(texts) for lang, (_l, texts, _n) in read.items()})


def load_out_of_domain(path: Optional[Path], model: ModelDir, languages: list[str], cap: int
                       ) -> tuple[list[OutOfDomainSuite], list[str], Optional[str]]:
    """The suite file's out-of-domain suites, tokenized; notes on what was left out; and, when nothing is left to
    score, why (a missing or empty file is not an error: user corpora need not have an out-of-domain suite)."""
    if path is None:
        return [], [], "no out-of-domain suite (no suite file given)"
    if not path.is_file():
        return [], [], f"no out-of-domain suite ({path} does not exist)"
    try:
        text_suites = read_suites(path)
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:   # not Parquet, a missing column, ...
        raise PipelineError(f"{path}: not a readable suite file ({type(exc).__name__}: {str(exc)[:160]}); "
                            f"rerun `dvc repro clean`, which writes it") from None
    if not text_suites:
        return [], [], f"no out-of-domain suite ({path} has no rows)"
    # ``languages`` are params.yaml's, which make_plan has checked the model was trained on
    suites, notes = out_of_domain_suites(text_suites, model.tokenizer, languages, cap)
    none = None if suites else f"no out-of-domain suite of the evaluated languages in {path}"
    return suites, notes, none
