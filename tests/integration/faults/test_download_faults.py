"""Bad sources and bad params through the download CLI, as a user meets them: one line, exit 2, data/raw untouched.

Rows of docs/errors.md whose existing tests (tests/integration/test_download.py, tests/integration/test_params.py) call the library rather
than the CLI, or do not check the earlier output, are tested here end to end.
"""
from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import socket
import stat
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.helpers.faults import assert_one_error_line, leftovers, tree_digest
from tests.helpers.project import project_env, run
from tests.helpers.http_server import FileServer

TEXT = "".join(f"sentence number {i} in plain English\n" for i in range(1, 401)).encode()


@pytest.fixture
def server():
    srv = FileServer()
    yield srv
    srv.close()


def project(tmp_path: Path, source: dict, languages=("en",), **download) -> Path:
    """A folder with params.yaml naming ``source`` and a previous data/raw the failing run must leave alone."""
    proj = tmp_path / "proj"
    (proj / "data" / "raw" / "old").mkdir(parents=True)
    (proj / "data" / "raw" / "old" / "en.tsv").write_text("old:000000001\tkeep me\n")
    (proj / "data" / "raw" / "manifest.json").write_text('{"sources": ["old"]}\n')
    section = {"sources": [source], "timeout_s": 5, "retries": 1, "backoff_s": 0.01, **download}
    (proj / "params.yaml").write_text(yaml.safe_dump({"languages": list(languages), "download": section},
                                                     sort_keys=False, allow_unicode=True))
    return proj


def download_cli(proj: Path):
    return run([sys.executable, "-m", "pipeline.download"], proj, check=False, env=project_env(), timeout=300)


def assert_fails_cleanly(proj: Path, *fragments: str) -> str:
    before = tree_digest(proj / "data" / "raw")
    line = assert_one_error_line(download_cli(proj), "download", *fragments)
    assert tree_digest(proj / "data" / "raw") == before
    assert leftovers(proj / "data") == []
    return line


# --------------------------------------------------------------------------------------------------------- network
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("url, reason", [
    ("http://no-such-host.invalid/corpus.txt", "host name lookup failed"),   # RFC 6761: never resolves
    (None, "connection refused"),
])
def test_unreachable_host_is_one_line_after_retries(tmp_path, url, reason):
    url = url or f"http://127.0.0.1:{closed_port()}/corpus.txt"
    proj = project(tmp_path, {"name": "web", "kind": "url", "url": url, "languages": ["en"]})
    assert_fails_cleanly(proj, "download.sources[0] (web)", url, "failed after 2 attempts", reason,
                         "check the URL and your network")


def test_http_500_is_retried_then_one_line(tmp_path, server):
    server.files["corpus.txt"] = TEXT
    server.fail_5xx["corpus.txt"] = 100
    proj = project(tmp_path, {"name": "web", "kind": "url", "url": server.url("corpus.txt"), "languages": ["en"]})
    assert_fails_cleanly(proj, server.url("corpus.txt"), "HTTP 500", "raise download.retries")
    assert len(server.requests_for("corpus.txt")) == 2


def test_checksum_mismatch_is_one_line_and_the_download_is_deleted(tmp_path, server):
    server.files["corpus.txt"] = TEXT
    proj = project(tmp_path, {"name": "web", "kind": "url", "url": server.url("corpus.txt"), "languages": ["en"],
                              "sha256": "0" * 64})
    assert_fails_cleanly(proj, "sha256 mismatch", "expected " + "0" * 64, "fix sha256")
    cache = proj / "data" / ".download-cache"
    assert not [p for p in cache.iterdir() if p.suffix == ".part"]


# ---------------------------------------------------------------------------------------------- corrupt archives
def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _flip_middle(data: bytes) -> bytes:
    out = bytearray(data)
    out[len(out) // 2] ^= 0xFF
    return bytes(out)


CORRUPT = {
    "gz_truncated": ("corpus.txt.gz", lambda: gzip.compress(TEXT)[:-200], "corrupt or truncated compressed data"),
    "gz_flipped": ("corpus.txt.gz", lambda: _flip_middle(gzip.compress(TEXT)), "corrupt or truncated compressed data"),
    "xz_truncated": ("corpus.txt.xz", lambda: lzma.compress(TEXT)[:-100], "corrupt or truncated compressed data"),
    "bz2_truncated": ("corpus.txt.bz2", lambda: bz2.compress(TEXT)[:-100], "corrupt or truncated compressed data"),
    "zip_truncated": ("corpus.zip", lambda: _zip_bytes({"corpus.txt": TEXT})[:-30], "not a valid zip archive"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_compressed_file_is_one_line(tmp_path, case):
    name, make, message = CORRUPT[case]
    (tmp_path / name).write_bytes(make())
    proj = project(tmp_path, {"name": "local", "kind": "local", "path": str(tmp_path / name), "languages": ["en"]})
    assert_fails_cleanly(proj, "download.sources[0] (local)", name, message)


def _zip_with_symlink() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("corpus.txt", TEXT)
        link = zipfile.ZipInfo("notes.txt")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    return buf.getvalue()


def _tar_with(member: tarfile.TarInfo) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("corpus.txt")
        info.size = len(TEXT)
        tar.addfile(info, io.BytesIO(TEXT))
        tar.addfile(member, io.BytesIO(b"x") if member.isreg() else None)
    return buf.getvalue()


def _tar_member(name: str, link: str | None = None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    if link is None:
        info.size = 1
    else:
        info.type, info.linkname = tarfile.SYMTYPE, link
    return info


UNSAFE = {
    "zip_dotdot": ("c.zip", lambda: _zip_bytes({"corpus.txt": TEXT, "../evil.txt": b"x"}), "'../evil.txt'",
                   "a '..' component"),
    "zip_absolute": ("c.zip", lambda: _zip_bytes({"corpus.txt": TEXT, "/tmp/evil.txt": b"x"}), "'/tmp/evil.txt'",
                     "an absolute path"),
    "zip_symlink": ("c.zip", _zip_with_symlink, "'notes.txt'", "a symbolic link"),
    "tar_dotdot": ("c.tgz", lambda: _tar_with(_tar_member("../../evil.txt")), "'../../evil.txt'", "a '..' component"),
    "tar_symlink": ("c.tgz", lambda: _tar_with(_tar_member("notes.txt", "/etc/passwd")), "'notes.txt'",
                    "a symbolic link"),
}


@pytest.mark.parametrize("case", list(UNSAFE))
def test_archive_member_escaping_its_folder_is_refused(tmp_path, case):
    name, make, member, reason = UNSAFE[case]
    (tmp_path / name).write_bytes(make())
    proj = project(tmp_path, {"name": "arc", "kind": "local", "path": str(tmp_path / name), "member": "corpus.txt",
                              "languages": ["en"]})
    assert_fails_cleanly(proj, "refusing archive member", member, reason, "use another download")
    assert not list(tmp_path.rglob("evil.txt"))


# ------------------------------------------------------------------------------------------------ unusable lines
@pytest.mark.parametrize("content, counted", [
    (b"\xff\xfe not utf-8\n\xc3\x28 nor this\n\xa0\xa1\n", "3 invalid UTF-8"),
    (b"nul \x00 here\n\x00\x00\nand\x00\n", "3 with NUL bytes"),
    (b"\n   \n\t\n", "3 blank"),
])
def test_language_without_a_usable_line_is_one_line(tmp_path, content, counted):
    (tmp_path / "en.txt").write_bytes(content)
    proj = project(tmp_path, {"name": "local", "kind": "local", "path": str(tmp_path / "en.txt"),
                              "languages": ["en"]})
    assert_fails_cleanly(proj, "no segment for 'en' in 3 lines read", counted, "check the file")


# The stage's peak RSS: VmHWM of its own address space (ru_maxrss would start at the forking pytest's size).
MAX_RSS = """
import runpy, sys
sys.argv = ["pipeline.download"]
code = 0
try:
    runpy.run_module("pipeline.download", run_name="__main__")
except SystemExit as exc:
    code = exc.code
hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(f"max_rss_kb {hwm}", file=sys.stderr)
sys.exit(code)
"""


def test_a_100_mb_line_is_dropped_and_counted_in_bounded_memory(tmp_path):
    path = tmp_path / "en.txt"
    with open(path, "wb") as fh:
        fh.write(b"the first sentence\n")
        for _ in range(100):
            fh.write(b"word " * 200_000)      # 100 lines of 1 MB... on one line: 100 MB, no line break
        fh.write(b"\nthe last sentence\n")
    proj = project(tmp_path, {"name": "big", "kind": "local", "path": str(path), "languages": ["en"]})
    proc = run([sys.executable, "-c", MAX_RSS], proj, check=False, env=project_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rss_mb = int(proc.stderr.split("max_rss_kb ")[1].split()[0]) / 1024
    assert rss_mb < 250, f"peak RSS {rss_mb:.0f} MB for a 100 MB line"
    manifest = json.loads((proj / "data" / "raw" / "big" / "manifest.json").read_text())
    assert manifest["long_lines"] == {"en": 1} and manifest["counts"] == {"en": 2}
    rows = (proj / "data" / "raw" / "big" / "en.tsv").read_text().splitlines()
    assert rows == ["big:000000001\tthe first sentence", "big:000000003\tthe last sentence"]


# ---------------------------------------------------------------------------------------------------------- params
@pytest.mark.parametrize("mutate, fragments", [
    (lambda p: p["download"].update(retrys=3), ["unknown key 'download.retrys'", "allowed keys:", "retries"]),
    (lambda p: p["download"].update(retries="many"), ["download.retries = 'many'", "valid integer"]),
    (lambda p: p["download"].update(retries=500), ["download.retries = 500", "less than or equal to 50"]),
    (lambda p: p.pop("download"), ["missing section 'download'", "add a 'download:' mapping"]),
    (lambda p: p.update(languages=["en", "xq"]), ["languages = ['en', 'xq']", "unknown language code 'xq'",
                                                  "ISO 639-1"]),
    (lambda p: p["download"]["sources"][0].update(url="ftp://example.org/c.txt"),
     ["download.sources[0].url = 'ftp://", "unsupported scheme 'ftp'", "http://, https://, file://"]),
])
def test_bad_params_are_one_line_naming_the_key(tmp_path, mutate, fragments):
    proj = project(tmp_path, {"name": "web", "kind": "url", "url": "https://example.org/c.txt", "languages": ["en"]})
    params = yaml.safe_load((proj / "params.yaml").read_text())
    mutate(params)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert_fails_cleanly(proj, "params.yaml", *fragments)
