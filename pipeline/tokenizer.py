"""tokenizer stage: train the shared sentencepiece vocabulary on a language-balanced sample of the clean training text.

    data/clean/mono/train.parquet ──sample q_i ∝ p_i^alpha──> sentencepiece ──> data/tokenizer/{spm.model, spm.vocab,
                                                                                                  tokenizer.json}
    data/clean/mono/valid.parquet ──────────────────────────> metrics/tokenizer.json (fertility, <unk> rate, vocab use)

Languages are balanced as in XLM / XLM-R: with p_i the share of training sentences in language i, the sample holds
M·q_i sentences of language i, q_i = p_i^alpha / sum_j p_j^alpha, M = min(max_sentences, all training sentences).
alpha < 1 flattens the distribution so small languages get enough pieces; a language whose quota exceeds its sentences
is repeated (whole passes plus a random remainder), which is what sampling from q does.

The sample is drawn in two streaming passes over the file (count sentences per language, then pick the chosen
ordinals), so memory holds the sample and nothing proportional to the corpus. The choice is a seeded numpy RNG per
language and sentencepiece gets the sample in file order through ``sentence_iterator`` with its own sampling and
shuffling off: the same input and params give a byte-identical ``spm.model``.
"""
from __future__ import annotations

import argparse
import io
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sentencepiece as spm
from tqdm import tqdm

from pipeline.errors import PipelineError, disk_full_is_an_error, run_cli
from pipeline.params import PARAMS_FILE, TokenizerParams, load_params
from xlm_core.atomic import atomic_dir, write_json
from xlm_core.languages import NO_SPACE_LANGS
from xlm_core.shards import ShardError, iter_row_range, open_parquet
from xlm_core.special_tokens import FIRST_PIECE
from xlm_core.tokenizer import Tokenizer, write_tokenizer_dir

STAGE = "tokenizer"
CLEAN_HINT = "run `dvc repro clean`"
READ_BATCH_ROWS = 50_000
MAX_SENTENCE_BYTES = 1 << 16   # sentencepiece silently skips longer training sentences (its default is 4192 bytes)


# ------------------------------------------------------------------------------------------------------------ sample
def language_codes(column) -> tuple[np.ndarray, list[str]]:
    """Integer code per row and the language of each code (comparisons on ints, not Python strings)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    encoded = pc.dictionary_encode(column)
    return encoded.indices.to_numpy(zero_copy_only=False), encoded.dictionary.to_pylist()


def text_column(table: pa.Table, path: Path) -> pa.ChunkedArray:
    texts = table.column("text")
    if texts.null_count:
        raise ShardError(f"{path}: column 'text' has {texts.null_count} null value(s); {CLEAN_HINT}")
    return texts


def count_sentences(train_path: Path) -> dict[str, int]:
    """Pass 1: training sentences per language (reads the ``lang`` column only)."""
    pf = open_parquet(train_path, ["id", "lang", "text"], CLEAN_HINT)
    counts: dict[str, int] = {}
    rows = pf.metadata.num_rows
    with tqdm(total=rows, desc="tokenizer: count", unit="rows", file=sys.stderr, disable=rows < 100_000) as bar:
        for table in iter_row_range(pf, 0, rows, ["lang"], READ_BATCH_ROWS):
            for item in pc.value_counts(table.column("lang")).to_pylist():
                counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
            bar.update(table.num_rows)
    return counts


def sample_sizes(counts: dict[str, int], alpha: float, max_sentences: int) -> dict[str, int]:
    """Sentences to draw per language: ``M·q_i`` rounded by largest remainder so they sum to exactly M."""
    langs = sorted(counts)
    n = np.array([counts[lang] for lang in langs], dtype=np.float64)
    total = int(n.sum())
    weights = (n / total) ** alpha
    quota = weights / weights.sum() * min(max_sentences, total)
    sizes = np.floor(quota).astype(np.int64)
    short = min(max_sentences, total) - int(sizes.sum())
    for i in np.argsort(-(quota - sizes), kind="stable")[:short]:
        sizes[i] += 1
    return {lang: int(k) for lang, k in zip(langs, sizes)}


def _language_rng(seed: int, lang: str) -> np.random.Generator:
    # Seeded by (seed, language) so adding a language to the corpus does not reshuffle the others' samples.
    return np.random.default_rng([seed, zlib.crc32(lang.encode())])


def choose_ordinals(available: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Which of a language's sentences (by ordinal in the file) to take, and how many times each.

    Returns sorted unique ordinals and their repeat counts. Memory stays O(size): numpy draws without replacement by
    Floyd's algorithm, or by a partial shuffle of ``arange(available)`` only when size > available / 50.
    """
    passes, remainder = divmod(size, available)
    if passes == 0:
        return np.sort(rng.choice(available, size=size, replace=False)), np.ones(size, dtype=np.int64)
    repeats = np.full(available, passes, dtype=np.int64)
    repeats[rng.choice(available, size=remainder, replace=False)] += 1
    return np.arange(available), repeats


def draw_sample(train_path: Path, sizes: dict[str, int], counts: dict[str, int], seed: int) -> list[str]:
    """Pass 2: collect the chosen sentences (repeated as chosen) in file order."""
    chosen = {lang: choose_ordinals(counts[lang], k, _language_rng(seed, lang)) for lang, k in sizes.items() if k}
    seen: dict[str, int] = {}  # ordinal of the next sentence of each language
    sample: list[str] = []
    pf = open_parquet(train_path, ["lang", "text"], CLEAN_HINT)
    rows = pf.metadata.num_rows
    with tqdm(total=rows, desc="tokenizer: sample", unit="rows", file=sys.stderr, disable=rows < 100_000) as bar:
        for table in iter_row_range(pf, 0, rows, ["lang", "text"], READ_BATCH_ROWS):
            codes, names = language_codes(table.column("lang"))
            texts = text_column(table, train_path)
            picked_rows, picked_repeats = [], []
            for code, lang in enumerate(names):
                rows_of_lang = np.flatnonzero(codes == code)
                if rows_of_lang.size == 0:
                    continue
                ordinals = seen.get(lang, 0) + np.arange(rows_of_lang.size)
                seen[lang] = seen.get(lang, 0) + rows_of_lang.size
                if lang not in chosen:
                    continue
                wanted, repeats = chosen[lang]
                pos = np.searchsorted(wanted, ordinals)
                hit = (pos < wanted.size) & (wanted[np.minimum(pos, wanted.size - 1)] == ordinals)
                picked_rows.append(rows_of_lang[hit])
                picked_repeats.append(repeats[pos[hit]])
            if picked_rows:
                rows_idx = np.concatenate(picked_rows)
                order = np.argsort(rows_idx, kind="stable")  # keep file order inside the batch
                reps = np.concatenate(picked_repeats)[order]
                for text, rep in zip(texts.take(rows_idx[order]).to_pylist(), reps.tolist()):
                    sample.extend([text] * rep)
            bar.update(table.num_rows)
    return sample


# ------------------------------------------------------------------------------------------------------------- train
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_LOW = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def train_sentencepiece(sentences: list[str], tp: TokenizerParams) -> bytes:
    """Train on ``sentences`` and return the serialized model; sentencepiece's size errors become PipelineErrors."""
    spm.set_random_generator_seed(tp.seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model,
            model_type=tp.model_type, vocab_size=tp.vocab_size, character_coverage=tp.character_coverage,
            byte_fallback=tp.byte_fallback, num_threads=tp.threads,
            # the sample is already drawn (seeded, balanced): sentencepiece must use all of it, in this order
            input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=MAX_SENTENCE_BYTES,
            # clean text is already NFC/NFKC: no second normalisation, and keep spaces as they are so that
            # decode(encode(text)) == text
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            minloglevel=1,
        )
    except RuntimeError as exc:
        raise PipelineError(_explain_spm_error(str(exc), tp)) from None
    return model.getvalue()


def _explain_spm_error(message: str, tp: TokenizerParams) -> str:
    if m := _TOO_HIGH.search(message):
        return (f"params.yaml: tokenizer.vocab_size = {tp.vocab_size} is more than the training sample supports: "
                f"sentencepiece can make at most {m.group(2)} pieces from it; lower tokenizer.vocab_size to "
                f"{m.group(2)} or less (or add training text / raise tokenizer.max_sentences)")
    if m := _TOO_LOW.search(message):
        return (f"params.yaml: tokenizer.vocab_size = {tp.vocab_size} is too small: the training sample needs "
                f"{m.group(2)} pieces for its characters and control symbols; raise tokenizer.vocab_size to at least "
                f"{m.group(2)} or lower tokenizer.character_coverage")
    return f"sentencepiece training failed: {message.splitlines()[0]}; check the tokenizer section of params.yaml"


# ----------------------------------------------------------------------------------------------------------- metrics
def measure(tok: Tokenizer, valid_path: Path, languages: list[str], threads: int) -> dict:
    """Per-language fertility, ``<unk>`` rate and vocabulary use on the valid split (streamed)."""
    pf = open_parquet(valid_path, ["lang", "text"], CLEAN_HINT)
    stats = {lang: {"rows": 0, "units": 0, "pieces": 0, "unk": 0} for lang in languages}
    used = {lang: np.zeros(tok.vocab_size, dtype=bool) for lang in languages}
    rows = pf.metadata.num_rows
    for table in iter_row_range(pf, 0, rows, ["lang", "text"], READ_BATCH_ROWS):
        codes, names = language_codes(table.column("lang"))
        texts = text_column(table, valid_path)
        words = pc.list_value_length(pc.utf8_split_whitespace(texts)).to_numpy(zero_copy_only=False)
        chars = pc.utf8_length(texts).to_numpy(zero_copy_only=False)
        ids, offsets = tok.encode_flat(texts.to_pylist(), threads)
        lengths = np.diff(offsets)
        row_of_token = np.repeat(np.arange(len(lengths)), lengths)
        for code, lang in enumerate(names):
            if lang not in stats:
                continue  # not a configured language: nothing to report
            rows_mask = codes == code
            token_mask = rows_mask[row_of_token]
            s = stats[lang]
            s["rows"] += int(rows_mask.sum())
            s["units"] += int((chars if lang in NO_SPACE_LANGS else words)[rows_mask].sum())
            s["pieces"] += int(lengths[rows_mask].sum())
            s["unk"] += int((ids[token_mask] == tok.unk_id).sum())
            used[lang][ids[token_mask]] = True
    ordinary = tok.spm_pieces - 3  # pieces other than <unk>, <s>, </s>
    report = {}
    for lang, s in stats.items():
        report[lang] = {
            "rows": s["rows"],
            "fertility": round(s["pieces"] / s["units"], 4) if s["units"] else None,
            "fertility_unit": "char" if lang in NO_SPACE_LANGS else "word",
            "unk_rate": round(s["unk"] / s["pieces"], 6) if s["pieces"] else None,
            "vocab_used": round(int(used[lang][FIRST_PIECE:tok.mask_id].sum()) / ordinary, 4),
        }
    all_used = np.logical_or.reduce(list(used.values())) if used else np.zeros(tok.vocab_size, dtype=bool)
    total_pieces = sum(s["pieces"] for s in stats.values())
    return {
        "languages": report,
        "vocab_used": round(int(all_used[FIRST_PIECE:tok.mask_id].sum()) / ordinary, 4),
        "unk_rate": round(sum(s["unk"] for s in stats.values()) / total_pieces, 6) if total_pieces else None,
        "vocab_size": tok.vocab_size,
        "measured_on": "valid",
    }


# ------------------------------------------------------------------------------------------------------------- stage
def train_tokenizer(params, clean_dir: str | Path, out_dir: str | Path,
                    metrics_path: str | Path) -> dict:
    """Train the tokenizer from ``clean_dir/mono/train.parquet`` into ``out_dir``; returns the metrics written.

    ``params`` is ``load_params("tokenizer")``. Every check on the input runs before ``out_dir`` is touched.
    """
    tp: TokenizerParams = params.tokenizer
    clean_dir, out_dir, metrics_path = Path(clean_dir), Path(out_dir), Path(metrics_path)
    train_path, valid_path = clean_dir / "mono" / "train.parquet", clean_dir / "mono" / "valid.parquet"
    open_parquet(valid_path, ["lang", "text"], CLEAN_HINT)  # fail now, not after an hour of training
    counts = count_sentences(train_path)
    empty = [lang for lang in params.languages if counts.get(lang, 0) == 0]
    if empty:
        raise PipelineError(
            f"{train_path}: no training sentences for language(s) {empty} listed in params.yaml languages; "
            f"check the download/clean output for them (metrics/clean.json) or remove them from languages")
    counts = {lang: counts[lang] for lang in params.languages}  # other languages are not ours to learn
    sizes = sample_sizes(counts, tp.alpha, tp.max_sentences)
    sample = draw_sample(train_path, sizes, counts, tp.seed)

    print(f"tokenizer: training {tp.model_type} sentencepiece, {tp.vocab_size} pieces, on {len(sample):,} sentences "
          f"({', '.join(f'{k} {v:,}' for k, v in sizes.items())}), {tp.threads} threads", file=sys.stderr)
    started = time.perf_counter()
    model_bytes = train_sentencepiece(sample, tp)
    del sample
    print(f"tokenizer: trained in {time.perf_counter() - started:.1f}s", file=sys.stderr)

    with disk_full_is_an_error(STAGE, out_dir), atomic_dir(out_dir) as tmp:
        write_tokenizer_dir(tmp, model_bytes, training={
            **tp.model_dump(),
            "languages": list(counts),
            "train_sentences": counts,
            "sample_sentences": sizes,
            "normalization_rule_name": "identity",
            "remove_extra_whitespaces": False,
        })
        metrics = measure(Tokenizer.load(tmp), valid_path, params.languages, tp.threads)
        metrics["sample_sentences"] = sizes
    write_json(metrics_path, metrics)
    return metrics


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
    parser.add_argument("--clean-dir", default="data/clean", help="clean stage output (default: %(default)s)")
    parser.add_argument("--out-dir", default="data/tokenizer", help="tokenizer folder (default: %(default)s)")
    parser.add_argument("--metrics", default="metrics/tokenizer.json", help="metrics file (default: %(default)s)")
    args = parser.parse_args(argv)

    def run() -> None:
        params = load_params(STAGE, args.params)
        metrics = train_tokenizer(params, args.clean_dir, args.out_dir, args.metrics)
        for lang, m in metrics["languages"].items():
            print(f"tokenizer: {lang}: fertility {m['fertility']} pieces/{m['fertility_unit']}, "
                  f"<unk> {m['unk_rate']}, vocab used {m['vocab_used']}", file=sys.stderr)

    return run_cli(STAGE, run)


if __name__ == "__main__":
    sys.exit(main())
