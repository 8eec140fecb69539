"""Peak memory and throughput of the clean stage on a synthetic multilingual corpus (default ~1 GB of raw text).

    python bench/clean_memory.py                 # ~1 GB: several minutes
    python bench/clean_memory.py --size-mb 50    # a quick run

Writes a raw corpus following docs/data-layout.md into a temporary folder (random words in Latin, Cyrillic, Arabic,
Han and Devanagari script; one 5-language parallel source plus one monolingual source; a sprinkling of duplicates,
HTML, invalid UTF-8 and too-short lines), runs `python -m pipeline.clean` on it as a subprocess, and prints seconds,
rows/s and the child's peak RSS (getrusage RUSAGE_CHILDREN), which must stay under the budget (default 500 MB) however
large the corpus: the stage streams.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Letters per script, to build random "words".
ALPHABETS = {
    "en": "abcdefghijklmnopqrstuvwxyz",
    "fr": "abcdefghijklmnopqrstuvwxyzéèàùâêîôûç",
    "ru": "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
    "ar": "".join(chr(c) for c in range(0x0627, 0x064B)),
    "zh": "".join(chr(c) for c in range(0x4E00, 0x4E00 + 3000)),
    "hi": "".join(chr(c) for c in range(0x0915, 0x093A)) + "ािीुूेैोौ",
}
PARALLEL_LANGS = ["en", "fr", "ru", "ar", "zh"]
PAIRS = ["en-fr", "en-ru", "en-ar", "en-zh", "fr-ru"]
PARALLEL_SHARE = 0.4  # of the raw bytes
WORDS_PER_LANG = 5000
LINES_PER_CHUNK = 5_000


def make_vocab(lang: str, rng: np.random.Generator) -> np.ndarray:
    letters = np.array(list(ALPHABETS[lang]))
    lo, hi = (1, 3) if lang == "zh" else (2, 10)
    return np.array(["".join(rng.choice(letters, size=rng.integers(lo, hi + 1))) for _ in range(WORDS_PER_LANG)])


def make_lines(lang: str, vocab: np.ndarray, n_words: np.ndarray, rng: np.random.Generator) -> list[str]:
    """One line per entry of n_words; a few are noisy on purpose (HTML, too short, repeated)."""
    sep = "" if lang == "zh" else " "
    picks = vocab[rng.integers(0, len(vocab), size=int(n_words.sum()))]
    ends = np.cumsum(n_words)
    lines = [sep.join(picks[e - n:e]) for n, e in zip(n_words, ends)]
    noise = rng.random(len(lines))
    for i in np.flatnonzero(noise < 0.005):
        lines[i] = f"<p>{lines[i]} &amp; <b>more</b></p>"
    for i in np.flatnonzero((noise >= 0.005) & (noise < 0.008)):
        lines[i] = lines[i][:2]
    for i in np.flatnonzero((noise >= 0.008) & (noise < 0.03)):
        lines[i] = f"{lang} boilerplate {int(noise[i] * 1000)}"  # ~20 distinct texts repeated: duplicates
    return lines


def write_chunk(fh, source: str, start: int, lines: list[str], bad: np.ndarray) -> int:
    """Write lines with ids start+1...; the ``bad`` ones get an invalid UTF-8 byte. Returns bytes written."""
    out = bytearray()
    for k, line in enumerate(lines):
        out += f"{source}:{start + k + 1:09d}\t".encode()
        out += line.encode("utf-8") + (b"\xff" if bad[k] else b"") + b"\n"
    fh.write(out)
    return len(out)


def generate(raw: Path, size_bytes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    vocab = {lang: make_vocab(lang, rng) for lang in ALPHABETS}
    sources = {"synpar": (True, PARALLEL_LANGS), "synweb": (False, list(ALPHABETS))}
    budgets = {"synpar": int(size_bytes * PARALLEL_SHARE), "synweb": size_bytes - int(size_bytes * PARALLEL_SHARE)}
    for name, (parallel, langs) in sources.items():
        folder = raw / name
        folder.mkdir(parents=True)
        files = {lang: open(folder / f"{lang}.tsv", "wb") for lang in langs}
        counts = dict.fromkeys(langs, 0)
        written = 0
        # every language gets lines in every round; small rounds for a small corpus, so none is left empty
        per_round = int(max(50, min(LINES_PER_CHUNK, budgets[name] // (len(langs) * 150))))
        try:
            while written < budgets[name]:
                n_words = rng.integers(4, 30, size=per_round)  # shared by all languages: aligned lengths
                for lang in langs:
                    lines = make_lines(lang, vocab[lang], n_words if parallel else rng.integers(4, 30, per_round), rng)
                    written += write_chunk(files[lang], name, counts[lang], lines, rng.random(len(lines)) < 0.001)
                    counts[lang] += len(lines)
        finally:
            for fh in files.values():
                fh.close()
        manifest = {"source": name, "kind": "local", "format": "text", "parallel": parallel, "languages": langs,
                    "counts": counts, "fetched": [], "invalid_utf8_lines": dict.fromkeys(langs, 0)}
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (raw / "manifest.json").write_text(json.dumps({"sources": list(sources)}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=1024, help="raw corpus size in MB (default: %(default)s)")
    parser.add_argument("--budget-mb", type=float, default=500, help="peak RSS allowed (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build it (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated corpus and outputs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="clean-bench-", dir=args.workdir))
    try:
        raw = work / "raw"
        t0 = time.monotonic()
        generate(raw, int(args.size_mb * 1e6), args.seed)
        raw_bytes = sum(p.stat().st_size for p in raw.rglob("*.tsv"))
        print(f"generated {raw_bytes / 1e6:.0f} MB of raw text in {time.monotonic() - t0:.0f}s under {raw}",
              file=sys.stderr)
        params = work / "params.yaml"
        params.write_text(f"languages: {list(ALPHABETS)}\npairs: {PAIRS}\nclean: {{}}\n".replace("'", ""))

        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "pipeline.clean", "--params", str(params), "--raw", str(raw),
               "--out", str(work / "clean"), "--metrics", str(work / "metrics" / "clean.json")]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds = time.monotonic() - t0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the only child this process ever waited for
        peak_mb = usage.ru_maxrss / 1024  # KiB on Linux
        cpu_s = usage.ru_utime + usage.ru_stime
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            print(f"clean failed with exit status {proc.returncode}", file=sys.stderr)
            return 1
        metrics = json.loads((work / "metrics" / "clean.json").read_text())
        rows_in = metrics["totals"]["mono"]["rows_in"]
        out_bytes = sum(p.stat().st_size for p in (work / "clean").rglob("*.parquet"))
        ok = peak_mb < args.budget_mb
        print(f"raw: {raw_bytes / 1e6:.0f} MB, {rows_in} lines; clean output {out_bytes / 1e6:.0f} MB")
        totals = metrics["totals"]
        print(f"mono rows out {totals['mono']['rows_out']}, para rows out {totals['para']['rows_out']}")
        print(f"time: {seconds:.1f} s wall ({cpu_s:.1f} s CPU), {rows_in / seconds:,.0f} rows/s, "
              f"{raw_bytes / 1e6 / seconds:.1f} MB/s")
        print(f"peak RSS: {peak_mb:.0f} MB ({'under' if ok else 'OVER'} the {args.budget_mb:.0f} MB budget)")
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
