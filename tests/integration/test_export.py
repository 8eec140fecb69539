"""export stage: the Hugging Face folder loads offline with transformers (a subprocess with HF_HUB_OFFLINE=1), its
tokenizer gives our ids on Latin, Cyrillic and Arabic text, its logits equal ours, fill-mask works; plus the
sentencepiece reader, BPE tokenizers, dtypes, the model card, errors, and the DVC wiring of evaluate/export.
The sentence-transformers layout beside the masked-LM files: tests/integration/test_export_st.py."""
from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from tests.helpers.project import ROOT, dvc, project_env, python_module, run
from tests.helpers.model_runs import LANGS, build_run, set_section
from tests.helpers.corpora import write_clean, write_tokenizer_shard_params

from pipeline.export import export
from pipeline.params import load_params
from pipeline.params.evaluate import EvaluateParams
from pipeline.tokenizer import train_tokenizer
from xlm_core.evaluation.suite_file import write_suites
from xlm_core.hf_tokenizer import read_spm_model, tokenizer_json
from xlm_core.model import XLMModel
from xlm_core.model_config import ModelConfig
from xlm_core.tokenizer import Tokenizer

# Latin with accents, Cyrillic, Arabic; odd spacing; a character the tokenizer never saw; digits.
TEXTS = [
    "The light of day and the king of the sea.",
    "Été: le château où la forêt est très déjà.",
    "Свет день вода царь народ земля.",
    "النور يوم الماء الملك الشعب الأرض.",
    "the  house   word",
    " leading space and trailing ",
    "Ωψ unknown 2024 сердце",
]
FILL_TEXT = "The king of the <mask>."


def export_run(root: Path, params_path: Path, out: Path | None = None) -> Path:
    out = out or root / "export" / "hf"
    return export(load_params("export", params_path), root / "model", out, load_params("evaluate", params_path))


def our_logits(model_dir: Path, ids: list[list[int]], lang: int | None) -> list[list[list[float]]]:
    from safetensors.torch import load_file

    meta = json.loads((model_dir / "config.json").read_text())
    model = XLMModel(ModelConfig.from_dict(meta["model"])).eval()
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    out = []
    with torch.no_grad():
        for row in ids:
            x = torch.tensor([row])
            lang_ids = torch.full_like(x, lang) if lang is not None else None
            out.append(model.mlm_logits(model(x, lang_ids=lang_ids).hidden)[0])
    return out


HF_CHECK = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline
    folder, texts, fill_text, lang = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    ids = [tok(t)["input_ids"] for t in texts]
    logits = []
    with torch.no_grad():
        for row in ids:
            x = torch.tensor([row])
            extra = {"token_type_ids": torch.full_like(x, lang)} if lang is not None else {}
            logits.append(model(input_ids=x, **extra).logits[0].tolist())
    fill = pipeline("fill-mask", model=model, tokenizer=tok)(fill_text)
    print(json.dumps({"class": type(tok).__name__, "ids": ids, "logits": logits, "fill": fill,
                      "decoded": [tok.decode(r, skip_special_tokens=True) for r in ids],
                      "mask_id": tok.mask_token_id, "pad_id": tok.pad_token_id}))
""")


def hf_check(folder: Path, lang: int | None = None) -> dict:
    proc = run([sys.executable, "-c", HF_CHECK, str(folder), json.dumps(TEXTS), FILL_TEXT, json.dumps(lang)],
               cwd=folder, env=project_env({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}))
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    params_path = build_run(root)
    return root, params_path, export_run(root, params_path)


# --------------------------------------------------------------------------------------------------- the folder
def test_folder_layout_and_config(exported):
    root, _params, out = exported
    masked_lm = ["README.md", "config.json", "model.safetensors", "sentencepiece.bpe.model", "special_tokens_map.json",
                 "tokenizer.json", "tokenizer_config.json"]
    sentence_transformers = ["0_Transformer", "1_Pooling", "config_sentence_transformers.json",
                             "embedding_recipe.json", "modules.json"]   # tests/integration/test_export_st.py
    assert sorted(p.name for p in out.iterdir()) == sorted(masked_lm + sentence_transformers)
    config = json.loads((out / "config.json").read_text())
    model_cfg = json.loads((root / "model" / "config.json").read_text())["model"]
    assert config["model_type"] == "xlm-roberta"
    assert config["vocab_size"] == model_cfg["vocab_size"]
    assert config["max_position_embeddings"] == model_cfg["max_positions"] + 2
    assert "lang2id" not in config
    assert (out / "sentencepiece.bpe.model").read_bytes() == (root / "model" / "spm.model").read_bytes()
    assert not list(out.parent.glob("*.tmp-*"))


def test_hf_loads_offline_with_our_ids_logits_and_fill_mask(exported):
    root, _params, out = exported
    tok = Tokenizer.load(root / "model")
    got = hf_check(out)
    ours = [[0, *tok.encode(t), 2] for t in TEXTS]
    assert got["ids"] == ours
    assert got["mask_id"] == tok.mask_id and got["pad_id"] == 1
    known = [i for i, row in enumerate(ours) if tok.unk_id not in row]   # HF drops <unk> when decoding; we show ⁇
    assert len(known) >= 3
    assert [got["decoded"][i] for i in known] == [tok.decode(ours[i]) for i in known]
    for mine, theirs in zip(our_logits(root / "model", ours, None), got["logits"]):
        assert torch.allclose(mine, torch.tensor(theirs), atol=1e-4), float((mine - torch.tensor(theirs)).abs().max())
    assert len(got["fill"]) == 5
    assert all(0 <= p["score"] <= 1 and p["sequence"] for p in got["fill"])


def test_language_embeddings_export_as_token_type_ids(tmp_path):
    params_path = build_run(tmp_path, use_lang_emb=True)
    out = export_run(tmp_path, params_path)
    config = json.loads((out / "config.json").read_text())
    assert config["type_vocab_size"] == len(LANGS)
    assert config["lang2id"] == {lang: i for i, lang in enumerate(LANGS)}
    card = (out / "README.md").read_text()
    assert "token_type_ids" in card and "ru = 2" in card
    assert "reads every text as language 0" in card   # SentenceTransformer passes no token_type_ids
    assert json.loads((out / "embedding_recipe.json").read_text())["language_embeddings"] is True
    tok = Tokenizer.load(tmp_path / "model")
    ru = LANGS.index("ru")
    got = hf_check(out, lang=ru)
    ours = [[0, *tok.encode(t), 2] for t in TEXTS]
    assert got["ids"] == ours
    for mine, theirs in zip(our_logits(tmp_path / "model", ours, ru), got["logits"]):
        assert torch.allclose(mine, torch.tensor(theirs), atol=1e-4)


# ---------------------------------------------------------------------------------------------- tokenizer.json
def test_spm_reader_agrees_with_protobuf(exported):
    from sentencepiece import sentencepiece_model_pb2 as pb

    root, _params, _out = exported
    data = (root / "model" / "spm.model").read_bytes()
    proto = pb.ModelProto()
    proto.ParseFromString(data)
    spm = read_spm_model(data)
    assert [(p.piece, p.type) for p in proto.pieces] == [(p, t) for p, _s, t in spm.pieces]
    assert [p.score for p in proto.pieces] == pytest.approx([s for _p, s, _t in spm.pieces])
    assert spm.model_type == proto.trainer_spec.model_type
    assert spm.byte_fallback == proto.trainer_spec.byte_fallback
    ns = proto.normalizer_spec
    assert (spm.precompiled_charsmap, spm.add_dummy_prefix, spm.remove_extra_whitespaces, spm.escape_whitespaces) == (
        ns.precompiled_charsmap, ns.add_dummy_prefix, ns.remove_extra_whitespaces, ns.escape_whitespaces)


def _fast_tokenizer_ids(tok_dir: Path, texts: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer as FastTokenizer

    tok = Tokenizer.load(tok_dir)
    spec = tokenizer_json(read_spm_model((tok_dir / "spm.model").read_bytes()), tok.vocab_size)
    fast = FastTokenizer.from_str(json.dumps(spec))
    return [fast.encode(t).ids for t in texts]


@pytest.mark.parametrize("model_type, byte_fallback", [("unigram", False), ("bpe", False), ("unigram", True)])
def test_tokenizer_json_reproduces_sentencepiece(tmp_path, model_type, byte_fallback):
    """The JSON alone, read by the `tokenizers` library, gives sentencepiece's ids for every model type we train."""
    langs = ["en", "fr", "ru", "ar"]
    write_clean(tmp_path / "clean", {lang: 200 for lang in langs}, splits=("train", "valid"))
    params = write_tokenizer_shard_params(tmp_path / "params.yaml", langs, tokenizer={
        "vocab_size": 400 if byte_fallback else 120, "model_type": model_type, "byte_fallback": byte_fallback})
    train_tokenizer(load_params("tokenizer", params), tmp_path / "clean", tmp_path / "tok", tmp_path / "m.json")
    tok = Tokenizer.load(tmp_path / "tok")
    texts = TEXTS + ["Ωψ 中文 emoji 🙂", "déjà-vu: l'été, 12.5%!", "вода\tтаб"]
    ours = [[0, *tok.encode(t), 2] for t in texts]
    assert _fast_tokenizer_ids(tmp_path / "tok", texts) == ours
    if byte_fallback:   # unseen characters became UTF-8 byte pieces, not <unk>
        assert tok.unk_id not in ours[-3] and tok.piece_to_id("<0xCE>") in ours[-3]


# ------------------------------------------------------------------------------------------------ options, card
def test_dtype_option_and_model_card(exported, tmp_path):
    from safetensors import safe_open

    root, params_path, _out = exported
    data = yaml.safe_load(params_path.read_text())
    data["export"].update(dtype="fp16", name="my-encoder", license="cc-by-4.0")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data))
    out = export(load_params("export", params), root / "model", tmp_path / "hf", load_params("evaluate", params))
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("roberta.embeddings.word_embeddings.weight").dtype == torch.float16
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["license"] == "cc-by-4.0" and card.startswith("---\nlanguage:\n- en\n")
    assert "# my-encoder" in card
    assert "MLM (1), TLM (0.5)" in card and "Language-adversarial" in card
    assert "| en | 400 |" in card                       # training sentences per language (the shard manifest's)
    assert "mlm_accuracy/en | 0.25" in card           # the run's own validation figures
    assert "token_type_ids" not in card


def test_pre_ln_model_is_refused_and_previous_export_kept(exported, tmp_path):
    root, params_path, out = exported
    bad = tmp_path / "model"
    shutil.copytree(root / "model", bad)
    meta = json.loads((bad / "config.json").read_text())
    meta["model"]["pre_ln"] = True
    (bad / "config.json").write_text(json.dumps(meta))
    target = tmp_path / "hf"
    shutil.copytree(out, target)
    before = {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    proc = run(python_module("pipeline.export", "--params", str(params_path), "--model", str(bad), "--out",
                             str(target)), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: [export] ") and "pre_ln" in last and "retrain" in last
    assert {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------------------------------------------- DVC wiring
def _stage_project(tmp_path: Path, root: Path, params_path: Path) -> Path:
    """A git + DVC project holding only the evaluate and export stages of the real dvc.yaml, their inputs as files."""
    proj = tmp_path / "proj"
    proj.mkdir()
    run(["git", "init", "-q"], proj)
    run([sys.executable, "-m", "dvc", "init", "-q"], proj)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    (proj / "dvc.yaml").write_text(yaml.safe_dump({"stages": {k: stages[k] for k in ("evaluate", "export")}},
                                                   sort_keys=False))
    data = yaml.safe_load(params_path.read_text())
    # DVC refuses a listed params key that params.yaml lacks: write the embedding recipe's keys the export stage lists
    recipe_keys = [k.split(".", 1)[1] for k in stages["export"]["params"] if k.startswith("evaluate.")]
    data["evaluate"] = {**EvaluateParams().model_dump(include=set(recipe_keys)), **data["evaluate"]}
    (proj / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    for pkg in ("pipeline", "xlm_core"):
        shutil.copytree(ROOT / pkg, proj / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for name, target in (("model", "data/model"), ("shards", "data/shards")):
        shutil.copytree(root / name, proj / target)
    suites = "data/clean/eval/suites.parquet"   # the out-of-domain suites, when evaluate lists them: none here
    if suites in stages["evaluate"]["deps"]:
        write_suites(proj / suites, [])
    (proj / ".gitignore").write_text("/data/\n__pycache__/\n")
    return proj


def _changed_stages(proj: Path) -> set[str]:
    status = json.loads(dvc(proj, "status", "--json").stdout or "{}")
    return set(status)


@pytest.mark.slow   # ~45 s on a busy 2-core machine: two stage subprocesses and six dvc calls
def test_dvc_reruns_only_the_stage_whose_params_changed(exported, tmp_path):
    root, params_path, _out = exported
    proj = _stage_project(tmp_path, root, params_path)
    dvc(proj, "repro")
    assert (proj / "metrics" / "eval.json").is_file() and (proj / "data" / "export" / "hf" / "tokenizer.json").is_file()
    assert (proj / "reports" / "eval" / "retrieval.png").is_file() and (proj / "reports" / "eval.md").is_file()
    assert _changed_stages(proj) == set()
    shown = dvc(proj, "metrics", "show", "--md").stdout
    assert "mlm_perplexity.en.trained" in shown and "mlm_perplexity.en.baseline" in shown
    original = (proj / "params.yaml").read_text()

    set_section(proj / "params.yaml", "evaluate", seed=99)
    assert _changed_stages(proj) == {"evaluate"}
    (proj / "params.yaml").write_text(original)
    assert _changed_stages(proj) == set()
    set_section(proj / "params.yaml", "evaluate", layer=0)   # the embedding recipe the export carries
    assert _changed_stages(proj) == {"evaluate", "export"}
    (proj / "params.yaml").write_text(original)
    set_section(proj / "params.yaml", "export", name="renamed")
    assert _changed_stages(proj) == {"export"}
    set_section(proj / "params.yaml", "export", name="tiny-test")
    (proj / "data" / "model" / "model.safetensors").write_bytes(b"changed")   # a new model: both rerun
    assert _changed_stages(proj) == {"evaluate", "export"}
