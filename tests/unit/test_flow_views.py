"""What `xlm flow` makes of a stage's output and files, without a Prefect server: log lines (pipeline.stage_output),
the self-contained report and the validation table (pipeline.flow_artifacts). tests/integration/test_flow.py reads
the same through Prefect's API during real flow runs."""
from __future__ import annotations

import base64
import io
import json

from tqdm import tqdm

from pipeline.flow_artifacts import TABLE_WIDTH, render_validation, self_contained_markdown
from pipeline.stage_output import StageOutput
from xlm_core.train.sinks import ProgressFileSink

# What `dvc repro --single-item <stage>` prints after the stage ran, in a git repository (DVC 3.x)
DVC_REMINDER = ("Updating lock file 'dvc.lock'\n\nTo track the changes with git, run:\n\n"
                "\tgit add dvc.lock data/.gitignore\n\nTo enable auto staging, run:\n\n"
                "\tdvc config core.autostage true\nUse `dvc push` to send your updates to remote storage.\n")


def _feed(out: StageOutput, stream: bytes, every: int = 7):
    for i in range(0, len(stream), every):                             # chunk boundaries fall mid-line
        out.feed(stream[i:i + every])
    return out.close()


def test_stage_output_splits_lines_and_throttles_carriage_return_redraws():
    logged = []
    shard = ("\rshard:  10%|#         | 1/10 [00:00<00:09, 1.00it/s]"
             "\rshard:  20%|##        | 2/10 [00:01<00:08, 1.00it/s]")
    stream = (b"Running stage 'clean':\r\n> python stage.py clean\n"
              + b"".join(b"\rclean:  %3d%%|" % i for i in range(0, 101, 10)) + b"\n"   # tqdm: \r before each draw
              + f"{shard}error: [shard] caf\u00e9 is not NFC\n".encode()            # a line glued to a bar
              + b"\rshard:  30%|###       | 3/10\rshard:  40%|####      | 4/10\r")   # a bar never finished
    summary = _feed(StageOutput(logged.append, every_s=3600), stream)
    assert logged == ["Running stage 'clean':", "> python stage.py clean", "clean:    0%|", "clean:  100%|",
                      "shard:  20%|##        | 2/10 [00:01<00:08, 1.00it/s]",   # where the bar was, on its own line
                      "error: [shard] caf\u00e9 is not NFC", "shard:  40%|####      | 4/10"]
    assert summary.stage_error == "error: [shard] caf\u00e9 is not NFC"
    assert summary.last_line == "shard:  40%|####      | 4/10"


def test_nested_tqdm_bars_leave_no_escape_sequences_and_few_lines():
    buffer = io.StringIO()
    for _ in tqdm(range(3), desc="outer", file=buffer, mininterval=0, miniters=1):
        for _ in tqdm(range(50), desc="inner", file=buffer, mininterval=0, miniters=1, leave=False):
            pass
        tqdm.write("a file done", file=buffer)
    raw = buffer.getvalue()
    assert "\x1b[A" in raw and raw.count("\r") > 150                 # what tqdm writes when not on a terminal
    logged = []
    _feed(StageOutput(logged.append, every_s=3600), (raw + "\x1b[31mred\x1b[0m text\n").encode())
    assert not [line for line in logged if any(c in line for c in "\x1b\r\n\x08")], logged
    assert logged.count("a file done") == 3 and logged[-1] == "red text"
    assert len(logged) <= 3 + 3 + 2 + 1, logged                        # each inner bar's end, the outer's ends
    assert any(line.startswith("outer: 100%|") and "3/3" in line for line in logged)


def test_dvc_reminders_are_left_out_and_their_files_kept():
    logged = []
    summary = _feed(StageOutput(logged.append), ("Running stage 'x':\n> python stage.py x\nx: done\n"
                                                 + DVC_REMINDER + "after: kept\n").encode())
    assert logged == ["Running stage 'x':", "> python stage.py x", "x: done", "Updating lock file 'dvc.lock'",
                      "after: kept"]
    assert summary.git_add == ["dvc.lock", "data/.gitignore"]


def test_report_is_self_contained(tmp_path):
    (tmp_path / "eval").mkdir()
    png = b"\x89PNG\r\n\x1a\n fake but bytes are bytes"
    (tmp_path / "eval" / "retrieval.png").write_bytes(png)
    wide = ["language", *[f"{what} ({model})" for what in ("accuracy", "perplexity")
                          for model in ("trained", "baseline", "unigram")], "targets"]
    text = "\n".join([
        "# Evaluation", "",
        "| " + " | ".join(wide) + " |", "|" + "---|" * len(wide),
        "| en | 0.352 | 0.000 | 0.352 | 20.45 | 211 | 14.48 | 54 |", "",
        "![retrieval accuracy heatmap](eval/retrieval.png)", "![gone](eval/missing.png)",
        "![remote](https://example.org/a.png) <https://example.org>", "",
        "- all replaced by <mask>, `<mask>` in code stays, </s> and <s> too", "",
        "```", "<pad> in a fence stays", "```"])
    out = self_contained_markdown(text, tmp_path)
    assert f"![retrieval accuracy heatmap](data:image/png;base64,{base64.b64encode(png).decode()})" in out
    assert "*(gone: `eval/missing.png` not found beside the report)*" in out
    assert "![remote](https://example.org/a.png) <https://example.org>" in out       # URLs the browser can fetch
    assert "all replaced by &lt;mask&gt;, `<mask>` in code stays, &lt;/s&gt; and &lt;s&gt; too" in out
    assert "<pad> in a fence stays" in out

    tables = [line for line in out.splitlines() if line.startswith("| language |")]
    assert tables == ["| language | accuracy (trained) | accuracy (baseline) | accuracy (unigram) |",
                      "| language | perplexity (trained) | perplexity (baseline) | perplexity (unigram) | targets |"]
    assert "| en | 0.352 | 0.000 | 0.352 |" in out and "| en | 20.45 | 211 | 14.48 | 54 |" in out
    assert all(len(line) <= TABLE_WIDTH for line in out.splitlines() if line.startswith("|"))
    narrow = "| a | b |\n|---|---|\n| 1 | 2 |"
    assert self_contained_markdown(narrow, tmp_path) == narrow                       # a table that fits: as it was


def test_validation_table_has_a_row_per_language_or_pair_and_a_column_per_metric():
    figures = {"valid/mlm_loss/en": 3.2, "valid/mlm_accuracy/en": 0.3, "valid/mlm_loss/fr": 3.5,
               "valid/mlm_accuracy/fr": 0.2, "valid/tlm_loss/en-fr": 4.0, "valid/discriminator_accuracy": 0.4}
    table = render_validation("pretrain", 20, 100, figures, {"valid/mlm_loss/en": 4.0, "valid/mlm_accuracy/en": 0.35},
                              (10, {"valid/mlm_loss/fr": 3.9, "valid/tlm_loss/en-fr": 3.9}))
    lines = table.splitlines()
    assert lines[0] == "### `pretrain` validation at step 20/100"
    assert lines[2:15] == [
        "| language | mlm_loss (lower is better) | mlm_accuracy (higher is better) |", "|---|---|---|",
        "| en | 3.2000 (unigram 4.0000) **better** | 0.3000 (unigram 0.3500) worse |",
        "| fr | 3.5000 (step 10: 3.9000) **better** | 0.2000 |", "",
        "| pair | tlm_loss (lower is better) |", "|---|---|",
        "| en-fr | 4.0000 (step 10: 3.9000) worse |", "",
        "| model | discriminator_accuracy (higher is better) |", "|---|---|",
        "| all | 0.4000 |", ""]


def test_validation_records_carry_the_unigram_level_of_their_figures(tmp_path):
    path = tmp_path / "progress.jsonl"
    sink = ProgressFileSink(path, total=10)
    sink.set_unigram({"valid/mlm_loss/en": 6.5, "valid/mlm_accuracy/en": 0.05, "valid/mlm_loss/de": 7.0})
    sink.log("train", 5, {"train/loss": 7.0})
    sink.log("valid", 5, {"valid/mlm_loss/en": 5.0, "valid/mlm_accuracy/en": 0.1, "valid/tlm_loss/en-fr": 6.0})
    sink.close()
    train, valid = [json.loads(line) for line in path.read_text().splitlines()]
    assert "unigram" not in train
    assert valid["unigram"] == {"valid/mlm_loss/en": 6.5, "valid/mlm_accuracy/en": 0.05}   # only its own figures
