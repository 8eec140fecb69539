"""The trained-model folder (data/model/): the one module that writes and reads it.

Layout:

- ``model.safetensors``: the encoder's weights, by ``XLMModel`` parameter name;
- ``discriminator.safetensors``: the language discriminator's weights, only when adversarial training was on;
- ``config.json``: ``{"format": 2, "model": ModelConfig, "languages", "pairs", "training": {...}, "files": {name:
  {"bytes", "sha256"}}}``; ``training`` holds what evaluate and export need to know of the run (the pretrain
  settings, the discriminator's layer and hidden size, tokens per language, the final validation figures);
- the tokenizer's files (``spm.model``, ``spm.vocab``, ``tokenizer.json``), as ``xlm_core.tokenizer`` reads them.

``files`` records the size and sha256 of every other file, so a folder damaged after it was written (a byte
overwritten in the weights, a tokenizer copied from another run) is refused on load instead of being evaluated or
shipped. The folder is written whole under a temporary name and renamed into place.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from xlm_core.atomic import atomic_dir, sha256_file
from xlm_core.errors import XLMError
from xlm_core.model_config import ModelConfig
from xlm_core.tokenizer import SPM_MODEL, TOKENIZER_JSON, Tokenizer

FORMAT = 2
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
DISCRIMINATOR = "discriminator.safetensors"
FIX = "run `dvc repro pretrain` (or `dvc checkout data/model`)"


class ModelDirError(XLMError):
    """data/model is missing, damaged or inconsistent."""


@dataclass
class ModelDir:
    path: Path
    config: ModelConfig
    state: dict[str, torch.Tensor]
    languages: list[str]
    pairs: list[str]
    tokenizer: Tokenizer
    discriminator: Optional[dict[str, torch.Tensor]] = None
    training: dict[str, Any] = field(default_factory=dict)


def save_model_dir(path: str | Path, *, config: ModelConfig, state: dict[str, torch.Tensor], tokenizer_dir: str | Path,
                   languages: list[str], pairs: list[str], discriminator: Optional[dict[str, torch.Tensor]] = None,
                   training: Optional[dict[str, Any]] = None) -> Path:
    """Write the folder atomically. ``state`` is the encoder's state dict (no ``model.`` prefix), ``discriminator``
    the language discriminator's (no ``discriminator.`` prefix) when adversarial training was on."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(_plain(state), str(tmp / WEIGHTS), metadata={"format": "pt"})
        if discriminator is not None:
            save_file(_plain(discriminator), str(tmp / DISCRIMINATOR), metadata={"format": "pt"})
        for f in sorted(Path(tokenizer_dir).iterdir()):
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in sorted(tmp.iterdir())}
        meta = {"format": FORMAT, "model": config.to_dict(), "languages": list(languages), "pairs": list(pairs),
                "training": training or {}, "files": files}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Tied weights share storage, which safetensors refuses: store contiguous copies by name.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def load_model_dir(path: str | Path, *, with_discriminator: bool = True) -> ModelDir:
    """Read and check the folder: every file's size and sha256, the config, the tokenizer against the model."""
    path = Path(path)
    config_path = path / CONFIG
    if not config_path.is_file():
        raise ModelDirError(f"{config_path}: not found; {FIX}")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:   # an older pretrain's folder records neither file hashes nor the run
            raise ModelDirError(f"{config_path}: model folder format {meta.get('format')}, this code reads format "
                                f"{FORMAT}; {FIX}")
        config = ModelConfig.from_dict(meta["model"])
        languages, pairs, files = list(meta["languages"]), list(meta.get("pairs", [])), dict(meta["files"])
        training = dict(meta.get("training") or {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelDirError(f"{config_path}: not a model folder's config ({exc}); {FIX}") from None
    for name in (WEIGHTS, SPM_MODEL, TOKENIZER_JSON):
        if name not in files:
            raise ModelDirError(f"{config_path}: lists no {name}; {FIX}")
    for name, expected in sorted(files.items()):
        _check_file(path / name, expected)
    state = _load_weights(path / WEIGHTS)
    discriminator = _load_weights(path / DISCRIMINATOR) if with_discriminator and DISCRIMINATOR in files else None
    tokenizer = Tokenizer.load(path)   # its files' bytes are checked above: a TokenizerError here is its own line
    if tokenizer.vocab_size != config.vocab_size:
        raise ModelDirError(f"{path}: tokenizer has {tokenizer.vocab_size} ids but the model "
                            f"{config.vocab_size}; {FIX}")
    return ModelDir(path=path, config=config, state=state, languages=languages, pairs=pairs, tokenizer=tokenizer,
                    discriminator=discriminator, training=training)


def _load_weights(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ModelDirError(f"{file}: unreadable ({str(exc)[:200]}); {FIX}") from None


def _check_file(file: Path, expected: dict) -> None:
    try:
        size = file.stat().st_size
    except OSError:
        raise ModelDirError(f"{file}: not found; {FIX}") from None
    if size != expected.get("bytes") or sha256_file(file) != expected.get("sha256"):
        raise ModelDirError(f"{file}: its bytes differ from those written by pretrain (damaged, or replaced by "
                            f"another run's file); {FIX}")
