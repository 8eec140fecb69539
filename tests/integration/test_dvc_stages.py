"""Real DVC in a temporary git repo: editing a value reruns exactly the stages that read it."""
from __future__ import annotations

import json

from tests.helpers.project import dvc, run, write_params

LANG_TEXT = {
    "en": ["The cat sleeps on the warm mat.", "A river runs through the old town.", "We read books every night."],
    "fr": ["Le chat dort sur le tapis chaud.", "Une rivière traverse la vieille ville.", "Nous lisons chaque soir."],
}


def _local_sources(proj):
    corpus = proj / "corpus"
    corpus.mkdir()
    for lang, lines in LANG_TEXT.items():
        # enough distinct lines that every split gets some of each language
        rows = [f"{line} ({i})" for i in range(60) for line in lines]
        (corpus / f"{lang}.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")

    def mutate(p):
        p["languages"] = ["en", "fr"]
        p["pairs"] = ["en-fr"]
        p["download"]["sources"] = [{
            "name": "toy", "kind": "local", "format": "text", "parallel": True, "languages": ["en", "fr"],
            "paths": {"en": str(corpus / "en.txt"), "fr": str(corpus / "fr.txt")},
        }]
        p["clean"]["split"] = {"valid": 0.1, "test": 0.1}
    write_params(proj, mutate)


def _changed(proj, *stages):
    out = dvc(proj, "status", "--json", *stages).stdout
    return set(json.loads(out or "{}"))


def _repro_ran(proj, target):
    """Run `dvc repro target` and return the names of the stages DVC actually ran."""
    out = dvc(proj, "repro", target).stdout
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


def test_params_edits_rerun_exactly_the_dependent_stages(dvc_project):
    proj = dvc_project
    _local_sources(proj)
    dvc(proj, "repro", "clean")
    assert _changed(proj, "download", "clean") == set()
    metrics = json.loads((proj / "metrics" / "clean.json").read_text())
    assert metrics  # the clean stage wrote its DVC metrics
    shown = dvc(proj, "metrics", "show", "metrics/clean.json").stdout   # a detail file, shown on request
    assert "clean.json" in shown and "totals" in shown, shown

    # a clean.* value: of the data stages only clean is out of date, only clean reruns (after the params check,
    # which reads every key and writes the same stamp, so it changes nothing downstream)
    write_params(proj, lambda p: p["clean"].update(min_chars=5))
    assert _changed(proj, "download", "clean") == {"clean"}
    assert _repro_ran(proj, "clean") == {"params", "clean"}
    assert _changed(proj, "download", "clean") == set()

    # a key neither stage reads: nothing reruns
    write_params(proj, lambda p: p["tokenizer"].update(seed=99))
    assert _changed(proj, "download", "clean") == set()
    assert _repro_ran(proj, "clean") == {"params"}

    # the download sources: both rerun
    write_params(proj, lambda p: p["download"]["sources"][0].update(max_lines=150))
    assert _changed(proj, "download", "clean") == {"download"}
    assert _repro_ran(proj, "clean") == {"params", "download", "clean"}
    assert _changed(proj, "download", "clean") == set()


def test_dvc_exp_run_set_param_changes_only_that_line_of_params_yaml(dvc_project):
    """params.yaml is kept in the layout DVC writes back, so `dvc exp run -S` rewrites one line, comments and all."""
    proj = dvc_project
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "baseline"], proj)
    dvc(proj, "exp", "run", "-S", "pretrain.steps=20", "params")   # the params stage alone: about a second
    diff = run(["git", "diff", "--unified=0", "params.yaml"], proj).stdout
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert len(changed) == 2, diff
    assert changed[0].startswith("-  steps: 3800") and changed[1].startswith("+  steps: 20"), diff
