"""An eval-role source end to end: a test-built wheel of .po catalogues fetched by real pip (find_links, no network),
read by the download stage, turned into data/clean/eval/suites.parquet by clean, kept out of the training text, and
the training text decontaminated against it; under every task runner the same bytes."""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers.po_wheel import PO_PATTERN, make_po_wheel, webapp_catalogues
from tests.helpers.project import project_env, python_module, run
from pipeline.clean import clean
from pipeline.cleaning.eval_suites import build_eval_suites
from pipeline.cleaning.plan import EvalSource
from pipeline.download import download
from pipeline.errors import PipelineError
from pipeline.fanout import InlineExecutor
from pipeline.params import CleanParams, load_params
from pipeline.sources.po import entry_key
from xlm_core.cleaning.split import SPLITS, salt_key, split_of
from xlm_core.evaluation.suite_file import read_suites

N = 120
BASE = {"en": "The shepherd walks the hills at dawn", "fr": "Le berger marche dans les collines",
        "es": "El pastor camina por las colinas"}
EVAL_SOURCE = {"name": "webapp", "kind": "pypi", "package": "webapp==1.0", "path": PO_PATTERN, "format": "po",
               "role": "eval", "parallel": True, "languages": ["en", "fr", "es"]}


def train_ids(count: int, skip: set[int] = frozenset()) -> list[int]:
    """Line numbers of the toy source whose ids the clean split (20 % valid, 20 % test) puts in train."""
    key = salt_key("xlm-pipeline")
    found = [i for i in range(1, N + 1) if i not in skip and split_of(f"toy:{i:09d}", key, 0.2, 0.2) == 0]
    return found[:count]


def make_project(root: Path, eval_source: dict | None = None, plant: bool = True, **clean_keys) -> Path:
    """params.yaml for download + clean, a parallel training source on disk and the webapp wheel."""
    root.mkdir(parents=True, exist_ok=True)
    make_po_wheel(root / "wheels", webapp_catalogues())
    lines = {lang: [f"{text} {i}" for i in range(1, N + 1)] for lang, text in BASE.items()}
    if plant:
        en_line, fr_line, cross_line = train_ids(3)
        lines["en"][en_line - 1] = "Delete  selected <b>items</b>"  # normalises to an English suite text
        lines["fr"][fr_line - 1] = "Supprimer les éléments sélectionnés"  # a French suite text
        lines["fr"][cross_line - 1] = "Change password"  # an English suite text, in French: not the same language
    for lang, rows in lines.items():
        (root / f"{lang}.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    source = {**EVAL_SOURCE, "find_links": str(root / "wheels"), **(eval_source or {})}
    params = {"languages": ["en", "fr", "es"], "pairs": ["en-fr", "en-es"],
              "download": {"sources": [
                  {"name": "toy", "kind": "local", "format": "text", "parallel": True, "languages": ["en", "fr", "es"],
                   "paths": {lang: str(root / f"{lang}.txt") for lang in BASE}},
                  source], "timeout_s": 10, "retries": 0},
              "clean": {"split": {"valid": 0.2, "test": 0.2}, "batch_rows": 100, **clean_keys}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return root


def run_both(root: Path, name: str = "clean", executor=None) -> tuple[dict, Path]:
    if not (root / "raw").exists():
        download(load_params("download", root / "params.yaml"), root / "raw")
    out = root / name
    metrics = clean(load_params("clean", root / "params.yaml"), root / "raw", out, root / f"{name}.json",
                    executor=executor)
    return metrics, out


def training_texts(out: Path) -> dict[str, set[str]]:
    """Language -> every text of the training split, mono and para."""
    texts: dict[str, set[str]] = {}
    for row in pq.read_table(out / "mono" / "train.parquet").to_pylist():
        texts.setdefault(row["lang"], set()).add(row["text"])
    for row in pq.read_table(out / "para" / "train.parquet").to_pylist():
        texts.setdefault(row["src_lang"], set()).add(row["src"])
        texts.setdefault(row["tgt_lang"], set()).add(row["tgt"])
    return texts


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """One downloaded and cleaned project (thread runner), shared by the tests that only read it."""
    root = make_project(tmp_path_factory.mktemp("eval") / "proj")
    metrics, out = run_both(root)
    return root, metrics, out


# -------------------------------------------------------------------------------------------------- download
def test_download_fetches_the_wheel_with_pip_and_writes_an_aligned_raw_source(project):
    root, _, _ = project
    raw = root / "raw" / "webapp"
    manifest = json.loads((raw / "manifest.json").read_text())
    assert manifest["role"] == "eval" and manifest["pairs"] is None and manifest["format"] == "po"
    assert manifest["counts"] == {"en": 8, "fr": 7, "es": 3}
    assert manifest["catalogues"]["kept"] == {"fr": 7, "es": 3}
    assert manifest["catalogues"]["skipped_locales"] == ["fr_CA"]
    assert manifest["fetched"][0]["file"] == "webapp-1.0-py3-none-any.whl"
    assert json.loads((root / "raw" / "toy" / "manifest.json").read_text())["role"] == "train"
    fr = dict(line.split("\t") for line in (raw / "fr.tsv").read_text().splitlines())
    assert fr[f"webapp:{entry_key(None, 'Delete selected items')}"] == "Supprimer les éléments sélectionnés"
    assert not [p for p in (root / "raw").parent.iterdir() if ".tmp-" in p.name]


# ----------------------------------------------------------------------------------------------------- clean
def test_clean_writes_the_suites_and_no_eval_text_is_training_text(project):
    _, metrics, out = project
    suites = {s.name: s for s in read_suites(out / "eval" / "suites.parquet")}
    assert sorted(suites) == ["webapp:en-es", "webapp:en-fr"]  # the configured pairs the source covers
    en_fr = suites["webapp:en-fr"]
    assert en_fr.domain == "out_of_domain" and len(en_fr.ids) == 6
    pairs = dict(zip(en_fr.src, en_fr.tgt))
    assert pairs["Log out of the site"] == "Se déconnecter du site & partir"  # normalised as training text is
    assert pairs["Delete selected items"] == "Supprimer les éléments sélectionnés"
    assert en_fr.ids == sorted(en_fr.ids)
    # "May of the year" twice (with and without msgctxt): a tie retrieval cannot break; the first id keeps it
    may = sorted(f"webapp:{entry_key(c, 'May of the year')}" for c in ("month", None))
    assert may[0] in en_fr.ids and may[1] not in en_fr.ids
    for suite in suites.values():
        assert len(set(suite.src)) == len(suite.src) and len(set(suite.tgt)) == len(suite.tgt)
    assert len(suites["webapp:en-es"].ids) == 3
    # the eval source is no training text at all: none of its ids in any split, mono or para
    for kind in ("mono", "para"):
        for split in SPLITS:
            assert not [i for i in pq.read_table(out / kind / f"{split}.parquet").column("id").to_pylist()
                        if i.startswith("webapp:")]
    train = training_texts(out)
    for suite in suites.values():
        assert not set(suite.src) & train[suite.src_lang] and not set(suite.tgt) & train[suite.tgt_lang]
    assert "Change password" in train["fr"]  # decontamination is per language: an English text in French stays
    evals = metrics["eval"]["webapp"]
    assert evals["pairs"]["en-fr"]["rows_out"] == {"eval": 6} and evals["languages"]["en"]["rows_in"] == 8
    assert evals["pairs"]["en-fr"]["dropped"]["duplicate"] == 1 and evals["pairs"]["en-es"]["dropped"]["duplicate"] == 0
    for counts in evals["pairs"].values():
        assert counts["rows_in"] == sum(counts["dropped"].values()) + sum(counts["rows_out"].values())
    assert set(metrics["sources"]) == {"toy"}  # training sources only


def test_decontamination_drops_the_planted_sentences_and_their_pairs_and_counts_them(project, tmp_path):
    root, metrics, out = project
    assert {lang: c["dropped"]["decontaminated"] for lang, c in metrics["languages"].items()} == \
        {"en": 1, "fr": 1, "es": 0}
    assert metrics["pairs"]["en-fr"]["dropped"]["decontaminated"] == 2  # the English plant and the French one
    assert metrics["pairs"]["en-es"]["dropped"]["decontaminated"] == 1  # the English plant's partner goes too
    en_line, fr_line, _ = train_ids(3)
    pairs = pq.read_table(out / "para" / "train.parquet").to_pylist()
    en_fr = {r["id"] for r in pairs if r["tgt_lang"] == "fr"}
    en_es = {r["id"] for r in pairs if r["tgt_lang"] == "es"}
    assert f"toy:{en_line:09d}" not in en_fr | en_es and f"toy:{fr_line:09d}" not in en_fr
    assert f"toy:{fr_line:09d}" in en_es  # neither of its sides is an eval text
    assert f"toy:{en_line:09d}" not in {r["id"] for r in pq.read_table(out / "mono" / "train.parquet").to_pylist()
                                         if r["lang"] == "en"}
    # clean.decontaminate: false keeps them (the suites are the same file)
    off = make_project(tmp_path / "off", decontaminate=False)
    metrics_off, out_off = run_both(off)
    assert all(c["dropped"]["decontaminated"] == 0 for c in metrics_off["languages"].values())
    assert "Delete selected items" in training_texts(out_off)["en"]
    assert (out_off / "eval" / "suites.parquet").read_bytes() == (out / "eval" / "suites.parquet").read_bytes()


def test_a_repeated_text_within_a_pair_keeps_its_first_id_only(tmp_path):
    raw = {"en": ["a\tOpen the file", "b\tOpen the file", "c\tClose the file", "d\tSave the file",
                  "e\tPrint the file"],
           "fr": ["a\tOuvrir le fichier", "b\tOuvrir le document", "c\tFermer", "d\tFermer",
                  "e\tOuvrir le document"]}
    files = {}
    for lang, lines in raw.items():
        files[lang] = tmp_path / f"{lang}.tsv"
        files[lang].write_text("\n".join(lines) + "\n", encoding="utf-8")
    built = build_eval_suites((EvalSource("src", files, (("en", "fr"),)),), CleanParams())
    (suite,) = built.suites
    # b repeats a's English, d repeats c's French; e repeats the French of b, which was dropped: e stays
    assert suite.ids == ["a", "c", "e"]
    counts = built.metrics["src"]["pairs"]["en-fr"]
    assert counts["dropped"]["duplicate"] == 2 and counts["rows_out"] == {"eval": 3} and counts["rows_in"] == 5


def test_own_pairs_restrict_the_suites(tmp_path):
    root = make_project(tmp_path / "p", {"pairs": ["fr-es"]}, plant=False)
    metrics, out = run_both(root)
    (suite,) = read_suites(out / "eval" / "suites.parquet")
    assert suite.name == "webapp:fr-es" and len(suite.ids) == 2  # the ids translated in both
    assert list(metrics["eval"]["webapp"]["pairs"]) == ["fr-es"]


def _digests(out: Path, metrics: Path) -> dict[str, str]:
    files = sorted(p for p in out.rglob("*") if p.is_file())
    return {**{str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files},
            "metrics": hashlib.sha256(metrics.read_bytes()).hexdigest()}


def test_every_runner_writes_the_same_bytes(project, monkeypatch):
    root, _, _ = project
    run_both(root, "serial", executor=InlineExecutor())
    with ThreadPoolExecutor(4) as pool:
        run_both(root, "threads", executor=pool)
    reference = _digests(root / "serial", root / "serial.json")
    assert "eval/suites.parquet" in reference
    assert _digests(root / "threads", root / "threads.json") == reference
    assert _digests(root / "clean", root / "clean.json") == reference  # clean.task_runner: thread (the default)
    pytest.importorskip("distributed", reason="the dask extra: pip install -e '.[dask]'")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["clean"]["task_runner"] = "dask"  # a temporary local cluster: units run in other processes
    dask_params = root / "dask-params.yaml"
    dask_params.write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    clean(load_params("clean", dask_params), root / "raw", root / "dask", root / "dask.json")
    assert _digests(root / "dask", root / "dask.json") == reference


# ----------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("change, message", [
    ({"role": "test"}, "download.sources[1].role = 'test': Input should be 'train' or 'eval'"),
    ({"parallel": False}, "role eval makes retrieval suites of aligned sentences: the source needs parallel: true"),
    ({"role": "train", "pairs": ["en-fr"]}, "download.sources[1].pairs = ['en-fr']: only a role: eval source"),
    ({"pairs": ["en-de"]}, "download.sources[1].pairs = 'en-de' uses ['de'], not in the source's languages"),
    ({"languages": ["fr", "es"]}, "format po pairs each msgid (en) with its translations"),
    ({"kind": "local", "package": None, "find_links": None},
     "download.sources[1].format = 'po': format po is read from the files of a wheel: use kind: pypi"),
])
def test_bad_eval_source_params_are_one_line(tmp_path, change, message):
    root = make_project(tmp_path / "p", plant=False)
    params = yaml.safe_load((root / "params.yaml").read_text())
    source = params["download"]["sources"][1]
    source.update(change)
    for key in [k for k, v in change.items() if v is None]:
        del source[key]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    proc = run(python_module("pipeline.download", "--out", str(root / "raw")), root, check=False, env=project_env(),
               timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: [download]")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert message in errors[0], errors[0]
    assert not (root / "raw").exists()


def test_an_eval_source_covering_no_configured_pair_is_refused_by_clean(project, tmp_path):
    root, _, _ = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["languages"], params["pairs"] = ["en", "fr"], []
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    with pytest.raises(PipelineError, match=r"source 'webapp' \(role eval, languages \['en', 'fr', 'es'\]\) covers "
                                            r"none of the configured pairs \[\]; give it pairs:"):
        clean(load_params("clean", tmp_path / "params.yaml"), root / "raw", tmp_path / "clean",
              tmp_path / "clean.json")
    assert not (tmp_path / "clean").exists()
