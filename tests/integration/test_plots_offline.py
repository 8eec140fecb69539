"""`dvc plots show` and `dvc plots diff` pages draw every chart with no network at all.

DVC's own page loads Vega from a CDN: offline, every chart is blank. The repository's ``.dvc/config`` names
``pipeline/plots/page.html`` instead, which carries Vega, Vega-Lite and vega-embed inline. Here a real git + DVC
project with this checkout's dvc.yaml, params.yaml, ``.dvc/config`` and page gets the files a run writes, written by
the pipeline's own writers (DVCLive through ``DVCLiveSink``, the evaluate stage's rows and PNGs through
``pipeline.eval_report``); real DVC renders the page; headless Chromium, with every request for the network sent to a
closed port, opens it from ``file://`` and dumps the DOM once its scripts ran. Every chart of dvc.yaml must have drawn
an SVG with one line per source file (marks), every image must be there, and no chart may show an error.
"""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from tests.helpers.project import ROOT, dvc, new_git_dvc_repo, run

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="/usr/bin/chromium is missing (Debian package chromium; .ci/run installs it): the page cannot be drawn")
DATA_SUFFIXES = {".json", ".tsv", ".csv", ".yaml", ".yml"}   # what DVC draws with Vega; .png is an <img>


# ------------------------------------------------------------------------------------------------- the project
def write_training_curves(proj: Path, languages: list[str], pairs: list[str], scale: float) -> None:
    """What pretrain's DVCLive sink writes for a 400-step run (every figure TrainLog and validate produce)."""
    from xlm_core.train.sinks import DVCLiveSink

    sink = DVCLiveSink(proj / "dvclive" / "pretrain", resume_step=None)
    for step in range(10, 410, 10):
        decay = math.exp(-3 * step / 400)
        sink.log("train", step, {
            "train/loss": scale * (5 * decay + 1.5), "train/mlm_loss": scale * (5 * decay + 1.6),
            "train/tlm_loss": scale * (4 * decay + 1.4), "train/tr_loss": scale * (3 * decay + 0.4),
            "train/lr": scale * 1e-3 * min(1.0, step / 100), "train/row_length": float(min(128, 16 * 2 ** (step // 100))),
            "train/tokens_per_s": scale * (14000 + 500 * math.sin(step)), "train/mfu": 0.05, "train/hfu": 0.06,
            "train/grad_norm": 2.0 - step / 400, "train/skipped_steps": 0.0})
        if step % 50 == 0:
            figures = {}
            for i, lang in enumerate(languages):
                figures[f"valid/mlm_loss/{lang}"] = scale * (5 * decay + 1.5 + 0.2 * i)
                figures[f"valid/mlm_accuracy/{lang}"] = 0.3 * step / 400 + 0.02 * i
            for i, pair in enumerate(pairs):
                figures[f"valid/tlm_loss/{pair}"] = scale * (4 * decay + 1.4 + 0.2 * i)
                figures[f"valid/tlm_accuracy/{pair}"] = 0.25 * step / 400 + 0.02 * i
            figures.update({"valid/mlm_loss/unigram": 5.9, "valid/mlm_accuracy/unigram": 0.08})   # flat references
            sink.log("valid", step, figures)
    sink.close()


def write_evaluation(proj: Path, languages: list[str], pairs: list[str]) -> None:
    """reports/eval/*.json and *.png as the evaluate stage writes them (pipeline.eval_report.write_outputs)."""
    from pipeline.eval_report import perplexity_bars, plot_rows, retrieval_heatmap, save_png
    from xlm_core.atomic import write_json

    directions = [d for pair in pairs for d in (pair, "-".join(reversed(pair.split("-"))))]
    per_model = {name: {**{("mlm_perplexity", lang): base + 30 * i for i, lang in enumerate(languages)},
                        **{("retrieval_accuracy", d): acc + 0.03 * i for i, d in enumerate(directions)}}
                 for name, base, acc in (("trained", 85.0, 0.5), ("baseline", 330.0, 0.03))}
    out = proj / "reports" / "eval"
    out.mkdir(parents=True)
    write_json(out / "perplexity.json", plot_rows(per_model, "mlm_perplexity", "language", languages))
    write_json(out / "retrieval.json", plot_rows(per_model, "retrieval_accuracy", "direction", directions))
    save_png(retrieval_heatmap(per_model, languages, "cosine"), out / "retrieval.png")
    save_png(perplexity_bars(per_model, languages), out / "perplexity.png")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A committed git + DVC project holding one run's curves and evaluation, configured as this repository is."""
    proj = new_git_dvc_repo(tmp_path_factory.mktemp("plots") / "proj")
    shutil.copy(ROOT / ".dvc" / "config", proj / ".dvc" / "config")   # plots.html_template, as a user's clone has it
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, proj / name)
    shutil.copytree(ROOT / "pipeline" / "plots", proj / "pipeline" / "plots",
                    ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    params = yaml.safe_load((proj / "params.yaml").read_text(encoding="utf-8"))
    write_training_curves(proj, params["languages"], params["pairs"], scale=1.0)
    write_evaluation(proj, params["languages"], params["pairs"])
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "a run"], proj)   # `dvc plots diff` reads HEAD's curves from git (cache: false)
    return proj


# ----------------------------------------------------------------------------------------------- the browser
def rendered_dom(page: Path, profile: Path) -> str:
    """The page's DOM after its scripts ran, from headless Chromium that cannot reach any network."""
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox",   # no sandbox: CI runs as root in a container
           "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run",
           f"--user-data-dir={profile}",
           # every http(s) request goes to a closed port and no host name resolves: a machine with no internet
           "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--window-size=1400,3000", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and "</html>" in proc.stdout, f"chromium failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Charts(HTMLParser):
    """Per chart (a <div id> directly in <main>, as the page lays DVC's divs out): its <svg> elements, its drawn
    marks by kind (Vega's SVG draws each line or bar as a <path d="M..."> inside <g class="mark-KIND ...">), the
    texts of its SVG, its <img> elements and any error the page wrote."""

    def __init__(self):
        super().__init__()
        self.stack: list[tuple[str, str | None, str | None]] = []   # (tag, chart id, mark kind)
        self.svgs: dict[str, int] = {}
        self.marks: dict[str, dict[str, int]] = {}
        self.texts: dict[str, list[str]] = {}
        self.images: dict[str, int] = {}
        self.errors: list[str] = []
        self.in_error = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        parent_tag, chart, kind = self.stack[-1] if self.stack else (None, None, None)
        if tag == "div" and parent_tag == "main" and attrs.get("id"):
            chart = attrs["id"]
            for table in (self.svgs, self.images):
                table.setdefault(chart, 0)
            self.marks.setdefault(chart, {})
        classes = (attrs.get("class") or "").split()
        kind = next((c[len("mark-"):] for c in classes if c.startswith("mark-")), kind)
        if chart and tag == "svg":
            self.svgs[chart] += 1
        if chart and tag == "img":
            self.images[chart] += 1
        if chart and tag == "path" and kind and (attrs.get("d") or "").startswith("M"):
            self.marks[chart][kind] = self.marks[chart].get(kind, 0) + 1
        self.in_error = "plot-error" in classes
        if tag not in VOID:
            self.stack.append((tag, chart, kind))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        chart = self.stack[-1][1] if self.stack else None
        if self.in_error and data.strip():
            self.errors.append(data.strip())
        if chart and self.stack[-1][0] == "text":
            self.texts.setdefault(chart, []).append(data.strip())


def parse(dom: str) -> Charts:
    charts = Charts()
    charts.feed(dom)
    return charts


def declared_charts(proj: Path) -> tuple[dict[str, int], list[str]]:
    """From dvc.yaml: {div id: number of sources} of every Vega chart (top-level plots, then stages' data plots) and
    the div ids of the images. DVC names a div after its plot id (dvc_render Renderer.remove_special_chars)."""
    from dvc_render.base import Renderer

    spec = yaml.safe_load((proj / "dvc.yaml").read_text(encoding="utf-8"))
    vega, images = {}, []
    for item in spec.get("plots") or []:
        plot_id, props = next(iter(item.items())) if isinstance(item, dict) else (item, None)
        y = (props or {}).get("y")
        vega[Renderer.remove_special_chars(plot_id)] = len(y) if isinstance(y, dict) else 1
    for stage in spec["stages"].values():
        for item in stage.get("plots") or []:
            path = item if isinstance(item, str) else next(iter(item))
            if Path(path).suffix in DATA_SUFFIXES:
                vega[Renderer.remove_special_chars(path)] = 1
            else:
                images.append(Renderer.remove_special_chars(path))
    return vega, images


def assert_every_chart_drew(proj: Path, out: Path, revisions: int) -> Charts:
    page = out / "index.html"
    html = page.read_text(encoding="utf-8")
    assert "<script src" not in html and "cdn.jsdelivr" not in html, "the page still loads a script from elsewhere"
    charts = parse(rendered_dom(page, out.parent / f"{out.name}-chromium"))
    vega, images = declared_charts(proj)
    assert not charts.errors, charts.errors
    for chart, sources in vega.items():
        assert charts.svgs.get(chart, 0) >= 1, f"chart {chart!r} drew no <svg> (charts found: {sorted(charts.svgs)})"
        marks = charts.marks[chart]
        assert marks.get("line", 0) + marks.get("rect", 0) >= 1, f"chart {chart!r} drew no line or bar: {marks}"
        if marks.get("line"):   # a line per source file and revision: no source was dropped
            assert marks["line"] >= sources * revisions, f"chart {chart!r}: {marks['line']} lines, {sources} sources"
    for chart in images:
        assert charts.images.get(chart, 0) == revisions, f"image {chart!r}: {charts.images.get(chart)} <img>"
    for img in (out / "static").glob("*.png"):
        assert img.stat().st_size > 0
    return charts


# ------------------------------------------------------------------------------------------------------- tests
def test_the_page_carries_the_pinned_vega_builds_and_dvc_uses_it():
    from pipeline.plots import vendor

    assert vendor.problems(vendor.PAGE.read_text(encoding="utf-8")) == []
    config = (ROOT / ".dvc" / "config").read_text(encoding="utf-8")
    assert "html_template = ../pipeline/plots/page.html" in config   # relative to .dvc/, as DVC resolves it


@needs_chromium
def test_plots_show_draws_every_chart_offline(project):
    shown = dvc(project, "plots", "show")
    # a missing file means dvc.yaml's plot lines and params.yaml's languages/pairs disagree
    assert "failed to load" not in shown.stdout + shown.stderr, shown.stderr
    charts = assert_every_chart_drew(project, project / "dvc_plots", revisions=1)
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    # one revision: each language its own colour, its legend label the bare language code
    assert set(params["languages"]) <= set(charts.texts["valid-mlm-loss"]), charts.texts["valid-mlm-loss"]
    assert set(params["pairs"]) <= set(charts.texts["valid-tlm-accuracy"]), charts.texts["valid-tlm-accuracy"]
    assert next(iter(charts.marks)) == "train-loss"   # what matters first


@needs_chromium
def test_plots_diff_draws_every_chart_offline(project, tmp_path):
    proj = tmp_path / "proj"
    shutil.copytree(project, proj, symlinks=True)
    shutil.rmtree(proj / "dvc_plots", ignore_errors=True)
    params = yaml.safe_load((proj / "params.yaml").read_text(encoding="utf-8"))
    write_training_curves(proj, params["languages"], params["pairs"], scale=0.9)   # a second run in the workspace
    dvc(proj, "plots", "diff", "HEAD")
    assert_every_chart_drew(proj, proj / "dvc_plots", revisions=2)
