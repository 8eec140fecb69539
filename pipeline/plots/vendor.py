"""The Vega builds inlined in ``pipeline/plots/page.html``, the HTML template of `dvc plots show` / `dvc plots diff`.

DVC's own page loads Vega, Vega-Lite and vega-embed from a CDN, so without internet every chart is blank. The
repository's ``.dvc/config`` names page.html instead (``plots.html_template``), which carries the three minified
builds itself: ``dvc_plots/index.html`` draws from ``file://`` with no network, and still does when copied elsewhere
as one file (a relative ``<script src>`` would break with ``--out`` or a copy). Each build sits in its own
``<script data-vendor="NAME" data-version="X">`` element, byte for byte as npm ships it; nothing else of page.html is
generated, so its style and script are edited by hand.

    python -m pipeline.plots.vendor           # the inlined builds are the pinned ones (offline; exit status 1 if not)
    python -m pipeline.plots.vendor --fetch   # `npm pack` the pinned versions, check them, write them in, + LICENSEs

Why these versions: DVC 3.67's plot specs declare Vega-Lite v5 (``$schema``) and its CDN tags pin vega 5 / vega-lite 5
/ vega-embed 6; these are the latest releases of those majors. To move, change a version, run ``--fetch``: it stops
and prints the new build's sha256, which goes into BUILDS once you have read the release notes.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGE = HERE / "page.html"
VENDOR = HERE / "vendor"


@dataclass(frozen=True)
class Build:
    name: str       # the npm package
    version: str
    path: str       # the minified UMD build inside the package
    sha256: str     # of that file


# In load order: vega-lite needs the `vega` global, vega-embed both.
BUILDS = (
    Build("vega", "5.33.1", "build/vega.min.js",
          "463f3db6a40b20e9747b4ed38f37ed0add508838f9141b1cf8366784b07b30c8"),
    Build("vega-lite", "5.23.0", "build/vega-lite.min.js",
          "58c27358e26f2d319cf62f45bc17a4c8362f08645001df2ec8d341eee4097c7f"),
    Build("vega-embed", "6.29.0", "build/vega-embed.min.js",
          "12d02acfbe3ec59ef9a37dd4822a2e04e2961b5bbb671bbe661d2221715b99da"),
)

# DVC fills its template with str.replace on these (dvc_render.html.HTML.embed), anywhere in the file, and an inline
# script ends at the first "</script": a build containing one would be cut or rewritten.
FORBIDDEN = ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}")

_BLOCK = r'(<script data-vendor="{name}" data-version=")[^"]*(">)(.*?)(</script>)'


def _block(name: str) -> re.Pattern:
    return re.compile(_BLOCK.format(name=re.escape(name)), re.S)


def inlined(page: str) -> dict[str, tuple[str, str]]:
    """``{name: (version, script text)}`` of the vendor blocks found in the page."""
    found = {}
    for build in BUILDS:
        match = _block(build.name).search(page)
        if match:
            version = re.search(r'data-version="([^"]*)"', match.group(0)).group(1)
            found[build.name] = (version, match.group(3))
    return found


def problems(page: str) -> list[str]:
    """What is wrong with the page's vendored builds, one line each; empty when they are the pinned ones."""
    found = inlined(page)
    out = []
    for build in BUILDS:
        if build.name not in found:
            out.append(f"{build.name}: no <script data-vendor=\"{build.name}\"> block in {PAGE.name}")
            continue
        version, text = found[build.name]
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if version != build.version or digest != build.sha256:
            out.append(f"{build.name}: inlined {version} (sha256 {digest[:12]}...), pinned {build.version} "
                       f"(sha256 {build.sha256[:12]}...): run `python -m pipeline.plots.vendor --fetch`")
    if "{plot_divs}" not in page:
        out.append(f"{PAGE.name} lacks DVC's {{plot_divs}} placeholder")
    return out


def _pack(build: Build, workdir: Path) -> tuple[str, str | None]:
    """The build's text and the package's LICENSE text (None when the package ships none) from `npm pack`."""
    spec = f"{build.name}@{build.version}"
    proc = subprocess.run(["npm", "pack", spec, "--silent"], cwd=workdir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"npm pack {spec} failed:\n{proc.stderr.strip()}")
    tarball = workdir / proc.stdout.strip().splitlines()[-1]
    with tarfile.open(tarball) as tar:
        data = tar.extractfile(f"package/{build.path}").read()
        names = tar.getnames()
        license_text = tar.extractfile("package/LICENSE").read().decode() if "package/LICENSE" in names else None
    digest = hashlib.sha256(data).hexdigest()
    if digest != build.sha256:
        raise SystemExit(f"{spec} {build.path}: sha256 {digest}, BUILDS pins {build.sha256}. If you changed the "
                         f"version on purpose, put this sha256 in BUILDS ({Path(__file__).name}) and run again.")
    text = data.decode("utf-8")
    bad = [s for s in FORBIDDEN if s in text]
    if bad:
        raise SystemExit(f"{spec} {build.path} contains {bad}: it cannot be inlined into a DVC template as is")
    return text, license_text


def fetch() -> None:
    page = PAGE.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        for build in BUILDS:
            text, license_text = _pack(build, Path(tmp))
            pattern = _block(build.name)
            if not pattern.search(page):
                raise SystemExit(f"{PAGE}: no <script data-vendor=\"{build.name}\" data-version=...> block")
            # a function, so backslashes in the build are not read as group references
            page = pattern.sub(lambda m, b=build, t=text: f"{m.group(1)}{b.version}{m.group(2)}{t}{m.group(4)}",
                               page, count=1)
            if license_text is not None:   # vega's npm package ships none: vendor/LICENSE.vega was copied by hand
                (VENDOR / f"LICENSE.{build.name}").write_text(license_text, encoding="utf-8")
    PAGE.write_text(page, encoding="utf-8")
    print(f"{PAGE}: " + ", ".join(f"{b.name} {b.version}" for b in BUILDS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fetch", action="store_true", help="npm pack the pinned builds and inline them")
    args = parser.parse_args(argv)
    if args.fetch:
        fetch()
    issues = problems(PAGE.read_text(encoding="utf-8"))
    for line in issues:
        print(line, file=sys.stderr)
    return 1 if issues else 0


if __name__ == "__main__":
    sys.exit(main())
