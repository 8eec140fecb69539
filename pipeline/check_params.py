"""The `params` stage: validate every section of params.yaml before any other stage runs (and before DVC removes any
stage's outputs).

DVC deletes a stage's outputs just before it runs the stage's command. A typo in the ``pretrain`` section would
otherwise be found by the pretrain stage itself, after DVC had removed ``data/model`` and ``metrics/pretrain.json``.
This stage tracks the whole of params.yaml (any edit reruns it, in about a second), runs every section's schema and
the settings checks that need no data, and writes ``data/params.ok``, whose bytes never change: every other stage
lists it as a dependency, so DVC runs this stage first, and a stage reruns only when the keys it reads change.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import run_cli
from pipeline.params import PARAMS_FILE, SECTIONS, load_params
from xlm_core.atomic import atomic_file

STAGE = "params"
# Constant: its hash must not change with the values, or every stage would rerun on any edit.
STAMP_TEXT = "params.yaml passed every section's schema (python -m pipeline.check_params)\n"


def check_params(path: str | Path = PARAMS_FILE) -> None:
    """Every section, in the order the stages run: the first problem is raised as the stage's one line."""
    # Settings only: what this machine can run (pretrain.device, nproc against its cores or GPUs) is pretrain's own
    # check, so that the data stages still run on a machine that will not train.
    for section in SECTIONS:
        load_params(section, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xlm params", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE)
    parser.add_argument("--out", default="data/params.ok", type=Path)
    args = parser.parse_args(argv)

    def run() -> None:
        check_params(args.params)
        with atomic_file(args.out, "w", encoding="utf-8") as fh:
            fh.write(STAMP_TEXT)
        print(f"params: {args.params} is valid (every section)", file=sys.stderr, flush=True)

    return run_cli(STAGE, run)


if __name__ == "__main__":
    sys.exit(main())
