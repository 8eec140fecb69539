"""The whole default dvc.yaml, end to end, on the small fixture corpus: real DVC in a temporary git repo.

`dvc repro` runs every stage; `dvc metrics show` lists the final validation figures per language (pretrain) and the
evaluation with its baseline; `dvc plots show` renders the training curves; then editing a training value reruns
pretrain and what follows, and editing an evaluate value reruns evaluate alone.
"""
from __future__ import annotations

import json

import yaml

from tests.helpers import fault_trials
from tests.helpers.project import dvc, set_dotted


def _ran(out: str) -> list[str]:
    return [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")]


def _status(proj) -> set[str]:
    return set(json.loads(dvc(proj, "status", "--json").stdout or "{}"))


def _edit(proj, section: str, key: str, value) -> None:
    params = yaml.safe_load((proj / "params.yaml").read_text(encoding="utf-8"))
    set_dotted(params[section], key, value)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8")


def test_default_pipeline_end_to_end_and_what_an_edit_reruns(tmp_path):
    proj = fault_trials.make_project(tmp_path / "proj", steps=10)
    stages = list(yaml.safe_load((proj / "dvc.yaml").read_text())["stages"])

    first = dvc(proj, "repro").stdout
    ran = _ran(first)
    assert sorted(ran) == sorted(stages) and ran[:5] == stages[:5]   # the chain in order; evaluate/export are siblings
    assert _status(proj) == set()
    for path in ("data/model/model.safetensors", "data/export/hf/model.safetensors", "reports/eval.md"):
        assert (proj / path).is_file(), path

    table = dvc(proj, "metrics", "show").stdout          # the headline alone: metrics/summary.json
    assert "metrics/summary.json" in table and "eval.json" not in table, table
    assert max(len(line) for line in table.splitlines()) <= 120, table
    summary = json.loads((proj / "metrics" / "summary.json").read_text())
    assert summary["steps"] == 10 and 0 <= summary["mlm_acc"] <= 1 and summary["ppl/uni"] > 0, summary
    assert summary["tok/s"] > 0 and summary["minutes"] >= 0, summary
    shown = dvc(proj, "metrics", "show", "--json", "metrics/pretrain.json", "metrics/eval.json").stdout  # details
    metrics = json.loads(shown)[""]["data"]
    pretrain = metrics["metrics/pretrain.json"]["data"]
    evaluate = metrics["metrics/eval.json"]["data"]
    for lang in fault_trials.LANGUAGES:   # final validation figures, per language
        assert f"mlm_accuracy/{lang}" in pretrain["valid"], sorted(pretrain["valid"])
        assert 0.0 <= pretrain["valid"][f"mlm_accuracy/{lang}"] <= 1.0
        assert pretrain["valid"][f"mlm_loss/{lang}"] > 0
        assert {"trained", "baseline"} <= set(evaluate["mlm_perplexity"][lang])

    plots = json.loads(dvc(proj, "plots", "show", "--json").stdout)["data"]   # dvc.yaml's top-level plots, by id
    assert plots["train-loss"][0]["content"]["data"]["values"], sorted(plots)   # the objectives' losses
    html = tmp_path / "plots"
    dvc(proj, "plots", "show", "--out", str(html))
    page = (html / "index.html").read_text(encoding="utf-8")
    assert "loss" in page and "vega" in page.lower()

    # a training value: pretrain and everything after it
    _edit(proj, "pretrain", "optimizer.lr", 0.003)
    assert _status(proj) == {"params", "pretrain"}   # DVC reports the check and the first stage out of date ...
    ran = _ran(dvc(proj, "repro").stdout)                                        # ... and runs what follows
    assert ran[:2] == ["params", "pretrain"] and sorted(ran[2:]) == ["evaluate", "export"]   # siblings: any order
    assert _status(proj) == set()

    # an evaluate value: evaluate alone, never pretrain
    _edit(proj, "evaluate", "max_batches", 1)
    assert _status(proj) == {"params", "evaluate"}
    assert _ran(dvc(proj, "repro").stdout) == ["params", "evaluate"]
