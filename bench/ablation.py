"""The objectives' ablation: MLM / MLM+TLM / +adversary / +translation ranking / all, at equal steps, one table.

    python bench/ablation.py --base DIR                  # DIR: a project whose data stages ran (made if missing)
    python bench/ablation.py --base DIR --steps 1800 --recipes mlm,mlm_tlm
    python bench/ablation.py --base DIR --minutes 5,10,20  # the default recipe's curve: steps scaled to minutes

Each recipe is params.yaml with the `pretrain` overrides below (and `evaluate` ones under the key "evaluate"; everything
else as committed), trained and evaluated
by the stage modules themselves (`python -m pipeline.pretrain`, `python -m pipeline.evaluate`) in DIR/ablation/<name>,
which shares DIR's data/clean, data/tokenizer and data/shards. The table: in-domain and out-of-domain retrieval
(top-1, both directions, trained and the random-init baseline), zero-shot genre accuracy per language, the freshly
fitted language-ID probe, MLM perplexity, pretrain minutes. JSON goes to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OFF = {"weight": 0.0}
ON = {"weight": 1.0}
# What each recipe changes in the pretrain section. The mix is the default's (mlm 2, tlm 0.5, tr 0.4) with objectives
# switched off; the adversary's strengths (lambda_max, warm-up, layer) and translation ranking's settings are
# params.yaml's. "default" is params.yaml as committed (today mlm_tlm_tr).
RECIPES: dict[str, dict] = {
    "mlm": {"objectives": {"mlm": 2.0, "tlm": 0.0, "clm": 0.0, "tr": 0.0}, "adversarial": OFF},
    "mlm_tlm": {"objectives": {"mlm": 2.0, "tlm": 0.5, "clm": 0.0, "tr": 0.0}, "adversarial": OFF},
    "mlm_tlm_adv": {"objectives": {"mlm": 2.0, "tlm": 0.5, "clm": 0.0, "tr": 0.0}, "adversarial": ON},
    "mlm_tlm_tr": {"objectives": {"mlm": 2.0, "tlm": 0.5, "clm": 0.0, "tr": 0.4}, "adversarial": OFF},
    "all": {"objectives": {"mlm": 2.0, "tlm": 0.5, "clm": 0.0, "tr": 0.4}, "adversarial": ON},
    "default": {},
}
DATA = ("clean", "tokenizer", "shards")


def merge(into: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into


def run(cmd: list[str], cwd: Path, env: dict, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "a") as fh:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd} (exit {proc.returncode}); log: {log}")
    return time.perf_counter() - start


def ensure_base(base: Path, env: dict) -> None:
    """A clone of HEAD whose download → shard stages ran (data/clean holds the out-of-domain suites too)."""
    if not (base / "data" / "shards" / "train").is_dir():
        if not (base / ".git").is_dir():
            subprocess.run(["git", "clone", "-q", str(ROOT), str(base)], check=True)
        run([sys.executable, "-m", "dvc", "repro", "shard"], base, {**env, "PYTHONPATH": str(base)},
            base / "ablation-base.log")


def prepare(base: Path, name: str, overrides: dict) -> Path:
    work = base / "ablation" / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for folder in ("pipeline", "xlm_core"):   # this checkout's code, so the bench measures what is here
        shutil.copytree(ROOT / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (work / "data").mkdir()
    for folder in DATA:
        (work / "data" / folder).symlink_to(base / "data" / folder)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    overrides = dict(overrides)
    merge(params["evaluate"], overrides.pop("evaluate", {}))   # e.g. the layer a recipe's ranking trains
    merge(params["pretrain"], overrides)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    return work


def summarise(work: Path, minutes: float) -> dict:
    ev = json.loads((work / "metrics" / "eval.json").read_text())
    row: dict = {"minutes": round(minutes, 2)}
    ood = ev.get("out_of_domain") or {}
    for model in ("trained", "baseline"):
        row[f"ood_{model}"] = (ood.get("mean") or {}).get(model)
        row[f"in_domain_{model}"] = ((ev.get("in_domain") or {}).get("retrieval_mean") or {}).get(model)
        for suite in (ood.get("suites") or {}).values():
            for pair, figures in (suite.get("pairs") or {}).items():
                row[f"ood_{model}/{pair}"] = figures.get(model)
        genre = ev.get("genre") or {}
        for lang, figures in (genre.get("accuracy") or {}).items():
            row[f"genre_{model}/{lang}"] = figures.get(model)
        row[f"lid_{model}"] = ((ev.get("language_id_probe") or {}).get("accuracy") or {}).get(model)
    row["genre_chance"] = (ev.get("genre") or {}).get("chance")
    row["lid_chance"] = (ev.get("language_id_probe") or {}).get("chance")
    row["mlm_perplexity"] = _mlm_perplexity(ev)
    return row


def _mlm_perplexity(ev: dict) -> float | None:
    """The trained model's test-split MLM perplexity, geometric mean over languages (eval.json's mean)."""
    mean_entry = (ev.get("mlm_perplexity") or {}).get("mean") or {}
    return mean_entry.get("trained") if isinstance(mean_entry, dict) else None


def pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def table(rows: dict[str, dict]) -> str:
    pairs = sorted({k.split("/")[1] for r in rows.values() for k in r if k.startswith("ood_trained/")})
    langs = sorted({k.split("/")[1] for r in rows.values() for k in r if k.startswith("genre_trained/")})
    head = (["recipe", "in-domain", "OOD mean"] + [f"OOD {p}" for p in pairs] + [f"genre {l}" for l in langs]
            + ["LID probe", "MLM ppl", "min"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name, f"{pct(r.get('in_domain_trained'))} / {pct(r.get('in_domain_baseline'))}",
                 f"{pct(r.get('ood_trained'))} / {pct(r.get('ood_baseline'))}"]
        cells += [f"{pct(r.get(f'ood_trained/{p}'))} / {pct(r.get(f'ood_baseline/{p}'))}" for p in pairs]
        cells += [f"{pct(r.get(f'genre_trained/{l}'))} / {pct(r.get(f'genre_baseline/{l}'))}" for l in langs]
        cells += [f"{pct(r.get('lid_trained'))} / {pct(r.get('lid_baseline'))}",
                  "–" if r.get("mlm_perplexity") is None else f"{r['mlm_perplexity']:.1f}", f"{r['minutes']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n(trained / random-init baseline, %; top-1 retrieval both directions)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="project folder with the data stages run")
    parser.add_argument("--recipes", default=",".join(k for k in RECIPES if k != "default"))
    parser.add_argument("--steps", type=int, help="pretrain.steps for every recipe (default: params.yaml's)")
    parser.add_argument("--minutes", help="instead: the default recipe at these budgets, steps scaled from a "
                                          "params.yaml-length run's minutes (e.g. 5,10,20)")
    parser.add_argument("--try", dest="extra", action="append", default=[], metavar="NAME=JSON",
                        help="an extra recipe: pretrain overrides as JSON (repeatable), e.g. "
                             "'tr2={\"objectives\": {\"tr\": 2.0}}'")
    parser.add_argument("--threads", type=int, default=None, help="pretrain/evaluate torch threads")
    parser.add_argument("--out", type=Path, default=None, help="JSON of every row (default: DIR/ablation.json)")
    args = parser.parse_args()
    base = args.base.resolve()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
    ensure_base(base, env)
    default_steps = yaml.safe_load((ROOT / "params.yaml").read_text())["pretrain"]["steps"]
    plan: list[tuple[str, dict]] = []
    if args.minutes:
        reference = json.loads((base / "ablation.json").read_text()).get("default") if (base / "ablation.json").exists() else None
        per_step = (reference["minutes"] / reference["steps"]) if reference else None
        if per_step is None:
            raise SystemExit("--minutes needs a measured default row first: run with --recipes default")
        for budget in (float(m) for m in args.minutes.split(",")):
            plan.append((f"default_{budget:g}min", {"steps": max(100, int(round(budget / per_step, -2)))}))
    else:
        for spec in args.extra:
            name, _, text = spec.partition("=")
            plan.append((name, dict(json.loads(text), **({"steps": args.steps} if args.steps else {}))))
        for name in (args.recipes.split(",") if args.recipes else []):
            if name not in RECIPES:
                raise SystemExit(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
            plan.append((name, dict(RECIPES[name], **({"steps": args.steps} if args.steps else {}))))
    out_path = args.out or base / "ablation.json"
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    for name, overrides in plan:
        if args.threads:
            overrides = dict(overrides, threads=args.threads)
        work = prepare(base, name, overrides)
        if args.threads:
            params = yaml.safe_load((work / "params.yaml").read_text())
            params["evaluate"]["threads"] = args.threads
            (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
        wenv = {**env, "PYTHONPATH": str(work)}
        log = work / "run.log"
        print(f"{name}: pretrain {json.dumps(overrides)}", flush=True)
        seconds = run([sys.executable, "-m", "pipeline.pretrain"], work, wenv, log)
        run([sys.executable, "-m", "pipeline.evaluate"], work, wenv, log)
        row = summarise(work, seconds / 60)
        row["steps"] = overrides.get("steps", default_steps)
        row["overrides"] = overrides
        results[name] = row
        out_path.write_text(json.dumps(results, indent=2))
        print(table({name: row}), flush=True)
    print(table({n: r for n, r in results.items() if n in dict(plan)}))


if __name__ == "__main__":
    main()
