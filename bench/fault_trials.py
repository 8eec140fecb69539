"""Kill-and-rerun trials: SIGKILL `dvc repro` at random moments and compare every output with an uninterrupted run.

    python bench/fault_trials.py --trials 50 --seed 1

The harness lives in tests/helpers/fault_trials.py (the default test suite runs a few trials through it); this is
its command line.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout, for `tests.helpers`

from tests.helpers.fault_trials import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
