"""What every fault test asserts, and the small fixtures they share.

A failing stage must end with exit status 2 and exactly one ``error: [stage] ...`` line (no traceback) that says what
is wrong, where, and how to fix it; the outputs of earlier runs must be byte-for-byte what they were.
"""
from __future__ import annotations

import hashlib
import resource
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers.project import ROOT, project_env, set_dotted

LANGS = ["en", "fr", "ru"]
PAIRS = ["en-fr", "en-ru"]
ROWS = {"en": 300, "fr": 300, "ru": 300}
TMP_INFIXES = (".tmp-", ".old-")

# A tiny pretrain run: 10 steps, a checkpoint every 5 (so there is an earlier one to fall back to).
PRETRAIN = {
    "model": {"preset": "tiny", "dropout": 0.0, "attention_dropout": 0.0},
    "seq_len": 32, "batch_size": 8, "accum_steps": 1, "mode": "stream",
    "objectives": {"mlm": 1.0, "tlm": 0.5}, "alpha": 0.5,
    "optimizer": {"lr": 0.002, "warmup_steps": 2, "schedule": "linear"},
    "steps": 10, "eval_every": 10, "eval_batches": 1, "checkpoint_every": 5, "keep_checkpoints": 2,
    "log_every": 5, "seed": 3, "threads": 1, "device": "cpu", "dtype": "fp32",
}


def assert_one_error_line(proc: subprocess.CompletedProcess, stage: str, *fragments: str) -> str:
    """Exit status 2, no traceback, exactly one ``error: [stage]`` line holding every fragment; returns it."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    line = errors[0]
    assert line.startswith(f"error: [{stage}] "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def tree_digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders), by path: equal digests mean untouched outputs."""
    out = {}
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def leftovers(folder: Path) -> list[str]:
    """Temporary siblings (``*.tmp-*``, ``*.old-*``) anywhere under ``folder``: a failed write must leave none."""
    return sorted(str(p) for p in folder.rglob("*") if any(i in p.name for i in TMP_INFIXES))


def file_size_limit(limit_bytes: int):
    """A ``preexec_fn`` simulating a full disk: files cannot grow past ``limit_bytes`` (RLIMIT_FSIZE).

    SIGXFSZ is ignored so that the write fails with OSError(EFBIG) instead of the kernel killing the process.
    """
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def run_module(module: str, *args: str, cwd: Path = ROOT, limit_bytes: int | None = None, env: dict | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m module args`` with this checkout importable (optionally under a file-size limit)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd,
                          env=env or project_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True,
                          timeout=timeout,
                          preexec_fn=file_size_limit(limit_bytes) if limit_bytes is not None else None)


def write_pretrain_params(path: Path, base_params: Path, **overrides) -> Path:
    """``base_params`` (languages, pairs, tokenizer, shard) plus the tiny pretrain section with ``overrides``
    (dotted keys: ``{"optimizer.lr": 0.1}``)."""
    data = yaml.safe_load(base_params.read_text())
    pretrain = yaml.safe_load(yaml.safe_dump(PRETRAIN))
    for key, value in overrides.items():
        set_dotted(pretrain, key, value)
    data["pretrain"] = pretrain
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def pretrain_args(run_dir: Path, corpus: Path) -> list[str]:
    return ["--params", str(run_dir / "params.yaml"), "--shards", str(corpus / "shards"),
            "--tokenizer", str(corpus / "tokenizer"), "--checkpoints", str(run_dir / "checkpoints"),
            "--out", str(run_dir / "model"), "--metrics", str(run_dir / "metrics.json"),
            "--live", str(run_dir / "dvclive")]


def build_corpus(root: Path) -> Path:
    """clean fixture -> real sentencepiece tokenizer -> real Parquet shards under ``root``; returns ``root``."""
    from pipeline.params import load_params
    from pipeline.shard import make_shards
    from pipeline.tokenizer import train_tokenizer
    from tests.helpers.corpora import write_clean, write_tokenizer_shard_params

    params_path = write_tokenizer_shard_params(root / "params.yaml", LANGS, PAIRS, tokenizer={"vocab_size": 150},
                                               shard={"rows_per_shard": 250})
    write_clean(root / "clean", ROWS, PAIRS)
    train_tokenizer(load_params("tokenizer", params_path), root / "clean", root / "tokenizer", root / "tok.json")
    make_shards(load_params("shard", params_path), root / "clean", root / "tokenizer", root / "shards",
                root / "shard.json")
    return root
