"""export stage, the sentence-transformers layout: `SentenceTransformer(folder)` (real sentence-transformers, in a
subprocess with HF_HUB_OFFLINE=1) gives xlm_core.metrics.pooled_embeddings' vectors at evaluate.layer (0, the middle
one, the last), so does the card's plain-transformers recipe, and the ST vectors, centred and scored as the recipe file
says, reproduce the evaluate stage's out-of-domain retrieval figures of eval.json."""
from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tests.helpers.model_runs import build_run, set_section
from tests.helpers.project import project_env, run

from pipeline.errors import PipelineError
from pipeline.evaluate import evaluate
from pipeline.export import export
from pipeline.params import load_params
from xlm_core.evaluation.suite_file import TextSuite, write_suites
from xlm_core.metrics import bitext_retrieval, pooled_embeddings
from xlm_core.model import XLMModel
from xlm_core.model_dir import load_model_dir

pytest.importorskip("sentence_transformers")   # the test extra of pyproject.toml

TEXTS = [
    "The light of day and the king of the sea.",
    "Été: le château où la forêt est très déjà.",
    "Свет день вода царь народ земля.",
    "النور يوم الماء الملك الشعب الأرض.",
    "the  house   word",
    "a",
    " ".join(["the king of the sea"] * 30),   # > evaluate.seq_len (64) tokens: truncated
]
SUITE, PER_PAIR = "fixture_ood", 40

# One subprocess for every folder: SentenceTransformer's vectors and the card's transformers recipe.
ST_CHECK = textwrap.dedent("""
    import json, sys, torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer
    out = []
    for job in json.loads(sys.argv[1]):
        folder, texts, recipe = job["folder"], job["texts"], json.load(open(job["folder"] + "/embedding_recipe.json"))
        st = SentenceTransformer(folder, device="cpu")
        vectors = st.encode(texts, batch_size=4, convert_to_numpy=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder, add_pooling_layer=False).eval()
        batch = tokenizer(texts, padding=True, truncation=True, max_length=recipe["max_seq_length"],
                          return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states[recipe["layer"]]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        plain = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
        transformer = st[0].model if hasattr(st[0], "model") else st[0].auto_model   # 6.x | 2.x-5.x
        out.append({"st": vectors.tolist(), "plain": plain.tolist(), "max_seq_length": st.max_seq_length,
                    "modules": [type(m).__name__ for m in st], "blocks": transformer.config.num_hidden_layers,
                    "pooler": transformer.pooler is not None, "pooling": st[1].get_config_dict(),
                    "dim": len(vectors[0])})
    print(json.dumps(out))
""")


def st_check(jobs: list[dict]) -> list[dict]:
    proc = run([sys.executable, "-c", ST_CHECK, json.dumps(jobs)], cwd=Path(jobs[0]["folder"]),
               env=project_env({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}))
    assert "No sentence-transformers model found" not in proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ours(model_dir: Path, texts: list[str], layer: int, seq_len: int) -> torch.Tensor:
    folder = load_model_dir(model_dir, with_discriminator=False)
    model = XLMModel(folder.config).eval()
    model.load_state_dict(folder.state)
    ids = [folder.tokenizer.encode(t) for t in texts]
    return pooled_embeddings(model, ids, 0, layer, seq_len, 3, torch.device("cpu"))


def write_ood_suite(root: Path) -> tuple[Path, list[TextSuite]]:
    """An out-of-domain suite file of the three pairs, from the fixture's training pairs; half of each pair's target
    sentences are the source sentence itself (names, numbers, code in real catalogues), so retrieval is far from chance
    and reproducing it says something."""
    suites: dict[str, TextSuite] = {}
    for row in pq.read_table(root / "clean" / "para" / "train.parquet").to_pylist():
        pair = f"{row['src_lang']}-{row['tgt_lang']}"
        suite = suites.setdefault(pair, TextSuite(SUITE, "out_of_domain", row["src_lang"], row["tgt_lang"]))
        if len(suite.ids) < PER_PAIR:
            suite.ids.append(f"{pair}.{len(suite.ids):03d}")
            suite.src.append(row["src"])
            suite.tgt.append(row["src"] if len(suite.ids) % 2 else row["tgt"])
    path = root / "eval" / "suites.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_suites(path, list(suites.values()))
    return path, list(suites.values())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_st")
    return root, build_run(root)


def export_at(root: Path, params_path: Path, layer: int | None) -> Path:
    params = root / f"params-{layer}.yaml"
    shutil.copy(params_path, params)
    set_section(params, "evaluate", layer=layer)
    return export(load_params("export", params), root / "model", root / f"hf-{layer}", load_params("evaluate", params))


# ------------------------------------------------------------------------------------------------------ the layout
def test_layout_for_a_middle_layer_the_last_and_layer_zero(tiny):
    root, params_path = tiny
    middle, last, zero = (export_at(root, params_path, layer) for layer in (None, 2, 0))
    recipe = json.loads((middle / "embedding_recipe.json").read_text())
    assert (recipe["layer"], recipe["num_hidden_layers"], recipe["max_seq_length"]) == (1, 2, 64)   # null = middle
    assert (recipe["centering"], recipe["scoring"], recipe["sentence_transformers_module"]) == (
        "per_language_mean", "cosine", "0_Transformer")
    modules = json.loads((middle / "modules.json").read_text())
    assert [(m["path"], m["type"].rsplit(".", 1)[1]) for m in modules] == [("0_Transformer", "Transformer"),
                                                                          ("1_Pooling", "Pooling")]
    pooling = json.loads((middle / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    sub = json.loads((middle / "0_Transformer" / "config.json").read_text())
    assert (sub["num_hidden_layers"], sub["architectures"]) == (1, ["XLMRobertaModel"])
    assert json.loads((middle / "0_Transformer" / "sentence_bert_config.json").read_text())["max_seq_length"] == 64
    assert not (middle / "sentence_bert_config.json").exists()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):   # the masked-LM files do not depend on it
        assert (middle / name).read_bytes() == (last / name).read_bytes()
    assert json.loads((last / "modules.json").read_text())[0]["path"] == ""
    assert (last / "sentence_bert_config.json").is_file() and not (last / "0_Transformer").exists()
    assert json.loads((zero / "0_Transformer" / "config.json").read_text())["num_hidden_layers"] == 0
    card = (middle / "README.md").read_text()
    assert "## Sentence embeddings" in card and "**Layer** 1 of 2" in card and "hidden_states[1]" in card
    assert "for a pair of collections, subtract each side's mean vector" in card and "SentenceTransformer(" in card


def test_sentence_transformers_gives_the_evaluated_vectors_at_every_layer(tiny):
    root, params_path = tiny
    layers = [0, None, 2]   # the embeddings' output (a 0-block model), the middle one (1), the last
    folders = [export_at(root, params_path, layer) for layer in layers]
    got = st_check([{"folder": str(f), "texts": TEXTS} for f in folders])
    for layer, result in zip([0, 1, 2], got):
        assert result["modules"] == ["Transformer", "Pooling"]
        pooling = result["pooling"]   # 6.x: pooling_mode; 2.x-5.x: pooling_mode_<mode> flags
        assert pooling.get("pooling_mode", "mean") == "mean" and pooling.get("pooling_mode_mean_tokens", True)
        assert not any(v for k, v in pooling.items() if k.startswith("pooling_mode_") and k != "pooling_mode_mean_tokens")
        assert (result["blocks"], result["max_seq_length"], result["dim"], result["pooler"]) == (layer, 64, 64, False)
        want = ours(root / "model", TEXTS, layer, 64)
        for name in ("st", "plain"):
            diff = float((torch.tensor(result[name]) - want).abs().max())
            assert diff < 1e-5, (layer, name, diff)


# ------------------------------------------------------------------------------ eval.json, reproduced from the export
def test_st_vectors_reproduce_the_out_of_domain_figures_of_eval_json(tiny):
    root, params_path = tiny
    suites_path, suites = write_ood_suite(root)
    evaluate(load_params("evaluate", params_path), root / "model", root / "shards", root / "metrics" / "eval.json",
             root / "reports" / "eval.md", root / "reports" / "eval", suites_path)
    figures = json.loads((root / "metrics" / "eval.json").read_text())["out_of_domain"]["suites"][SUITE]["directions"]
    folder = export(load_params("export", params_path), root / "model", root / "hf", load_params("evaluate",
                                                                                                 params_path))
    recipe = json.loads((folder / "embedding_recipe.json").read_text())
    assert recipe["centering"] == "per_language_mean" and recipe["layer"] == 1
    assert "for a pair of collections, subtract each side's mean vector" in recipe["centering_meaning"]

    # As the card says: each pair is a pair of collections (its sources, its targets), each side loses its own mean.
    encoded = st_check([{"folder": str(folder), "texts": texts} for s in suites for texts in (s.src, s.tgt)])
    reproduced = 0
    for k, s in enumerate(suites):
        src, tgt = (torch.from_numpy(np.asarray(r["st"], dtype=np.float32)) for r in encoded[2 * k:2 * k + 2])
        src, tgt = src - src.mean(dim=0), tgt - tgt.mean(dim=0)   # the recipe's centering
        result = bitext_retrieval(src, tgt, recipe["scoring"], recipe["margin_k"])
        for direction, value in ((s.pair, result.forward), (f"{s.tgt_lang}-{s.src_lang}", result.backward)):
            assert figures[direction]["n"] == PER_PAIR
            assert value == pytest.approx(figures[direction]["trained"], abs=1e-6), direction
            reproduced += 1
        assert result.forward > 0.3   # the planted identical pairs are found: far from chance (1/40)
    assert reproduced == 6


# ---------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("key, value, words", [("layer", 3, ["evaluate.layer = 3", "layers 0..2", "null"]),
                                               ("seq_len", 200, ["evaluate.seq_len = 200", "max_positions = 128"])])
def test_a_recipe_the_model_cannot_carry_is_one_line_before_anything_is_written(tiny, tmp_path, key, value, words):
    root, params_path = tiny
    params = tmp_path / "params.yaml"
    shutil.copy(params_path, params)
    set_section(params, "evaluate", **{key: value})
    with pytest.raises(PipelineError) as caught:
        export(load_params("export", params), root / "model", tmp_path / "hf", load_params("evaluate", params))
    message = str(caught.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert not (tmp_path / "hf").exists()
