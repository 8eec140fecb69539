"""A URL source whose server answers with an HTML page (a landing or login page) is refused, not read as text."""
from __future__ import annotations

import gzip

import pytest

from tests.helpers.http_server import FileServer, _Handler
from tests.integration.test_download import (assert_no_leftovers, assert_one_error_line, make_project, run_cli_in,
                                             seed_previous_output, snapshot, text_bytes)
from pipeline.sources.http import partial_path

PAGE = b"<!DOCTYPE html>\n<html>\n<head><title>Download</title></head>\n<body>\n<a href='/x.txt.gz'>get it</a>\n" \
       b"</body>\n</html>\n"


class _TypedHandler(_Handler):
    """The helper's handler, plus the Content-Type header that ``content_types[name]`` names."""

    def end_headers(self):
        content_type = self.server.state.content_types.get(self.path.lstrip("/"))  # type: ignore[attr-defined]
        if content_type:
            self.send_header("Content-Type", content_type)
        super().end_headers()


@pytest.fixture
def server():
    srv = FileServer()
    srv.content_types = {}  # type: ignore[attr-defined]
    srv.httpd.RequestHandlerClass = _TypedHandler
    yield srv
    srv.close()


@pytest.mark.parametrize("max_lines", [None, 5], ids=["whole-file", "streamed-head"])
@pytest.mark.parametrize("fmt", ["text", "tsv", "moses"])
def test_an_html_page_is_refused_with_its_content_type(tmp_path, server, fmt, max_lines):
    server.files["page"] = PAGE
    server.content_types["page"] = "text/html; charset=utf-8"
    source = {"name": "web", "kind": "url", "url": server.url("page"), "format": fmt, "languages": ["en", "fr"]}
    if fmt == "tsv":
        source["columns"] = {"en": 0, "fr": 1}
    if fmt != "text":
        source["parallel"] = True
    else:
        source["languages"] = ["en"]
    if max_lines:
        source["max_lines"] = max_lines
    proj = make_project(tmp_path, [source])
    before = seed_previous_output(proj)
    part = partial_path(proj / "data/.download-cache", server.url("page"))
    proc = run_cli_in(proj)
    line = assert_one_error_line(proc, "download.sources[0] (web)", server.url("page"), "HTML page",
                                 "'text/html; charset=utf-8'")
    assert len(line) < 400
    assert len(server.requests_for("page")) == 1  # not retried: the URL is wrong, not the network
    assert snapshot(proj / "data/raw") == before
    assert not part.exists()
    assert_no_leftovers(proj)


def test_the_same_bytes_as_text_plain_or_without_a_content_type_are_read(tmp_path, server):
    """The refusal rests on the server's word only: a plain-text or untyped reply (even gzip) goes through."""
    lines = [f"sentence number {i} in English" for i in range(1, 21)]
    server.files["a.txt"] = text_bytes(lines)
    server.content_types["a.txt"] = "text/plain; charset=utf-8"
    server.files["b.txt.gz"] = gzip.compress(text_bytes(lines))
    proj = make_project(tmp_path, [{"name": "a", "kind": "url", "url": server.url("a.txt"), "languages": ["en"]},
                                   {"name": "b", "kind": "url", "url": server.url("b.txt.gz"), "languages": ["en"]}])
    proc = run_cli_in(proj)
    assert proc.returncode == 0, proc.stderr
    for name in ("a", "b"):
        rows = (proj / "data/raw" / name / "en.tsv").read_text(encoding="utf-8").splitlines()
        assert [r.split("\t")[1] for r in rows] == lines
