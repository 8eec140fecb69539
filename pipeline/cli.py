"""``xlm``: one subcommand per stage (the same entry points dvc.yaml calls as ``python -m pipeline.<stage>``)."""
from __future__ import annotations

import argparse
import importlib
import sys

STAGES = {
    "params": "validate every section of params.yaml (the first stage of dvc.yaml)",
    "download": "fetch the corpus sources listed in params.yaml into data/raw/",
    "clean": "normalise, filter, de-duplicate and split into data/clean/",
    "tokenizer": "train the shared sentencepiece vocabulary into data/tokenizer/",
    "shard": "encode the clean splits into Parquet shards under data/shards/",
    "pretrain": "train the encoder (torchrun, DDP/FSDP) into data/model/",
    "evaluate": "perplexity, bitext retrieval and probes into metrics/eval.json",
    "export": "write a Hugging Face XLM-R folder to data/export/hf/",
    "flow": "run dvc.yaml as a Prefect flow (watch it in the Prefect UI)",
}

MODULES = {"params": "check_params"}   # pipeline.params is the schema package


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="xlm", description="Cross-lingual encoder pretraining pipeline. Usually run through `dvc repro`.")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    for name, help_text in STAGES.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        parser.print_usage(sys.stderr)
        print(f"error: unknown stage {stage!r}; choose one of {', '.join(STAGES)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"pipeline.{MODULES.get(stage, stage)}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
