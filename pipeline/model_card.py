"""The model card (README.md) of the Hugging Face export: languages, data, objectives, architecture, usage.

Every fact comes from the model folder (``xlm_core.model_dir``): its config and what pretrain recorded of the run in
``training`` (the pretrain settings, training tokens per language, the final validation figures). A folder that
records none of them gives a shorter card.

The card deliberately does not embed metrics/eval.json: export would then rerun whenever evaluation settings change.
It points to the evaluation report instead and quotes the training run's own validation figures. It does state the
recipe the evaluation embeds sentences with (``recipe``: evaluate.layer, evaluate.seq_len, evaluate.center,
evaluate.scoring), with usage in sentence-transformers and in plain transformers.
"""
from __future__ import annotations

from typing import Any, Optional

import yaml

from xlm_core.hf_tokenizer import SPECIAL
from xlm_core.model_config import ModelConfig
from xlm_core.sentence_transformers_layout import RECIPE_FILE, EmbeddingRecipe


def model_card(name: str, license_: str, config: ModelConfig, languages: list[str], pairs: list[str],
               n_params: int, training: dict[str, Any], recipe: Optional[EmbeddingRecipe] = None) -> str:
    """The card's markdown; ``training`` is the model folder's record of the run (``ModelDir.training``), ``recipe``
    the evaluate stage's sentence embedding (the export's sentence-transformers layout)."""
    tags = ["xlm-roberta", "cross-lingual", "masked-lm", "xlm-pipeline"] + (["sentence-transformers"] if recipe else [])
    # The metadata goes through a YAML serializer: a value from params.yaml (the license) is quoted and escaped there,
    # so "a: b #c" or "mit\nbase_model: x" stays one string and cannot add keys to the card's front matter.
    metadata = {"language": list(languages), "license": license_, "library_name": "transformers",
                "pipeline_tag": "fill-mask", "tags": tags}
    front = ["---", yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, width=1000).rstrip("\n"), "---", ""]
    lines = [*front, f"# {name}", "",
             f"A cross-lingual encoder in the XLM-R architecture, pretrained with xlm-pipeline on "
             f"{len(languages)} languages ({', '.join(languages)}).", "",
             "## Architecture", "",
             "| layers | hidden | heads | feed-forward | vocabulary | max positions | parameters |",
             "|---|---|---|---|---|---|---|",
             f"| {config.n_layers} | {config.d_model} | {config.n_heads} | {config.d_ff} | {config.vocab_size} | "
             f"{config.max_positions} | {n_params / 1e6:.1f} M |", ""]
    lines += ["## Training", ""]
    p = training.get("pretrain")
    if p:
        objectives = ", ".join(f"{k.upper()} ({v:g})" for k, v in p.get("objectives", {}).items() if v > 0)
        lines.append(f"- Objectives (sampling weights): {objectives or 'unknown'}.")
        adv = p.get("adversarial", {})
        if adv.get("weight", 0) > 0:
            layer = f"layer {adv['layer']}" if adv.get("layer") is not None else "the middle layer"
            lines.append(f"- Language-adversarial training: a language discriminator behind gradient reversal reads "
                         f"the mean-pooled states of {layer} (weight {adv['weight']:g}, λ up to "
                         f"{adv.get('lambda_max', 1):g}).")
        lines.append(f"- {p.get('steps', '?')} steps of {p.get('batch_size', '?')} sequences × {p.get('seq_len', '?')} "
                     f"tokens ({p.get('mode', 'stream')} mode), masking {p.get('masking', {}).get('rate', 0.15):g}, "
                     f"optimizer AdamW lr {p.get('optimizer', {}).get('lr', '?')} "
                     f"({p.get('optimizer', {}).get('schedule', '?')} schedule).")
    else:
        lines.append("- Training settings unavailable (the model folder records none).")
    if pairs:
        lines.append(f"- Parallel pairs (translation LM): {', '.join(pairs)}.")
    lines.append("")
    train_tokens = training.get("train_tokens") or {}
    if train_tokens.get("languages"):
        lines += ["## Data", "", "Training tokens per language (after cleaning and de-duplication):", "",
                  "| language | sentences | tokens |", "|---|---|---|"]
        for lang, c in sorted(train_tokens["languages"].items()):
            lines.append(f"| {lang} | {c.get('rows', '?'):,} | {c.get('tokens', '?'):,} |")
        lines.append("")
    valid = training.get("valid") or {}
    if valid:
        lines += ["## Validation at the end of training", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(valid.items())]
        lines.append("")
    lines += ["## Evaluation", "",
              "Test-split perplexity, bitext retrieval and zero-shot probes, each beside a random-init baseline, are in "
              "the run's `reports/eval.md` and `metrics/eval.json` (`dvc metrics show`).", ""]
    lines += ["## Usage", "", "```python", "from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline", "",
              'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
              'model = AutoModelForMaskedLM.from_pretrained("path/to/this/folder")',
              'fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)',
              f'fill("... {SPECIAL["mask_token"]} ...")']
    if config.use_lang_emb:
        table = ", ".join(f"{lang} = {i}" for i, lang in enumerate(languages))
        lines += ["", "# This model was trained with language embeddings: pass the language of the text as",
                  "# token_type_ids (one id for the whole sequence). The ids are config.lang2id:",
                  f"#   {table}",
                  'inputs = tokenizer("Bonjour le monde", return_tensors="pt")',
                  f'inputs["token_type_ids"] = inputs["input_ids"].new_full(inputs["input_ids"].shape, '
                  f'{languages.index("fr") if "fr" in languages else 0})',
                  "outputs = model(**inputs)"]
    lines += ["```", ""]
    if config.use_lang_emb:
        lines += ["**Language embeddings.** Without `token_type_ids` the model reads every text as language 0 "
                  f"({languages[0]}); pass the ids above for the figures it was trained for. The fill-mask pipeline "
                  "does not pass them.", ""]
    lines += ["The tokenizer (`tokenizer.json`, loaded as `PreTrainedTokenizerFast`) reproduces the sentencepiece model "
              "`sentencepiece.bpe.model` with XLM-R's ids: `<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3, `<mask>` last.", ""]
    if recipe is not None:
        lines += embedding_section(recipe, languages)
    return "\n".join(lines)


def embedding_section(recipe: EmbeddingRecipe, languages: list[str]) -> list[str]:
    """The card's "Sentence embeddings" section: the evaluated recipe, and how to get its vectors."""
    n = recipe.n_layers
    where = ("the embeddings' output, before any block" if recipe.layer == 0 else
             "the last block's output" if recipe.layer == n else f"the output of block {recipe.layer}")
    module = (f" Its Transformer module is `{recipe.transformer_path}/`: this encoder cut after layer {recipe.layer} "
              f"(num_hidden_layers = {recipe.layer}), so that it outputs that layer." if recipe.transformer_path else "")
    scoring = ("cosine similarity, top-1 nearest neighbour." if recipe.scoring == "cosine" else
               f"ratio margin (Artetxe & Schwenk, 2019) of the cosine similarities over {recipe.margin_k} neighbours "
               f"each way, top-1 (sentence-transformers' `similarity` gives the cosines it is computed from).")
    lines = ["## Sentence embeddings", "",
             f"The evaluation's bitext retrieval embeds sentences with this recipe (also in `{RECIPE_FILE}`):", "",
             f"- **Layer** {recipe.layer} of {n}: {where} (`hidden_states[{recipe.layer}]` in transformers).",
             "- **Pooling**: the mean over the real tokens (`attention_mask`), `<s>` and `</s>` included.",
             f"- **Length**: at most {recipe.max_seq_length} tokens, `<s>` and `</s>` included (longer sentences are "
             f"truncated).",
             ("- **Centering**: encode, then, for a pair of collections, subtract each side's mean vector from that "
              "side's vectors (e.g. the English sentences, and the French ones searched for their translations: each "
              "loses its own mean). It removes what every sentence of a language shares; sentence-transformers "
              "cannot hold this step, so do it on the encoded vectors." if recipe.center else
              "- **Centering**: none."),
             f"- **Scoring**: {scoring}", "",
             f"`SentenceTransformer` on this folder gives the evaluation's vectors before centering (in the weights' "
             f"dtype).{module}", ""]
    center = ["src, tgt = src - src.mean(axis=0), tgt - tgt.mean(axis=0)   # each side's mean vector"
              ] if recipe.center else []
    lines += ["```python", "from sentence_transformers import SentenceTransformer", "",
              'model = SentenceTransformer("path/to/this/folder")',
              "src = model.encode(english_sentences, normalize_embeddings=False)   # numpy [n, d]",
              "tgt = model.encode(french_sentences, normalize_embeddings=False)", *center,
              "similarity = model.similarity(src, tgt)   # cosine",
              "best = similarity.argmax(dim=1)           # for each English sentence, its French translation", "```",
              "", "The same vectors with transformers alone:", "", "```python", "import torch",
              "from transformers import AutoModel, AutoTokenizer", "",
              'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
              'model = AutoModel.from_pretrained("path/to/this/folder", add_pooling_layer=False).eval()',
              f"batch = tokenizer(sentences, padding=True, truncation=True, max_length={recipe.max_seq_length}, "
              f'return_tensors="pt")']
    if recipe.language_embeddings:
        lines.append('batch["token_type_ids"] = torch.full_like(batch["input_ids"], language_id)   # config.lang2id')
    lines += ["with torch.no_grad():",
              f"    hidden = model(**batch, output_hidden_states=True).hidden_states[{recipe.layer}]",
              'mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)',
              "vectors = (hidden * mask).sum(dim=1) / mask.sum(dim=1)"]
    if recipe.center:
        lines.append("vectors = vectors - vectors.mean(dim=0)   # centering: one side of the pair at a time")
    lines += ["```", ""]
    if recipe.language_embeddings:
        lines += ["**Language embeddings.** The evaluation passes each sentence's language as `token_type_ids`; "
                  "sentence-transformers passes none, so `SentenceTransformer` reads every text as language 0 "
                  f"({languages[0]}) and gives the evaluated vectors for that language only. Use the transformers "
                  "recipe above for the others.", ""]
    return lines
