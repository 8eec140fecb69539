"""Fixture corpora writers: raw sources (data/raw), clean Parquet (data/clean) and the params.yaml they go with."""
from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

# --------------------------------------------------------------------------------------------------- raw sources
# Five sentences per language; bible() makes verse texts from them.
EN = ["The cat sleeps on the warm mat", "A river runs through the old town", "We read books every night",
      "The sun rises over the hills", "Bread is baked early in the morning"]
FR = ["Le chat dort sur le tapis chaud", "Une rivière traverse la vieille ville", "Nous lisons des livres chaque soir",
      "Le soleil se lève sur les collines", "Le pain est cuit tôt le matin"]
RU = ["Кошка спит на тёплом коврике", "Река течёт через старый город", "Мы читаем книги каждый вечер",
      "Солнце встаёт над холмами", "Хлеб пекут рано утром"]


def write_source(raw: Path, name: str, files: dict[str, list], parallel: bool = False) -> None:
    """data/raw/<name>/<lang>.tsv (rows: (id, text) or raw bytes of a whole line) + manifests; sources in call order."""
    folder = raw / name
    folder.mkdir(parents=True)
    for lang, rows in files.items():
        with open(folder / f"{lang}.tsv", "wb") as fh:
            for row in rows:
                fh.write(row if isinstance(row, bytes) else f"{row[0]}\t{row[1]}\n".encode("utf-8"))
    manifest = {"source": name, "kind": "local", "format": "text", "parallel": parallel, "languages": list(files),
                "counts": {lang: len(rows) for lang, rows in files.items()}, "fetched": [],
                "invalid_utf8_lines": dict.fromkeys(files, 0)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    top = raw / "manifest.json"
    sources = json.loads(top.read_text())["sources"] if top.exists() else []
    top.write_text(json.dumps({"sources": [*sources, name]}))


def verse_id(i: int) -> str:
    return f"bible:{1 + i // 900:03d}.{1 + i // 30 % 30:03d}.{1 + i % 30:03d}"


def bible(n: int, langs=("en", "fr", "ru")) -> dict[str, list]:
    """A multi-parallel corpus: n verses aligned by id, distinct texts, each in its language's script."""
    base = {"en": EN, "fr": FR, "ru": RU}
    return {lang: [(verse_id(i), f"{base[lang][i % 5]} {i}") for i in range(n)] for lang in langs}


def write_clean_stage_params(path: Path, languages, pairs=(), **clean_overrides) -> Path:
    """params.yaml with languages, pairs and a clean section (20% valid, 20% test; ``clean_overrides`` on top)."""
    clean_section = {"split": {"valid": 0.2, "test": 0.2}, "batch_rows": 100, **clean_overrides}
    path.write_text(yaml.safe_dump({"languages": list(languages), "pairs": list(pairs), "clean": clean_section},
                                   allow_unicode=True))
    return path


# ------------------------------------------------------------------------------------------------- clean Parquet
# Words per language: accents (fr, es), Cyrillic (ru), Arabic (ar) and CJK without spaces (zh).
WORDS = {
    "en": "the light of day and water king people land house word good night heart sea great city".split(),
    "fr": "été forêt château élève garçon cœur où très noël français lumière père mère déjà voilà".split(),
    "es": "niño señor corazón canción mañana árbol agua luz tierra pueblo después también así".split(),
    "ru": "свет день вода царь народ земля дом слово добрый ночь сердце море великий город".split(),
    "ar": "النور يوم الماء الملك الشعب الأرض البيت الكلمة الطيب الليل القلب البحر العظيم المدينة".split(),
    "zh": "光 日 水 王 民 地 家 言 善 夜 心 海 大 城 神 天 人 子 说 的".split(),
}
PARA_COLUMNS = ["id", "src_lang", "tgt_lang", "src", "tgt"]


def sentence(lang: str, rng: random.Random) -> str:
    words = WORDS[lang]
    # a Zipf-like choice so sentencepiece finds frequent multi-character pieces
    picked = [words[min(int(rng.paretovariate(1.2)) - 1, len(words) - 1)] for _ in range(rng.randint(4, 12))]
    if lang == "zh":
        return "".join(picked) + "。"
    text = " ".join(picked)
    return unicodedata.normalize("NFC", text[0].upper() + text[1:] + ".")


def write_clean(clean_dir: Path, rows: dict[str, int], pairs: list[str] = (), seed: int = 0,
                splits=("train", "valid", "test")) -> None:
    """Write data/clean/{mono,para}/<split>.parquet per docs/data-layout.md.

    ``rows`` gives training segments per language; valid/test get a tenth each (at least 5). Segment ids are shared
    across languages (a multi-parallel corpus), so para rows pair segment k of src with segment k of tgt.
    """
    rng = random.Random(seed)
    for split in splits:
        factor = 1.0 if split == "train" else 0.1
        mono = {"id": [], "lang": [], "text": []}
        by_lang: dict[str, dict[str, str]] = {}
        for lang, n in rows.items():
            count = n if split == "train" else max(5, int(n * factor))
            by_lang[lang] = {}
            for k in range(count):
                seg_id = f"fixture:{split}.{k:06d}"
                text = sentence(lang, rng)
                mono["id"].append(seg_id)
                mono["lang"].append(lang)
                mono["text"].append(text)
                by_lang[lang][seg_id] = text
        para = {c: [] for c in PARA_COLUMNS}
        for pair in pairs:
            src, tgt = pair.split("-")
            for seg_id in sorted(set(by_lang[src]) & set(by_lang[tgt])):
                para["id"].append(seg_id)
                para["src_lang"].append(src)
                para["tgt_lang"].append(tgt)
                para["src"].append(by_lang[src][seg_id])
                para["tgt"].append(by_lang[tgt][seg_id])
        for kind, columns in (("mono", mono), ("para", para)):
            path = clean_dir / kind / f"{split}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            schema = pa.schema([(c, pa.string()) for c in columns])
            # small row groups so readers have to stitch row ranges across them
            pq.write_table(pa.table(columns, schema=schema), path, compression="zstd", row_group_size=97)


def write_tokenizer_shard_params(path: Path, languages: list[str], pairs: list[str] = (), tokenizer: dict | None = None,
                                 shard: dict | None = None) -> Path:
    """params.yaml with languages, pairs and small tokenizer and shard sections (``tokenizer``/``shard`` override)."""
    data = {
        "languages": list(languages),
        "pairs": list(pairs),
        "tokenizer": {"model_type": "unigram", "vocab_size": 200, "character_coverage": 1.0, "byte_fallback": False,
                      "alpha": 0.3, "max_sentences": 2000, "seed": 1234, "threads": 2, **(tokenizer or {})},
        "shard": {"rows_per_shard": 250, "batch_rows": 100, "threads": 2, **(shard or {})},
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
