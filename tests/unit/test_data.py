"""The pretraining loader (xlm_core.data) on small real Parquet shards written in the shard stage's exact format."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.project import project_env
from xlm_core.atomic import sha256_file
from xlm_core.data import (DataError, PretrainLoader, chunk_seed, iter_eval_batches, open_split, sampling_probs)
from xlm_core.shards import LANG_TYPE, ShardResult, build_manifest, shard_schema
from xlm_core.special_tokens import BOS, EOS, PAD
from xlm_core.train.trainer import seq_len_schedule

LANGS = ["en", "fr", "es"]
PAIRS = ["en-fr", "en-es"]
SENTENCES = {"en": 420, "fr": 150, "es": 40}     # very unequal, so alpha matters
PAIR_ROWS = {"en-fr": 150, "en-es": 80}
ROWS_PER_SHARD = 210                              # 610 mono rows -> 3 shards; 230 para rows -> 2 shards
SEQ_LEN = 64


# ------------------------------------------------------------------------------------------------------- fixtures
def _sentence(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(4, 8000, size=int(rng.integers(3, 31))).astype(np.uint16)   # ids without specials


def _corpus(seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    mono = [(f"m{lang}{i}", lang, _sentence(rng)) for lang, n in SENTENCES.items() for i in range(int(n * scale))]
    mono = [mono[i] for i in rng.permutation(len(mono))]          # languages interleaved across shards
    para = [(f"p{pair}{i}", *pair.split("-"), _sentence(rng), _sentence(rng))
            for pair, n in PAIR_ROWS.items() for i in range(int(n * scale))]
    para = [para[i] for i in rng.permutation(len(para))]
    return mono, para


def _ids(rows) -> pa.Array:
    return pa.array([r.tolist() for r in rows], type=pa.list_(pa.uint16()))


def _dict(values) -> pa.Array:
    return pa.array(values).dictionary_encode().cast(LANG_TYPE)


def write_split(split_dir: Path, split: str, mono: list, para: list) -> None:
    """mono-NNNNN / para-NNNNN Parquet shards + manifest.json, with the shard stage's own schema and manifest builder
    (so a format change there that the loader does not follow fails here)."""
    split_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for kind, rows in (("mono", mono), ("para", para)):
        for index in range(math.ceil(len(rows) / ROWS_PER_SHARD)):
            part = rows[index * ROWS_PER_SHARD:(index + 1) * ROWS_PER_SHARD]
            groups: dict[str, dict] = {}
            if kind == "mono":
                columns = {"id": pa.array([r[0] for r in part]), "lang": _dict([r[1] for r in part]),
                           "ids": _ids([r[2] for r in part]),
                           "length": pa.array([len(r[2]) for r in part], pa.int32())}
                for _, lang, ids in part:
                    slot = groups.setdefault(lang, {"rows": 0, "tokens": 0})
                    slot["rows"] += 1
                    slot["tokens"] += len(ids)
            else:
                columns = {"id": pa.array([r[0] for r in part]), "src_lang": _dict([r[1] for r in part]),
                           "tgt_lang": _dict([r[2] for r in part]), "src_ids": _ids([r[3] for r in part]),
                           "tgt_ids": _ids([r[4] for r in part]),
                           "src_length": pa.array([len(r[3]) for r in part], pa.int32()),
                           "tgt_length": pa.array([len(r[4]) for r in part], pa.int32())}
                for _, src, tgt, s, t in part:
                    slot = groups.setdefault(f"{src}-{tgt}", {"rows": 0, "tokens": 0, "src_tokens": 0, "tgt_tokens": 0})
                    slot["rows"] += 1
                    slot["tokens"] += len(s) + len(t)
                    slot["src_tokens"] += len(s)
                    slot["tgt_tokens"] += len(t)
            name = f"{kind}-{index:05d}.parquet"
            pq.write_table(pa.table(columns, schema=shard_schema(kind, pa.uint16())), split_dir / name,
                           compression="zstd", row_group_size=64)
            results.append(ShardResult(split=split, kind=kind, file=name, rows=len(part),
                                       tokens=sum(g["tokens"] for g in groups.values()),
                                       sha256=sha256_file(split_dir / name), groups=groups))
    tokenizer = SimpleNamespace(sha256="0" * 64, vocab_size=8002, ids_dtype=np.dtype(np.uint16))
    manifest = build_manifest(split, results, tokenizer, ROWS_PER_SHARD)
    (split_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("shards")
    mono, para = _corpus(0)
    write_split(root / "train", "train", mono, para)
    valid_mono, valid_para = _corpus(1, scale=0.2)
    write_split(root / "valid", "valid", valid_mono, valid_para)
    return {"root": root, "train": root / "train", "valid": root / "valid", "mono": mono, "para": para,
            "valid_mono": valid_mono, "valid_para": valid_para}


def loader_kwargs(shards: dict, **over) -> dict:
    kwargs = dict(split_dir=str(shards["train"]), languages=LANGS, pairs=PAIRS,
                  objectives={"mlm": 1.0, "tlm": 0.5, "clm": 0.25}, alpha=0.5, seq_len=SEQ_LEN, batch_size=8,
                  mode="stream", seed=7, rank=0, world_size=1, accum_steps=1, prefetch=2, pin_memory=False)
    kwargs.update(over)
    return kwargs


def take(loader: PretrainLoader, n: int) -> list[list]:
    return [next(loader) for _ in range(n)]


def assert_same_batch(a, b) -> None:
    assert (a.objective, a.key, a.step, a.chunk, a.chunk_seed, a.n_tokens) == \
        (b.objective, b.key, b.step, b.chunk, b.chunk_seed, b.n_tokens)
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.lang_ids, b.lang_ids)
    assert (a.position_ids is None) == (b.position_ids is None)
    if a.position_ids is not None:
        assert torch.equal(a.position_ids, b.position_ids)


# ------------------------------------------------------------------------------------------------------ 1. sampling
def test_language_and_objective_frequencies_follow_alpha_and_weights(shards):
    alpha, weights = 0.3, {"mlm": 1.0, "tlm": 0.5, "clm": 0.5}
    loader = PretrainLoader(**loader_kwargs(shards, objectives=weights, alpha=alpha, prefetch=0))
    tokens = {lang: sum(len(s) for _, l, s in shards["mono"] if l == lang) for lang in LANGS}
    p = np.array([tokens[lang] for lang in LANGS], dtype=float) / sum(tokens.values())
    q_expected = dict(zip(LANGS, p ** alpha / (p ** alpha).sum()))
    assert sampling_probs(tokens, alpha) == pytest.approx(q_expected)
    pair_tokens = {pair: sum(len(s) + len(t) for _, a, b, s, t in shards["para"] if f"{a}-{b}" == pair)
                   for pair in PAIRS}

    n = 20_000
    plans = [loader.schedule.draw(step) for step in range(n)]
    objectives = Counter(p.objective for p in plans)
    for name, w in weights.items():
        assert abs(objectives[name] / n - w / sum(weights.values())) < 0.02, (name, objectives)
    mono = [p.key for p in plans if p.objective != "tlm"]
    for lang, q in q_expected.items():
        assert abs(mono.count(lang) / len(mono) - q) < 0.02, (lang, Counter(mono), q_expected)
    para = [p.key for p in plans if p.objective == "tlm"]
    for pair, q in sampling_probs(pair_tokens, alpha).items():
        assert abs(para.count(pair) / len(para) - q) < 0.02
    # alpha < 1 really flattens the distribution: the small language is sampled well above its token share
    assert q_expected["es"] > p[LANGS.index("es")] + 0.05
    # stateless: the same step draws the same thing whatever was drawn before
    again = loader.schedule.draw(1234)
    assert (again.objective, again.key) == (plans[1234].objective, plans[1234].key)


# ------------------------------------------------------------------------------------------ 2. resume, new process
RESUME_SCRIPT = r'''
import json, sys
import torch
from safetensors.torch import save_file
from xlm_core.data import PretrainLoader

spec = json.load(open(sys.argv[1]))
for i, case in enumerate(spec["cases"]):
    with PretrainLoader(**case["kwargs"]) as loader:
        loader.load_state_dict(case["state"])
        tensors, meta = {}, []
        for s in range(case["n"]):
            for m, b in enumerate(next(loader)):
                tensors[f"{s}.{m}.input_ids"] = b.input_ids.contiguous()
                tensors[f"{s}.{m}.lang_ids"] = b.lang_ids.contiguous()
                if b.position_ids is not None:
                    tensors[f"{s}.{m}.position_ids"] = b.position_ids.contiguous()
                meta.append([b.objective, b.key, b.step, b.chunk, b.chunk_seed, b.n_tokens])
    save_file(tensors, f"{spec['out']}/case{i}.safetensors")
    json.dump(meta, open(f"{spec['out']}/case{i}.json", "w"))
'''


def _wait_until_prefetched(loader: PretrainLoader) -> None:
    """Make the test meaningful: the producer thread must be ahead of the consumer when the state is taken."""
    deadline = time.monotonic() + 5
    while not loader._queue.full() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loader._queue.full()


def test_state_restored_in_a_new_process_continues_exactly(shards, tmp_path):
    cases = [
        loader_kwargs(shards, prefetch=2),
        loader_kwargs(shards, mode="sentence", token_budget=6 * SEQ_LEN, accum_steps=2, pool_sentences=64,
                      prefetch=3),
    ]
    k, n = 9, 10
    spec, expected = {"out": str(tmp_path), "cases": []}, []
    for kwargs in cases:
        with PretrainLoader(**kwargs) as loader:
            take(loader, k)
            _wait_until_prefetched(loader)
            state = loader.state_dict()
            assert state["step"] == k == loader.step
            json.dumps(state)   # plain JSON
            expected.append(take(loader, n))
        spec["cases"].append({"kwargs": kwargs, "state": state, "n": n})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "resume.py").write_text(RESUME_SCRIPT)
    proc = subprocess.run([sys.executable, str(tmp_path / "resume.py"), str(tmp_path / "spec.json")],
                          env=project_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr

    for i, steps in enumerate(expected):
        tensors = load_file(str(tmp_path / f"case{i}.safetensors"))
        meta = iter(json.loads((tmp_path / f"case{i}.json").read_text()))
        for s, micro in enumerate(steps):
            for m, b in enumerate(micro):
                assert next(meta) == [b.objective, b.key, b.step, b.chunk, b.chunk_seed, b.n_tokens]
                assert torch.equal(tensors[f"{s}.{m}.input_ids"], b.input_ids)
                assert torch.equal(tensors[f"{s}.{m}.lang_ids"], b.lang_ids)
                if b.position_ids is not None:
                    assert torch.equal(tensors[f"{s}.{m}.position_ids"], b.position_ids)
        assert steps[0][0].step == k
    # the uninterrupted run covered every objective, so resume was checked for each of them
    assert {b.objective for steps in expected for micro in steps for b in micro} == {"mlm", "tlm", "clm"}


@pytest.mark.parametrize("mode", ["stream", "sentence"])
def test_close_and_reopen_rolls_back_prefetched_steps(shards, mode):
    extra = {"mode": mode, "token_budget": 4 * SEQ_LEN, "pool_sentences": 32} if mode == "sentence" else {}
    # reference: no thread, no read-ahead; threads change when work happens, never what is produced
    with PretrainLoader(**loader_kwargs(shards, prefetch=0, read_ahead=False, **extra)) as whole:
        reference = take(whole, 8)
    loader = PretrainLoader(**loader_kwargs(shards, prefetch=4, **extra))
    first = take(loader, 3)
    _wait_until_prefetched(loader)
    loader.close()
    assert loader._thread is None
    rest = take(loader, 5)   # restarts the thread from the consumed position, not the prefetched one
    loader.close()
    for got, want in zip(first + rest, reference):
        assert_same_batch(got[0], want[0])


# ---------------------------------------------------------------------------------------------- 3. DDP invariance
@pytest.mark.parametrize("mode", ["stream", "sentence"])
def test_two_ranks_see_the_chunks_of_one_rank_accumulating(shards, mode):
    extra = {"mode": mode, "token_budget": 8 * SEQ_LEN, "pool_sentences": 64} if mode == "sentence" else {}
    rank0 = PretrainLoader(**loader_kwargs(shards, world_size=2, rank=0, **extra))
    rank1 = PretrainLoader(**loader_kwargs(shards, world_size=2, rank=1, **extra))
    single = PretrainLoader(**loader_kwargs(shards, world_size=1, accum_steps=2, **extra))
    steps = 12
    seen = set()
    with rank0, rank1, single:
        for step in range(steps):
            r0, r1, one = next(rank0), next(rank1), next(single)
            assert len(r0) == len(r1) == 1 and len(one) == 2
            assert [r0[0].chunk, r1[0].chunk] == [0, 1] == [b.chunk for b in one]
            for got, want in zip([r0[0], r1[0]], one):
                assert_same_batch(got, want)
                assert got.chunk_seed == chunk_seed(7, step, got.chunk)
            assert r0[0].chunk_seed != r1[0].chunk_seed
            assert not torch.equal(r0[0].input_ids, r1[0].input_ids)   # the two ranks got different data
            seen.add(r0[0].objective)
    assert seen == {"mlm", "tlm", "clm"}


# ----------------------------------------------------------------------------------------------- 4. stream blocks
def _blocks_of(loader: PretrainLoader, lang: str, need_tokens: int) -> np.ndarray:
    """All blocks of ``lang`` in stream order until they hold ``need_tokens`` tokens (BOS column excluded)."""
    blocks, have = [], 0
    while have < need_tokens:
        for b in next(loader):
            if b.key == lang:
                blocks.append(b.input_ids.numpy())
                have += b.input_ids.shape[0] * (b.input_ids.shape[1] - 1)
    return np.concatenate(blocks)


def test_stream_blocks_cover_an_epoch_exactly_once(shards):
    lang = "fr"
    sentences = [tuple(s.tolist()) for _, l, s in shards["mono"] if l == lang]
    epoch_tokens = sum(len(s) + 1 for s in sentences)           # each sentence + its </s>
    with PretrainLoader(**loader_kwargs(shards, objectives={"mlm": 1.0, "clm": 1.0})) as loader:
        blocks = _blocks_of(loader, lang, epoch_tokens)
    assert blocks.shape[1] == SEQ_LEN
    assert (blocks[:, 0] == BOS).all()
    assert ((blocks[:, 1:] == EOS).sum(axis=1) >= 1).all()      # a block of 63 tokens always holds a sentence end
    assert not (blocks == PAD).any() and not (blocks[:, 1:] == BOS).any()
    stream = blocks[:, 1:].reshape(-1)[:epoch_tokens]
    assert stream[-1] == EOS
    cut = np.flatnonzero(stream == EOS)
    epoch = [tuple(x.tolist()) for x in np.split(stream, cut + 1)[:-1]]
    epoch = [s[:-1] for s in epoch]                              # drop the </s>
    assert Counter(epoch) == Counter(sentences)                  # nothing lost, nothing repeated within the epoch
    assert epoch != sentences                                    # and shuffled


def test_stream_order_depends_on_the_seed_only(shards):
    def first_blocks(seed):
        with PretrainLoader(**loader_kwargs(shards, seed=seed, objectives={"mlm": 1.0})) as loader:
            return [b.input_ids for step in take(loader, 6) for b in step]
    a, b, c = first_blocks(1), first_blocks(1), first_blocks(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))


# ------------------------------------------------------------------------------------- 5. sentence mode and TLM
def test_sentence_mode_keeps_the_token_budget_and_tlm_has_both_sides(shards):
    budget, seq_len = 4 * 40, 40
    kwargs = loader_kwargs(shards, mode="sentence", token_budget=budget, seq_len=seq_len, accum_steps=2,
                           pool_sentences=50)
    side_lang = {}                  # first 3 ids of every stored side -> its language (random ids: no collisions)
    for _, a, c, src, tgt in shards["para"]:
        side_lang[tuple(src[:3].tolist())] = LANGS.index(a)
        side_lang[tuple(tgt[:3].tolist())] = LANGS.index(c)
    seen_pairs_directions = set()
    sizes = []
    with PretrainLoader(**kwargs) as loader:
        for micro in take(loader, 40):
            assert len(micro) == 2 and micro[0].input_ids.shape[0] == micro[1].input_ids.shape[0]   # equal chunks
            longest = max(b.input_ids.shape[1] for b in micro)
            rows = sum(b.input_ids.shape[0] for b in micro)
            assert rows * longest <= budget
            sizes.append(rows)
            for b in micro:
                ids = b.input_ids
                assert ids.shape[1] <= seq_len and (ids[:, 0] == BOS).all()
                lengths = ids.ne(PAD).sum(1)
                assert (ids[torch.arange(len(ids)), lengths - 1] == EOS).all()
                assert b.n_tokens == int(lengths.sum())
                if b.objective != "tlm":
                    assert b.position_ids is None and (b.lang_ids == LANGS.index(b.key)).all()
                    continue
                a, c = (LANGS.index(x) for x in b.key.split("-"))
                for row, langs, pos, n in zip(ids, b.lang_ids, b.position_ids, lengths):
                    row, langs, pos = row[:n], langs[:n], pos[:n]
                    assert (row == EOS).sum() == 3                       # <s> a </s> </s> b </s>
                    second = int(torch.nonzero(pos == 0)[1])             # positions restart on the second side
                    assert row[second] == EOS and row[second - 1] == EOS
                    first_lang, second_lang = int(langs[0]), int(langs[second])
                    assert {first_lang, second_lang} == {a, c}
                    assert (langs[:second] == first_lang).all() and (langs[second:] == second_lang).all()
                    assert second >= 3 and n - second >= 3               # both sides have at least one token
                    assert side_lang[tuple(row[1:4].tolist())] == first_lang          # ids and language ids agree
                    assert side_lang[tuple(row[second + 1:second + 4].tolist())] == second_lang
                    seen_pairs_directions.add((b.key, first_lang))
    assert len(set(sizes)) > 1                                           # short sentences -> bigger batches
    assert len(seen_pairs_directions) >= 3                               # pairs are trained in both directions


# ------------------------------------------------------------------------------------------- 6. clear data errors
def test_language_missing_from_the_manifest_is_a_clear_error(shards, tmp_path):
    no_spanish = [row for row in shards["mono"] if row[1] != "es"]
    write_split(tmp_path / "train", "train", no_spanish, shards["para"])
    with pytest.raises(DataError, match=r"no tokens for languages \['es'\]"):
        PretrainLoader(**loader_kwargs(shards, split_dir=tmp_path / "train"))
    with pytest.raises(DataError, match=r"no tokens for pairs \['fr-es'\]"):
        PretrainLoader(**loader_kwargs(shards, pairs=["en-fr", "fr-es"]))
    # a language nobody trains on (tlm only) needs no mono data
    PretrainLoader(**loader_kwargs(shards, split_dir=tmp_path / "train", objectives={"tlm": 1.0}))
    with pytest.raises(DataError, match="multiple of world_size x accum_steps"):
        PretrainLoader(**loader_kwargs(shards, batch_size=6, world_size=4))
    with pytest.raises(DataError, match="manifest.json: not found"):
        PretrainLoader(**loader_kwargs(shards, split_dir=tmp_path / "nowhere"))


def test_damaged_shard_error_reaches_the_consumer_through_the_thread(shards, tmp_path):
    split = tmp_path / "train"
    shutil.copytree(shards["train"], split)
    target = split / "mono-00001.parquet"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with PretrainLoader(**loader_kwargs(shards, split_dir=split, objectives={"mlm": 1.0})) as loader:
        with pytest.raises(DataError, match=r"mono-00001\.parquet: checksum mismatch"):
            take(loader, 50)      # every language stream reaches shard 1 well before 50 steps
        with pytest.raises(DataError):   # and it stays failed instead of skipping data
            next(loader)


def test_state_from_other_shards_is_refused(shards, tmp_path):
    with PretrainLoader(**loader_kwargs(shards, prefetch=0)) as loader:
        next(loader)
        state = loader.state_dict()
    other = tmp_path / "train"
    mono, para = _corpus(5)
    write_split(other, "train", mono, para)
    with PretrainLoader(**loader_kwargs(shards, split_dir=other)) as loader:
        with pytest.raises(DataError, match="different shards"):
            loader.load_state_dict(state)
    # stream mode: a different world size / accumulation resumes fine (the position does not depend on them)
    with PretrainLoader(**loader_kwargs(shards, world_size=2, rank=1)) as loader:
        loader.load_state_dict(state)
        assert next(loader)[0].step == 1


# --------------------------------------------------------------------------------------------------- validation
def test_eval_batches_are_the_valid_split_in_order(shards):
    lang = "en"
    sentences = [s for _, l, s in shards["valid_mono"] if l == lang]
    expected = np.concatenate([np.append(s.astype(np.int64), EOS) for s in sentences])
    batches = list(iter_eval_batches(shards["valid"], LANGS, "mlm", lang, seq_len=SEQ_LEN, batch_size=4))
    assert [b.step for b in batches] == list(range(len(batches)))
    blocks = torch.cat([b.input_ids for b in batches]).numpy()
    assert (blocks[:, 0] == BOS).all() and blocks.shape[1] == SEQ_LEN
    body = blocks[:, 1:].reshape(-1)
    assert np.array_equal(body[:len(expected)], expected) and (body[len(expected):] == PAD).all()
    assert (torch.cat([b.lang_ids for b in batches]) == LANGS.index(lang)).all()
    again = list(iter_eval_batches(shards["valid"], LANGS, "mlm", lang, seq_len=SEQ_LEN, batch_size=4))
    assert all(torch.equal(x.input_ids, y.input_ids) and x.chunk_seed == y.chunk_seed for x, y in zip(batches, again))
    assert len(list(iter_eval_batches(shards["valid"], LANGS, "mlm", lang, SEQ_LEN, 4, max_batches=2))) == 2

    pairs = [(s, t) for _, a, b, s, t in shards["valid_para"] if f"{a}-{b}" == "en-fr"]
    tlm = list(iter_eval_batches(shards["valid"], LANGS, "tlm", "en-fr", seq_len=SEQ_LEN, batch_size=5))
    assert sum(b.input_ids.shape[0] for b in tlm) == len(pairs)
    first = tlm[0].input_ids[0]
    s, t = pairs[0]
    assert first[1:1 + len(s)].tolist() == s.tolist()                  # stored direction, file order
    assert first[3 + len(s):3 + len(s) + len(t)].tolist() == t.tolist()
    with pytest.raises(DataError, match="no tokens for pairs"):
        list(iter_eval_batches(shards["valid"], LANGS, "tlm", "fr-es", SEQ_LEN, 4))


def test_split_fingerprint_and_counts(shards):
    split = open_split(shards["train"])
    assert split.lang_tokens == {lang: sum(len(s) for _, l, s in shards["mono"] if l == lang) for lang in LANGS}
    assert set(split.pair_tokens) == set(PAIRS)
    assert len(split.files("mono")) == 3 and len(split.fingerprint) == 64


def test_sequence_length_warmup_cuts_stream_rows_and_keeps_every_token(shards):
    length = seq_len_schedule(128, 16, 300)
    assert [length(s) for s in (0, 99, 100, 199, 200, 299, 300, 10_000)] == [16, 16, 32, 32, 64, 64, 128, 128]
    assert seq_len_schedule(128, 16, 0)(0) == 128                       # off
    with pytest.raises(ValueError, match="power of two"):
        seq_len_schedule(128, 24, 100)

    loader = PretrainLoader(**loader_kwargs(shards, objectives={"mlm": 1.0}, seq_len=32, batch_size=4, prefetch=0))
    (batch,) = next(loader)
    cut = batch.cut_rows(8)
    assert cut.input_ids.shape == (16, 8) and cut.lang_ids.shape == (16, 8)
    assert torch.equal(cut.input_ids.reshape(4, 32), batch.input_ids)  # same tokens, same order
    assert (cut.n_tokens, cut.chunk_seed, cut.step) == (batch.n_tokens, batch.chunk_seed, batch.step)
    assert batch.cut_rows(32) is batch

    padded = replace(batch, input_ids=batch.input_ids.clone())
    padded.input_ids[3, 16:] = PAD                                        # the last row's second half is padding
    assert padded.cut_rows(8).input_ids.shape == (14, 8)                  # its two all-pad rows go
    assert padded.cut_rows(8).input_ids.ne(PAD).any(dim=1).all()

    tlm = replace(batch, objective="tlm", position_ids=torch.zeros_like(batch.input_ids))
    with pytest.raises(ValueError, match="stream-mode rows"):
        tlm.cut_rows(8)
