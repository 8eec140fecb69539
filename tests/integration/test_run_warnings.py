"""Honest utilisation and run warnings (issue 17): real short pretrain runs on test_pretrain's fixture corpus, and
the evaluate report's Warnings section.

Under a competing CPU load that is heavy while the run starts (when the old stage-start matmul measured its peak)
and lighter while it trains, every MFU/HFU the run logs is at most 1; a peak that is plainly too low leaves them out
with one 'unreliable' warning; an untrained model's validation at the unigram level is a warning, per language.
reports/eval.md opens with the warnings: a co-trained discriminator that still wins, a language at the unigram level.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from pipeline.eval_report import render_report, report_warnings
from pipeline.evaluate import evaluate
from pipeline.params import load_params
from tests.helpers import model_runs
from tests.helpers.project import ROOT, project_env, run
from tests.integration.test_pretrain import LANGS, corpus, pretrain_cmd, write_run_params  # noqa: F401 (a fixture)
from xlm_core.evaluation.inputs import EvalPlan
from xlm_core.model_config import ModelConfig

WARNING = "warning: [pretrain] "
# Big enough matmuls that the run does real work (the tiny preset's HFU stays near 0.1 whatever the peak): with the
# old stage-start matmul this run logged HFU 1.39 and 1.52 (its peak measured during the burst, 14-36 GFLOP/s here).
MODEL = {"model.d_model": 256, "model.d_ff": 1024, "model.n_heads": 4, "seq_len": 128, "batch_size": 64,
         "seq_len_warmup.steps": 0, "steps": 15, "log_every": 3, "eval_every": 15, "checkpoint_every": 15}


def _env(tmp_path: Path, threads: int = 1, **extra: str) -> dict:
    # a cache of its own: the peak is measured afresh under this test's load, the worst case
    return project_env({"OMP_NUM_THREADS": str(threads), "XLM_CACHE_DIR": str(tmp_path / "cache"), **extra})


def _busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def _series(run_dir: Path, name: str) -> list[float]:
    tsv = run_dir / "dvclive" / "plots" / "metrics" / "train" / f"{name}.tsv"
    if not tsv.exists():
        return []
    return [float(line.split("\t")[-1]) for line in tsv.read_text().splitlines()[1:] if line]


PROGRESS = re.compile(r"step \d+/\d+ loss \S+ tokens/s \S+ mfu (\S+) eta")   # after the bar's text on its line


def _logged_mfu(stderr: str) -> list[str]:
    return PROGRESS.findall(stderr)


def test_utilisation_stays_within_1_under_a_competing_load(corpus, tmp_path):
    run_dir = tmp_path / "loaded"
    write_run_params(run_dir, corpus, threads=2, **MODEL)   # 2 threads: a descheduled one stalled the old matmul
    burst, steady = _busy_loops(3), _busy_loops(1)   # 3 while the run starts, 1 throughout
    proc = None
    try:
        proc = subprocess.Popen(pretrain_cmd(run_dir, corpus), cwd=ROOT, env=_env(tmp_path, threads=2), text=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if burst and PROGRESS.search(line):   # training has begun: the start-up load goes away
                _stop(burst)
                burst = []
        proc.wait(timeout=600)
    finally:
        _stop(burst + steady + ([proc] if proc is not None and proc.poll() is None else []))
    stderr = "".join(lines)
    assert proc.returncode == 0, stderr
    assert "MFU/HFU against a peak of" in stderr and "CPU time" in stderr
    mfu, hfu = _series(run_dir, "mfu"), _series(run_dir, "hfu")
    assert len(hfu) == 5 and all(0 < value <= 1 for value in mfu + hfu), (mfu, hfu)
    logged = _logged_mfu(stderr)
    assert len(logged) == 5 and all(value == "n/a" or 0 < float(value) <= 1 for value in logged), logged
    if "n/a" in logged or len(mfu) < len(hfu):   # MFU left out only where above 1, and then said so
        assert "train/mfu is left out where above 1" in stderr
    assert "unreliable" not in stderr   # the peak held: nothing left out for it


def test_a_peak_below_what_the_run_does_is_unreliable_and_left_out(corpus, tmp_path):
    run_dir = tmp_path / "low_peak"
    write_run_params(run_dir, corpus, threads=1, steps=6, log_every=2, eval_every=6, checkpoint_every=6)
    proc = run(pretrain_cmd(run_dir, corpus), ROOT, env=_env(tmp_path, XLM_PEAK_FLOPS="1e6"))
    unreliable = [line for line in proc.stderr.splitlines() if line.startswith(WARNING + "HFU is")]
    assert len(unreliable) == 1 and "unreliable" in unreliable[0]
    assert "against, 1 MFLOP/s (set by XLM_PEAK_FLOPS), is unreliable" in unreliable[0]
    assert _series(run_dir, "mfu") == [] and _series(run_dir, "hfu") == []   # never a number above 1
    assert _logged_mfu(proc.stderr) == ["n/a"] * 3
    assert (run_dir / "model" / "model.safetensors").exists()   # a warning, not a failure


def test_an_untrained_model_at_the_unigram_level_is_a_warning_per_language(corpus, tmp_path):
    run_dir = tmp_path / "untrained"
    write_run_params(run_dir, corpus, threads=1, steps=2, log_every=1, eval_every=2, checkpoint_every=2,
                     **{"optimizer.lr": 1e-6})
    proc = run(pretrain_cmd(run_dir, corpus), ROOT, env=_env(tmp_path))
    below = [line for line in proc.stderr.splitlines() if line.startswith(WARNING + "validation MLM on")]
    assert sorted(line.split()[5] for line in below) == sorted(LANGS), proc.stderr
    assert all("unigram level" in line for line in below)


# --- reports/eval.md ---------------------------------------------------------------------------------------------

FLOOR = {("mlm_accuracy", "en"): 0.20, ("mlm_perplexity", "en"): 60.0,
         ("mlm_accuracy", "fr"): 0.18, ("mlm_perplexity", "fr"): 70.0}


def _render(trained: dict, warnings=None) -> str:
    plan = EvalPlan(test_dir=Path("data/shards/test"), tokenizer=None, model_languages=["en", "fr"],
                    languages=["en", "fr"], pairs=[], bitexts={}, retrieval_suites=[], classification_suites=[],
                    layer=1, clm=False, discriminator_layer=1)
    per_model = {"trained": trained, "baseline": {("mlm_accuracy", "en"): 0.01, ("mlm_perplexity", "en"): 150.0}}
    return render_report(per_model, {}, plan, SimpleNamespace(seed=0, scoring="cosine", center=False),
                         ModelConfig.preset("tiny", vocab_size=150), "eval", FLOOR, ["a note"], warnings)


def test_the_report_opens_with_a_winning_discriminator_and_a_language_at_the_unigram_level():
    trained = {("discriminator_accuracy",): 0.97,
               ("mlm_accuracy", "en"): 0.35, ("mlm_perplexity", "en"): 30.0,    # clears the unigram level
               ("mlm_accuracy", "fr"): 0.18, ("mlm_perplexity", "fr"): 50.0}    # accuracy equal to the unigram's
    warnings = report_warnings({"trained": trained}, FLOOR, ["en", "fr"])
    assert len(warnings) == 2 and "discriminator" in warnings[0] and "97.0%" in warnings[0]
    assert "MLM on fr" in warnings[1] and "accuracy 0.180 ≤ unigram 0.180" in warnings[1]
    report = _render(trained)
    assert report.startswith("# Evaluation\n\n## Warnings\n\n- **warning:** the co-trained language discriminator")
    assert report.index("MLM on fr") < report.index("Model: ") < report.index("## Masked LM")
    # given warnings (write_outputs: the training run's, then these), the report shows those
    given = _render(trained, ["HFU is 1.8 at step 30"])
    assert given.count("- **warning:**") == 1 and "- **warning:** HFU is 1.8" in given


def test_a_model_that_clears_the_unigram_level_with_a_fooled_discriminator_has_no_warnings():
    trained = {("discriminator_accuracy",): 0.60,
               ("mlm_accuracy", "en"): 0.35, ("mlm_perplexity", "en"): 30.0,
               ("mlm_accuracy", "fr"): 0.30, ("mlm_perplexity", "fr"): 69.0}
    assert report_warnings({"trained": trained}, FLOOR, ["en", "fr"]) == []
    assert "Warnings" not in _render(trained) and "warning" not in _render(trained)


def test_evaluate_warns_about_a_model_that_learned_nothing(tmp_path, capsys):
    """The stage on a real (randomly initialised) model folder: every language at the unigram level."""
    params_path = model_runs.build_run(tmp_path)
    evaluate(load_params("evaluate", params_path), tmp_path / "model", tmp_path / "shards",
             tmp_path / "eval.json", tmp_path / "eval.md", tmp_path / "plots")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: [evaluate] ")]
    assert sorted(line.split()[4] for line in lines if "MLM on" in line) == sorted(model_runs.LANGS), lines
    report = (tmp_path / "eval.md").read_text()
    assert report.startswith("# Evaluation\n\n## Warnings\n") and report.count("- **warning:** MLM on") == 4
