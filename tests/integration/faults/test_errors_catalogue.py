"""docs/errors.md stays honest: every row has a message, a remedy and tests that exist; the issue's rows are there."""
from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

from tests.helpers.project import ROOT

CATALOGUE = ROOT / "docs" / "errors.md"
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")
# The failures issue 9 asks the catalogue to cover (matched against the first column, case-insensitively).
REQUIRED = [
    "bad url scheme", "dns", "http 404", "http 500", "connection dropped", "checksum mismatch",
    "corrupt or truncated gz", "corrupt zip", "escaping its folder", "symbolic link", "no usable line",
    "invalid utf-8", "nul bytes", "100 mb single line", "unknown language code", "unknown key", "wrong type",
    "out of range", "missing section", "hash mismatch", "corrupt shard", "checkpoint from another configuration",
    "truncated or half-written checkpoint", "nan / infinite loss", "vocabulary / model mismatch",
    "disk full while writing shards", "disk full while writing a checkpoint", "export interrupted",
    "prefect server unreachable", "killed at any moment",
]


def catalogue_rows() -> list[list[str]]:
    rows = []
    for line in CATALOGUE.read_text(encoding="utf-8").splitlines():
        if line.startswith("| ") and not line.startswith("| Failure |"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows.append(cells)
    return rows


@lru_cache(maxsize=None)
def functions_in(path: str) -> frozenset[str]:
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    return frozenset(node.name for node in tree.body if isinstance(node, ast.FunctionDef))


def test_every_row_has_a_message_a_remedy_and_existing_tests():
    rows = catalogue_rows()
    assert len(rows) >= len(REQUIRED)
    for failure, message, remedy, tests in rows:
        assert failure and message and remedy, failure
        if "error: [" in message:
            stages = "params|download|clean|tokenizer|shard|pretrain|evaluate|export|flow|<stage>"
            assert re.search(rf"error: \[({stages})\] ", message), failure
        refs = TEST_REF.findall(tests)
        assert refs, f"row {failure!r} names no test"
        for path, name in refs:
            assert (ROOT / path).is_file(), f"row {failure!r}: no file {path}"
            assert name in functions_in(path), f"row {failure!r}: {path} has no test function {name}"


def test_the_issues_failures_all_have_a_row():
    failures = [row[0].lower() for row in catalogue_rows()]
    missing = [wanted for wanted in REQUIRED if not any(wanted in failure for failure in failures)]
    assert missing == []


def test_every_fault_test_is_in_the_catalogue():
    """A test of this suite that no row names would be a failure the user is not told about."""
    named = {name for row in catalogue_rows() for _path, name in TEST_REF.findall(row[3])}
    helpers_only = {"test_a_mismatch_is_detected", "test_torch_save_writes_only_checkpoint_state",
                    "test_every_torch_load_is_weights_only", "test_no_pickle_in_the_library",
                    "test_subprocesses_get_argument_lists_never_a_shell",
                    "test_archives_are_never_extracted_by_member_name"}   # about the code, not a user's failure
    fault_tests = [*(ROOT / "tests" / "integration" / "faults").glob("test_*.py"), ROOT / "tests" / "e2e" / "test_kill_trials.py"]
    for path in sorted(fault_tests):
        if path.name == Path(__file__).name:
            continue
        tests = {name for name in functions_in(str(path.relative_to(ROOT))) if name.startswith("test_")}
        unnamed = tests - named - helpers_only
        assert not unnamed, f"{path.name}: {sorted(unnamed)} not in docs/errors.md"
