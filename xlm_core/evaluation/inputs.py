"""What one model is scored on: the test split's bitexts, the out-of-domain suites and the user's suites, tokenized,
the probes' test sentences, and the plan holding them."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from xlm_core.shards import ShardSet
from xlm_core.tokenizer import Tokenizer

if TYPE_CHECKING:
    from xlm_core.evaluation.probes import ProbePlan
    from xlm_core.evaluation.suite_file import TextSuite

OUT_OF_DOMAIN = "out_of_domain"     # the suite file's domain of the eval sources


@dataclass
class Bitext:
    """Aligned test sentences of one pair (row i of src translates row i of tgt), sorted by segment id."""

    src_lang: str
    tgt_lang: str
    ids: list[str]
    src: list[np.ndarray]
    tgt: list[np.ndarray]


def read_bitexts(test_dir: Path, tokenizer: Tokenizer, pairs: list[str], cap: int) -> dict[str, Bitext]:
    """The para test rows of each pair, joined on `id` by the clean stage; the first ``cap`` ids of each pair."""
    rows: dict[str, dict[str, tuple]] = {pair: {} for pair in pairs}
    shards = ShardSet(test_dir, tokenizer=tokenizer)
    for table in shards.iter_tables("para", columns=["id", "src_lang", "tgt_lang", "src_ids", "tgt_ids"]):
        src_lang = table.column("src_lang").cast("string").to_pylist()
        tgt_lang = table.column("tgt_lang").cast("string").to_pylist()
        ids = table.column("id").to_pylist()
        src_ids, tgt_ids = table.column("src_ids"), table.column("tgt_ids")
        for i, (a, b) in enumerate(zip(src_lang, tgt_lang)):
            pair = f"{a}-{b}"
            if pair in rows:
                rows[pair][ids[i]] = (src_ids[i].values.to_numpy(), tgt_ids[i].values.to_numpy())
    out = {}
    for pair, by_id in rows.items():
        keys = sorted(by_id)[:cap]
        src_lang, tgt_lang = pair.split("-")
        out[pair] = Bitext(src_lang, tgt_lang, keys, [by_id[k][0] for k in keys], [by_id[k][1] for k in keys])
    return out


@dataclass
class OutOfDomainSuite:
    """One suite of the suite file (e.g. Django's catalogs): a Bitext per language pair, scored as the test split's."""

    name: str
    bitexts: dict[str, Bitext]


def out_of_domain_suites(suites: list[TextSuite], tokenizer: Tokenizer, languages: list[str], cap: int
                         ) -> tuple[list[OutOfDomainSuite], list[str]]:
    """The suite file's out-of-domain suites as token ids (pairs of ``languages`` only, the first ``cap`` ids of each
    pair, as the test bitexts), and notes on what was left out."""
    notes = []
    by_name: dict[str, dict[str, Bitext]] = {}
    for suite in suites:
        if suite.domain != OUT_OF_DOMAIN:
            notes.append(f"suite {suite.name}: domain {suite.domain!r}, not {OUT_OF_DOMAIN!r}; not scored here")
        elif suite.src_lang not in languages or suite.tgt_lang not in languages:
            notes.append(f"suite {suite.name}: a language outside params.yaml languages; not scored")
        elif len(suite.ids) < 2:
            notes.append(f"suite {suite.name}: {len(suite.ids)} pair(s); retrieval needs at least two")
        else:
            n = min(cap, len(suite.ids))   # the file is sorted by id: the first ones by id, as for the test split
            by_name.setdefault(suite.suite, {})[suite.pair] = Bitext(
                suite.src_lang, suite.tgt_lang, list(suite.ids[:n]), tokenizer.encode_batch(suite.src[:n]),
                tokenizer.encode_batch(suite.tgt[:n]))
    out = []
    for name, bitexts in by_name.items():
        # Retrieval embeds each (language, id) once for all pairs, so a suite whose id means different sentences in
        # two pairs (the writer only promises ids stable within a suite) gets ids made unique per pair.
        seen: dict[tuple[str, str], bytes] = {}
        clash = False
        for bitext in bitexts.values():
            for lang, side in ((bitext.src_lang, bitext.src), (bitext.tgt_lang, bitext.tgt)):
                for seg_id, tokens in zip(bitext.ids, side):
                    clash |= seen.setdefault((lang, seg_id), tokens.tobytes()) != tokens.tobytes()
        if clash:
            for pair, bitext in bitexts.items():
                bitext.ids = [f"{pair}/{seg_id}" for seg_id in bitext.ids]
        out.append(OutOfDomainSuite(name, bitexts))
    return out, notes


@dataclass
class RetrievalData:
    """A retrieval suite: line i of src translates line i of tgt."""

    name: str
    src_lang: str
    tgt_lang: str
    src: list[np.ndarray]
    tgt: list[np.ndarray]


@dataclass
class ClassificationData:
    """A zero-shot classification suite: a probe is trained on ``train_lang`` and tested on the other languages."""

    name: str
    train_lang: str
    classes: list[str]
    labels: dict[str, torch.Tensor]            # language -> class indices
    texts: dict[str, list[np.ndarray]]         # language -> token ids


@dataclass
class EvalPlan:
    """Everything one model is scored on (the same for the trained model and its baseline)."""

    test_dir: Path
    tokenizer: Tokenizer
    model_languages: list[str]                 # the model's language ids, in order
    languages: list[str]                       # languages with test text
    pairs: list[str]                           # pairs with test text
    bitexts: dict[str, Bitext]
    retrieval_suites: list[RetrievalData]
    classification_suites: list[ClassificationData]
    layer: int                                 # pooled for retrieval and probes (0 = embeddings)
    clm: bool                                  # also score causal LM
    discriminator_layer: Optional[int]         # the layer the language discriminator reads, when there is one
    out_of_domain: list[OutOfDomainSuite] = field(default_factory=list)
    out_of_domain_note: Optional[str] = None   # why there is no out-of-domain figure, when there is none
    probes: Optional[ProbePlan] = None         # the language-ID and genre probes' test sentences and splits

    def lang_index(self, lang: str) -> int:
        # A language the model never saw (allowed without language embeddings) gets id 0, which is then unused.
        return self.model_languages.index(lang) if lang in self.model_languages else 0

    def directions(self) -> list[str]:
        """Both retrieval directions of every bitext, as eval.json keys them."""
        return [d for pair, b in self.bitexts.items() for d in (pair, f"{b.tgt_lang}-{b.src_lang}")]
