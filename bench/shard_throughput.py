"""Shard-stage throughput: our stage vs Hugging Face ``tokenizers`` + ``datasets.map``, and peak memory at 1× and 2×.

    pip install -e '.[bench]'            # datasets, tokenizers, transformers, protobuf (for the spm conversion)
    python bench/shard_throughput.py                      # synthetic 5-language corpus
    python bench/shard_throughput.py --clean-dir data/clean --tokenizer-dir data/tokenizer   # the real one

Every contender runs in its own subprocess, so its peak memory is its own: a sampler thread sums the RSS and the PSS
(proportional set size: pages shared between forked workers counted once) of the process tree every 50 ms. Runs are
interleaved (ours, HF, ours, HF, ...) because the machines are noisy; the report gives medians, and CPU seconds
(user + sys of the whole process tree), which a busy machine distorts less than wall time.

- ours: ``python -m pipeline.shard`` on the corpus (mono + para, all splits, zstd Parquet + manifests), at 1× and at 2×
  the training split (the same rows twice, new ids) to show memory is flat in corpus size.
- HF: the same sentencepiece model converted to a fast tokenizer (``XLMRobertaTokenizer`` built from
  ``sentencepiece.bpe.model``, needs protobuf), ``Dataset.from_parquet`` + ``map(batched=True, num_proc=cores)``
  encoding the same columns (``add_special_tokens=False``), written to its Arrow cache, which is what ``map`` does.
  Its ids are compared with ours on the valid split: both must be the same tokenizer for the numbers to mean anything.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPLITS = ("train", "valid", "test")
MONO_SCHEMA = pa.schema([("id", pa.string()), ("lang", pa.string()), ("text", pa.string())])
PARA_SCHEMA = pa.schema([(c, pa.string()) for c in ("id", "src_lang", "tgt_lang", "src", "tgt")])


# ---------------------------------------------------------------------------------------------- synthetic corpus
SYLLABLES = {
    "en": "th e an re on at en nd st es or te of ed is it al ar ou ng le ve co me de hi ri ro ic ne ea ra ce".split(),
    "fr": "le de é è à ou qu ai eu on an in re ti ch ê ç ier ment té vo ra la pe mè fê".split(),
    "es": "de la el que en ñ ó á í ú ci ón ar os es ra ta do ri ca pa ma lo mi ll".split(),
    "ru": "ст но то на ен ов ни ра во ко ро ли ть ел ка ре по ра от ол ий ый ая ие".split(),
    "ar": "ال من في ا ل م ن ي و ه ر ب ت ك ع د س ق ف ح ج ش ص ط".split(),
}
CJK = [chr(c) for c in range(0x4E00, 0x4E00 + 2500)]
PAIRS = ["en-fr", "en-es", "en-ru", "en-ar", "en-zh"]


def _lexicon(lang: str, rng: random.Random, size: int = 20_000) -> list[str]:
    if lang == "zh":
        return ["".join(rng.choices(CJK, k=rng.randint(1, 3))) for _ in range(size)]
    return [unicodedata.normalize("NFC", "".join(rng.choices(SYLLABLES[lang], k=rng.randint(1, 4))))
            for _ in range(size)]


def synthesize(clean_dir: Path, segments: int, seed: int = 0) -> None:
    """A multi-parallel corpus of ``segments`` ids in six languages (Zipfian words), split 96/2/2, plus pairs."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    langs = ["en", "fr", "es", "ru", "ar", "zh"]
    lexicons = {lang: _lexicon(lang, rng) for lang in langs}
    split_of = nrng.choice(3, size=segments, p=[0.96, 0.02, 0.02])
    texts: dict[str, list[str]] = {}
    for lang in langs:
        lengths = nrng.integers(5, 30, size=segments)
        words = np.minimum(nrng.zipf(1.15, size=int(lengths.sum())) - 1, len(lexicons[lang]) - 1)
        lex = lexicons[lang]
        sep = "" if lang == "zh" else " "
        ends = np.cumsum(lengths)
        starts = ends - lengths
        texts[lang] = [sep.join(lex[w] for w in words[s:e]) for s, e in zip(starts.tolist(), ends.tolist())]
    for s, split in enumerate(SPLITS):
        rows = np.flatnonzero(split_of == s).tolist()
        ids = [f"synth:{k:09d}" for k in rows]
        mono = {"id": [i for _ in langs for i in ids], "lang": [lang for lang in langs for _ in rows],
                "text": [texts[lang][k] for lang in langs for k in rows]}
        para = {c: [] for c in PARA_SCHEMA.names}
        for pair in PAIRS:
            src, tgt = pair.split("-")
            para["id"] += ids
            para["src_lang"] += [src] * len(rows)
            para["tgt_lang"] += [tgt] * len(rows)
            para["src"] += [texts[src][k] for k in rows]
            para["tgt"] += [texts[tgt][k] for k in rows]
        _write(clean_dir / "mono" / f"{split}.parquet", pa.table(mono, schema=MONO_SCHEMA))
        _write(clean_dir / "para" / f"{split}.parquet", pa.table(para, schema=PARA_SCHEMA))


def _write(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd", row_group_size=50_000)


def doubled(clean_dir: Path, out_dir: Path) -> None:
    """The same corpus with every train row twice (second copy with new ids); valid/test unchanged."""
    for kind in ("mono", "para"):
        (out_dir / kind).mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            src = clean_dir / kind / f"{split}.parquet"
            if split != "train":
                shutil.copy(src, out_dir / kind / f"{split}.parquet")
                continue
            table = pq.read_table(src)
            copy = table.set_column(0, "id", pa.array([f"{i}#2" for i in table.column("id").to_pylist()]))
            _write(out_dir / kind / f"{split}.parquet", pa.concat_tables([table, copy]))


# -------------------------------------------------------------------------------------------------- measurement
class TreeSampler(threading.Thread):
    """Peak summed RSS and PSS of a process and its children, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        import psutil
        self.proc, self.interval = psutil.Process(pid), interval
        self.peak_rss = self.peak_pss = 0
        self._done = threading.Event()

    def run(self) -> None:
        import psutil
        while not self._done.is_set():
            rss = pss = 0
            try:
                for p in [self.proc, *self.proc.children(recursive=True)]:
                    try:
                        info = p.memory_full_info()
                        rss += info.rss
                        pss += getattr(info, "pss", info.rss)
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
            except psutil.NoSuchProcess:
                break
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every waited-for descendant, pool workers included
    return usage.ru_utime + usage.ru_stime


def measured(cmd: list[str], env: dict) -> dict:
    cpu_before = _children_cpu_s()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    sampler.stop()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": wall, "cpu_s": _children_cpu_s() - cpu_before, "peak_rss_mib": sampler.peak_rss / 2**20, "peak_pss_mib": sampler.peak_pss / 2**20,
            "stdout": out, "stderr": err}


def bench_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "1", "OMP_NUM_THREADS": str(threads)})
    return env


# ------------------------------------------------------------------------------------------------------- ours
def run_ours(clean_dir: Path, tokenizer_dir: Path, work: Path, args) -> dict:
    out = work / "shards"
    shutil.rmtree(out, ignore_errors=True)
    params = work / "params.yaml"
    params.write_text(json.dumps({"languages": ["en"], "pairs": [], "shard": {
        "rows_per_shard": args.rows_per_shard, "batch_rows": args.batch_rows, "threads": args.threads}}))
    cmd = [sys.executable, "-m", "pipeline.shard", "--params", str(params), "--clean-dir", str(clean_dir),
           "--tokenizer-dir", str(tokenizer_dir), "--out-dir", str(out), "--metrics", str(work / "shard.json")]
    result = measured(cmd, bench_env(args.threads))
    manifests = {s: json.loads((out / s / "manifest.json").read_text()) for s in SPLITS}
    result["tokens"] = sum(m["mono"]["tokens"] + m["para"]["tokens"] for m in manifests.values())
    line = [x for x in result["stderr"].splitlines() if " tokens in " in x][-1]  # "shard: N tokens in X.Xs (...)"
    result["work_s"] = float(line.split(" tokens in ")[1].split("s")[0])
    return result


# ------------------------------------------------------------------------------------------------------- HF
HF_WORKER = r'''
import json, os, shutil, sys, time
from pathlib import Path
clean_dir, tokenizer_dir, work, num_proc, batch = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
from transformers import XLMRobertaTokenizer
import datasets
datasets.disable_progress_bars()
hf_dir = work / "hf_tokenizer"
hf_dir.mkdir(parents=True, exist_ok=True)
shutil.copy(tokenizer_dir / "spm.model", hf_dir / "sentencepiece.bpe.model")
tok = XLMRobertaTokenizer.from_pretrained(str(hf_dir))      # spm -> tokenizers conversion (protobuf)
cache = work / "hf_cache"
shutil.rmtree(cache, ignore_errors=True)

def encode_mono(batch):
    return {"ids": tok(batch["text"], add_special_tokens=False)["input_ids"]}

def encode_para(batch):
    return {"src_ids": tok(batch["src"], add_special_tokens=False)["input_ids"],
            "tgt_ids": tok(batch["tgt"], add_special_tokens=False)["input_ids"]}

started = time.perf_counter()
tokens, out = 0, {}
for kind, fn, drop, cols in (("mono", encode_mono, ["text"], ["ids"]), ("para", encode_para, ["src", "tgt"], ["src_ids", "tgt_ids"])):
    for split in ("train", "valid", "test"):
        ds = datasets.Dataset.from_parquet(str(clean_dir / kind / f"{split}.parquet"), cache_dir=str(cache))
        if len(ds) == 0:
            continue
        ds = ds.map(fn, batched=True, batch_size=batch, num_proc=min(num_proc, len(ds)), remove_columns=drop)
        for col in cols:
            tokens += sum(len(chunk.flatten()) for chunk in ds.data.column(col).chunks)
        if kind == "mono" and split == "valid":
            out["valid_ids"] = ds.data.column("ids").to_pylist()
work_s = time.perf_counter() - started
(work / "hf_result.json").write_text(json.dumps({"tokens": tokens, "work_s": work_s, "valid_ids": out.get("valid_ids", [])}))
'''


def run_hf(clean_dir: Path, tokenizer_dir: Path, work: Path, args) -> dict:
    worker = work / "hf_worker.py"
    worker.write_text(HF_WORKER)
    env = bench_env(args.threads)
    env["HF_DATASETS_CACHE"] = str(work / "hf_cache")
    result = measured([sys.executable, str(worker), str(clean_dir), str(tokenizer_dir), str(work), str(args.num_proc),
                       str(args.hf_batch)], env)
    data = json.loads((work / "hf_result.json").read_text())
    result.update(tokens=data["tokens"], work_s=data["work_s"], valid_ids=data["valid_ids"])
    shutil.rmtree(work / "hf_cache", ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------------------------- main
def prepare_tokenizer(clean_dir: Path, work: Path, vocab_size: int, threads: int) -> Path:
    from pipeline.params import load_params
    from pipeline.tokenizer import train_tokenizer
    if (work / "tokenizer" / "tokenizer.json").exists():  # reuse a scratch folder's tokenizer
        return work / "tokenizer"
    params = work / "tok_params.yaml"
    langs = sorted(pq.read_table(clean_dir / "mono" / "train.parquet", columns=["lang"]).column("lang").unique()
                   .to_pylist())
    params.write_text(json.dumps({"languages": langs, "pairs": [], "tokenizer": {
        "vocab_size": vocab_size, "max_sentences": 200_000, "threads": threads}}))
    started = time.perf_counter()
    train_tokenizer(load_params("tokenizer", params), clean_dir, work / "tokenizer", work / "tokenizer_metrics.json")
    print(f"trained a {vocab_size}-piece unigram tokenizer in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return work / "tokenizer"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clean-dir", type=Path, help="use this clean corpus instead of a synthetic one")
    parser.add_argument("--tokenizer-dir", type=Path, help="use this tokenizer instead of training one")
    parser.add_argument("--segments", type=int, default=60_000, help="synthetic: aligned segments (× 6 languages)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="our sentencepiece encode threads")
    parser.add_argument("--batch-rows", type=int, default=10_000)
    parser.add_argument("--rows-per-shard", type=int, default=200_000)
    parser.add_argument("--num-proc", type=int, default=os.cpu_count(), help="datasets.map num_proc")
    parser.add_argument("--hf-batch", type=int, default=1000, help="datasets.map batch_size")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, deleted)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="shard-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        clean_1x = args.clean_dir
        if clean_1x is None:
            clean_1x = work / "clean_1x"
            if not (clean_1x / "mono" / "train.parquet").exists():
                started = time.perf_counter()
                synthesize(clean_1x, args.segments)
                print(f"synthesized the corpus in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        clean_2x = work / "clean_2x"
        if not (clean_2x / "mono" / "train.parquet").exists():
            doubled(clean_1x, clean_2x)
        tokenizer_dir = args.tokenizer_dir or prepare_tokenizer(clean_1x, work, args.vocab_size, args.threads)

        runs: dict[str, list[dict]] = {"ours_1x": [], "hf_1x": [], "ours_2x": []}
        for r in range(args.repeats):
            for name, fn, clean in (("ours_1x", run_ours, clean_1x), ("hf_1x", run_hf, clean_1x),
                                    ("ours_2x", run_ours, clean_2x)):
                result = fn(clean, tokenizer_dir, work, args)
                runs[name].append(result)
                if r == 0 and name == "hf_1x":  # data/shards still holds ours_1x here
                    ours = valid_mono_ids(work / "shards")
                    agree = sum(a == b for a, b in zip(ours, result["valid_ids"]))
                    print(f"HF vs ours on valid mono: {agree}/{len(ours)} rows identical", file=sys.stderr)
                print(f"[{r + 1}/{args.repeats}] {name}: {result['tokens']:,} tokens, work {result['work_s']:.2f}s "
                      f"({result['tokens'] / result['work_s']:,.0f} tok/s), wall {result['wall_s']:.2f}s, "
                      f"cpu {result['cpu_s']:.1f}s, "
                      f"peak RSS {result['peak_rss_mib']:.0f} MiB, PSS {result['peak_pss_mib']:.0f} MiB",
                      file=sys.stderr)

        summary = {}
        for name, results in runs.items():
            summary[name] = {
                "tokens": results[0]["tokens"],
                "work_s": statistics.median(x["work_s"] for x in results),
                "wall_s": statistics.median(x["wall_s"] for x in results),
                "tokens_per_s": statistics.median(x["tokens"] / x["work_s"] for x in results),
                "tokens_per_s_wall": statistics.median(x["tokens"] / x["wall_s"] for x in results),
                "cpu_s": statistics.median(x["cpu_s"] for x in results),
                "tokens_per_cpu_s": statistics.median(x["tokens"] / x["cpu_s"] for x in results),
                "peak_rss_mib": statistics.median(x["peak_rss_mib"] for x in results),
                "peak_pss_mib": statistics.median(x["peak_pss_mib"] for x in results),
            }
        summary["speedup_work"] = summary["ours_1x"]["tokens_per_s"] / summary["hf_1x"]["tokens_per_s"]
        summary["speedup_wall"] = summary["ours_1x"]["tokens_per_s_wall"] / summary["hf_1x"]["tokens_per_s_wall"]
        summary["speedup_cpu"] = summary["ours_1x"]["tokens_per_cpu_s"] / summary["hf_1x"]["tokens_per_cpu_s"]
        summary["rss_2x_over_1x"] = summary["ours_2x"]["peak_rss_mib"] / summary["ours_1x"]["peak_rss_mib"]
        summary["hf_agreement_valid_rows"] = [agree, len(ours)]
        summary["knobs"] = {k: getattr(args, k) for k in ("threads", "batch_rows", "rows_per_shard", "num_proc",
                                                           "hf_batch", "vocab_size", "segments")}
        summary["corpus"] = str(args.clean_dir) if args.clean_dir else f"synthetic, {args.segments} segments"
        print(json.dumps(summary, indent=2))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def valid_mono_ids(shards: Path) -> list[list[int]]:
    from xlm_core.shards import ShardSet
    return [ids for t in ShardSet(shards / "valid").iter_tables("mono", columns=["ids"])
            for ids in t.column("ids").to_pylist()]


if __name__ == "__main__":
    main()
