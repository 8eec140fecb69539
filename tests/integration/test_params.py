"""The params schema: every problem is one line naming the key path, the bad value and what is allowed."""
from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys

import pytest
import yaml

from tests.helpers.project import ROOT, project_env
from pipeline.errors import PipelineError
from pipeline.params import SECTIONS, load_params
from pipeline.pretrain_settings import changed_settings, model_config, objectives_config, training_fingerprint
from xlm_core.model_config import default_layer

BASE = yaml.safe_load((ROOT / "params.yaml").read_text())


def _load(tmp_path, mutate, section):
    data = copy.deepcopy(BASE)
    mutate(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_params(section, path)


def test_the_shipped_params_validate_for_every_stage():
    for section in SECTIONS:
        assert load_params(section, ROOT / "params.yaml").section is not None


@pytest.mark.parametrize("mutate, section, expected", [
    (lambda d: d["clean"].update(min_char=3), "clean", "unknown key 'clean.min_char'; allowed keys: batch_rows"),
    (lambda d: d["clean"].update(min_chars=-1), "clean", "clean.min_chars = -1: Input should be greater than or equal to 1"),
    (lambda d: d["clean"].update(normalization="NFD"), "clean", "clean.normalization = 'NFD': Input should be 'NFC' or 'NFKC'"),
    (lambda d: d["tokenizer"].update(vocab_size="big"), "tokenizer", "tokenizer.vocab_size = 'big': Input should be a valid integer"),
    (lambda d: d["pretrain"]["optimizer"].update(lr=5), "pretrain", "pretrain.optimizer.lr = 5: Input should be less than or equal to 1"),
    (lambda d: d["download"]["sources"][0].update(kind="ftp"), "download", "download.sources[0].kind = 'ftp': unknown kind; allowed: 'url', 'local', 'pypi'"),
    (lambda d: d.pop("shard"), "shard", "missing section 'shard'"),
    (lambda d: d.update(cleen={}), "clean", "unknown top-level key 'cleen'"),
    (lambda d: d.update(languages=["en", "eng"]), "clean", "unknown language code 'eng'"),
    (lambda d: d.update(pairs=["en-de"]), "clean", "pairs: 'en-de' uses 'de', which is not in languages"),
    (lambda d: d["pretrain"]["masking"].update(mask=0.5), "pretrain", "mask + random + keep must be 1"),
    (lambda d: d["pretrain"]["seq_len_warmup"].update(start=24, steps=100), "pretrain",
     "seq_len_warmup.start = 24: seq_len (128) / start must be a power of two (e.g. start 16 or 32)"),
    (lambda d: d["pretrain"].update(mode="sentence", token_budget=512), "pretrain",
     "seq_len_warmup needs mode: stream"),
    # pretrain.model / masking / adversarial are the library's dataclasses: their rules, reported at the key
    (lambda d: d["pretrain"]["masking"].update(smoothing=0.5), "pretrain",
     "pretrain.masking.smoothing = 0.5: frequency-smoothed targets are not available in pretraining"),
    (lambda d: d["pretrain"]["masking"].update(rate=1.5), "pretrain", "pretrain.masking.rate = 1.5: must be in (0, 1)"),
    (lambda d: d["pretrain"]["masking"].update(kept=0.1), "pretrain",
     "unknown key 'pretrain.masking.kept'; allowed keys: keep, mask, random, rate, smoothing"),
    (lambda d: d["pretrain"]["model"].update(d_model=130), "pretrain",
     "pretrain.model.d_model = 130: must be divisible by n_heads = 4"),
    (lambda d: d["pretrain"]["model"].update(positions="rotary"), "pretrain",
     "pretrain.model.positions = 'rotary': Input should be 'learned' or 'sinusoidal'"),
    (lambda d: d["pretrain"]["optimizer"].update(betas=[1.5, 0.98]), "pretrain",
     "pretrain.optimizer.betas[0] = 1.5: Input should be less than 1"),
    (lambda d: d["download"].update(timeout_s=float("inf")), "download",
     "download.timeout_s = inf: must be a finite number"),
    (lambda d: d["download"].update(backoff_s=float("inf")), "download",
     "download.backoff_s = inf: must be a finite number"),
    (lambda d: d.update({7: 1, "zz": 2}), "clean", "unknown top-level key '7'"),
    (lambda d: d["pretrain"]["adversarial"].update(layer=99, weight=1.0), "pretrain",
     "pretrain.adversarial.layer = 99: the model has 2 layers; use 1 to 2, or null for the middle one"),
    (lambda d: d["pretrain"]["adversarial"].update(lambda_max=float("inf")), "pretrain",
     "pretrain.adversarial.lambda_max = inf: must be a finite number >= 0"),
    (lambda d: d["pretrain"].update(objectives={"mlm": float("inf")}), "pretrain",
     "pretrain.objectives.mlm = inf: an objective's weight must be a finite number >= 0"),
    (lambda d: d["pretrain"].update(objectives={"mlm": 0.0, "tlm": 0.0}), "pretrain",
     "pretrain.objectives: at least one of mlm, tlm, clm, tr needs a weight > 0"),
    (lambda d: d["pretrain"].update(objectives={"mlm": 1.0, "tr": 1.0}, translation_ranking={"layer": 9}),
     "pretrain", "translation_ranking.layer = 9: the model has 2 layers; use 0 to 2, or null for the last one"),
    (lambda d: d["pretrain"]["translation_ranking"].update(temperature=0.0), "pretrain",
     "pretrain.translation_ranking.temperature = 0.0: must be in (0, 1]"),
    (lambda d: d["pretrain"].update(objectives={"mlm": 1.0, "xx": 1.0}), "pretrain",
     "pretrain.objectives.xx"),
])
def test_errors_name_key_value_and_what_is_allowed(tmp_path, mutate, section, expected):
    with pytest.raises(PipelineError) as info:
        _load(tmp_path, mutate, section)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_a_layer_of_an_objective_that_is_off_is_not_resolved(tmp_path):
    # the validator checks a layer only when its objective is on; objectives_config must not trip on it either
    def off(d):
        d["pretrain"].update(objectives={"mlm": 1.0, "tr": 0.0}, translation_ranking={"layer": 9})
        d["pretrain"]["adversarial"].update(weight=0.0, layer=9)
    params = _load(tmp_path, off, "pretrain")
    n_layers = model_config(params, 100).n_layers
    objectives = objectives_config(params, n_layers)
    assert objectives.adversarial.layer is None and objectives.translation_ranking.layer is None

    def on(d):
        d["pretrain"].update(objectives={"mlm": 1.0, "tr": 1.0}, translation_ranking={"layer": None})
        d["pretrain"]["adversarial"].update(weight=0.1, lambda_max=1.0, layer=None)
    objectives = objectives_config(_load(tmp_path, on, "pretrain"), n_layers)
    assert objectives.adversarial.layer == default_layer(n_layers) and objectives.translation_ranking.layer == n_layers


def test_a_checkpoint_from_before_the_adversary_strength_change_does_not_resume():
    # lambda_max kept its name but changed meaning (the encoder gets -lambda, not -weight * lambda): the marker in the
    # identity makes a checkpoint fingerprinted without it stale, and says so
    params = load_params("pretrain", ROOT / "params.yaml")
    fingerprint, identity = training_fingerprint(params, "0" * 64, "shards")
    assert identity["objectives_version"] == 2
    before = {k: v for k, v in identity.items() if k != "objectives_version"}
    assert hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest() != fingerprint
    assert changed_settings(before, identity) == ["objectives_version"]
    assert training_fingerprint(params, "0" * 64, "shards")[0] == fingerprint   # and it is stable


def test_params_that_are_not_utf8_are_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes((ROOT / "params.yaml").read_bytes().replace(b"languages:", b"lang\xffuages:", 1))
    with pytest.raises(PipelineError, match=r"line \d+ is not valid UTF-8 \(byte 0xff at offset \d+\); save the file as UTF-8"):
        load_params("clean", path)


def test_a_stage_validates_only_its_own_section(tmp_path):
    # a typo in the evaluate/pretrain section does not stop clean from running
    params = _load(tmp_path, lambda d: d["pretrain"].update(stepz=3), "clean")
    assert params.clean.min_chars == BASE["clean"]["min_chars"]
    with pytest.raises(PipelineError, match="pretrain.stepz"):
        _load(tmp_path, lambda d: d["pretrain"].update(stepz=3), "pretrain")


def test_stage_cli_prints_one_error_line_and_exits_2(tmp_path):
    data = copy.deepcopy(BASE)
    data["clean"]["min_chars"] = "three"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "pipeline.clean", "--params", str(tmp_path / "params.yaml"),
                           "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "clean")],
                          capture_output=True, text=True, env=project_env(), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: [clean] {tmp_path / 'params.yaml'}: clean.min_chars = 'three': Input should be a valid integer, "
        "unable to parse string as an integer"]


def test_pretrain_refuses_masking_smoothing_in_one_line(tmp_path):
    # the library can weight targets by piece frequency, but the stage has no per-piece counts to weight them with
    data = copy.deepcopy(BASE)
    data["pretrain"]["masking"]["smoothing"] = 0.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "pipeline.pretrain", "--params", str(tmp_path / "params.yaml"),
                           "--out", str(tmp_path / "model")],
                          capture_output=True, text=True, env=project_env(), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: [pretrain] {tmp_path / 'params.yaml'}: pretrain.masking.smoothing = 0.5: frequency-smoothed "
        "targets are not available in pretraining (the shards carry no per-piece counts); set it to 0"]
    assert not (tmp_path / "model").exists()


NESTED_BARS_THEN_FAIL = """
import sys
from tqdm import tqdm
from pipeline.errors import fail, run_cli

def stage():
    outer = tqdm(total=10, desc="unit a", file=sys.stderr, leave=False)
    inner = tqdm(total=10, desc="unit b", file=sys.stderr, leave=False)   # position 1, as in a thread pool
    outer.update(3), inner.update(2)
    outer.close(), inner.close()    # closing the lower bar last leaves the cursor up, mid-line
    fail("language 'ru': all 30 segments were filtered out")

sys.exit(run_cli("clean", stage))
"""


def test_the_error_line_stands_alone_after_nested_progress_bars(tmp_path):
    proc = subprocess.run([sys.executable, "-c", NESTED_BARS_THEN_FAIL], capture_output=True, text=True,
                          env=project_env(), cwd=tmp_path)
    assert proc.returncode == 2
    assert "\x1b[A" in proc.stderr                  # tqdm did move the cursor up: the case being tested
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == ["error: [clean] language 'ru': all 30 segments were filtered out"], proc.stderr


def test_a_full_disk_anywhere_is_one_line_naming_the_output_not_its_temporary(tmp_path, monkeypatch, capsys):
    import errno

    from pipeline.errors import run_cli

    monkeypatch.chdir(tmp_path)
    temporary = tmp_path / "data" / "clean.tmp-4242-1a2b3c4d" / "mono" / "train.parquet"

    def write():
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(temporary))
        except OSError as exc:
            raise RuntimeError("the library's own wording") from exc   # found along the chain of causes

    assert run_cli("clean", write) == 2
    assert capsys.readouterr().err == (
        "\rerror: [clean] disk full while writing data/clean/mono/train.parquet (No space left on device); free "
        "space on the disk holding it and rerun `dvc repro clean`; the previous data/clean/mono/train.parquet is "
        "untouched\n")

    def append_in_place():      # a file that is not written under a temporary name may be cut short
        raise OSError(errno.EFBIG, "File too large", str(tmp_path / "dvclive" / "loss.tsv"))

    assert run_cli("pretrain", append_in_place) == 2
    assert capsys.readouterr().err.endswith(
        "disk full while writing dvclive/loss.tsv (File too large); free space on the disk holding it and rerun `dvc "
        "repro pretrain`; files written in place there may be cut short; the rerun rewrites them\n")

    def bug():
        raise OSError(errno.EACCES, "Permission denied")

    with pytest.raises(OSError):          # anything else is a bug, with its traceback
        run_cli("clean", bug)


def test_xlm_cli_lists_every_stage():
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True,
                          env=project_env())
    assert proc.returncode == 0
    for stage in ("params", "download", "clean", "tokenizer", "shard", "pretrain", "evaluate", "export", "flow"):
        assert stage in proc.stdout
