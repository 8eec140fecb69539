"""The logging sinks: the JSON-lines progress records the Prefect flow reads, and DVCLive's TSVs."""
from __future__ import annotations

import json
from types import SimpleNamespace

from xlm_core.train.sinks import DVCLiveSink, ProgressFileSink, TrainLog, progress_file_sink


def _result(loss: float):
    return SimpleNamespace(loss=loss, lr=0.1, grad_norm=1.0, tokens=50, logs={"mlm_loss": loss, "adv_accuracy/en": 0.5})


def test_progress_records_are_one_flushed_json_object_per_line(tmp_path):
    path = tmp_path / "progress.jsonl"
    log = TrainLog([ProgressFileSink(path, total=5)], every=2, total=5, world=2,
                   flops=SimpleNamespace(model=6.0, hardware=8.0), peak_flops=1e6, row_length=lambda step: 16)
    for step in range(1, 6):
        log(SimpleNamespace(step=step, skipped_total=0), _result(10.0 - step))
        if step == 4:
            log.log("valid", step, {"valid/mlm_accuracy/en": 0.25})
            records = [json.loads(line) for line in path.read_text().splitlines()]   # readable while open
            assert [(r["kind"], r["step"]) for r in records] == [("train", 2), ("train", 4), ("valid", 4)]
    log.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["kind"], r["step"], r["total"]) for r in records][-1] == ("train", 5, 5)   # the last step is logged
    train = records[0]["figures"]
    assert train["train/loss"] == 8.0 and train["train/mlm_loss"] == 8.0 and train["train/adv_accuracy_en"] == 0.5
    assert train["train/tokens_per_s"] > 0 and train["train/row_length"] == 16.0
    assert records[2]["figures"] == {"valid/mlm_accuracy/en": 0.25}
    assert all(isinstance(r["elapsed_s"], float) for r in records)
    assert log.tokens == 5 * 50 * 2                                                        # all ranks


def test_the_progress_file_is_written_only_when_named(tmp_path, monkeypatch):
    monkeypatch.delenv("XLM_PROGRESS_FILE", raising=False)
    assert progress_file_sink(10) == []
    monkeypatch.setenv("XLM_PROGRESS_FILE", str(tmp_path / "p.jsonl"))
    [sink] = progress_file_sink(10)
    sink.close()


def test_dvclive_rows_past_the_resumed_step_are_dropped(tmp_path):
    live_dir = tmp_path / "live"
    sink = DVCLiveSink(live_dir, resume_step=None)
    for step in (10, 20, 30):
        sink.log("train", step, {"train/loss": step / 10})
    sink.close()
    tsv = live_dir / "plots" / "metrics" / "train" / "loss.tsv"
    assert tsv.read_text().splitlines() == ["step\tloss", "10\t1.0", "20\t2.0", "30\t3.0"]
    resumed = DVCLiveSink(live_dir, resume_step=20)
    resumed.log("train", 30, {"train/loss": 3.5})
    resumed.close()
    assert tsv.read_text().splitlines() == ["step\tloss", "10\t1.0", "20\t2.0", "30\t3.5"]
