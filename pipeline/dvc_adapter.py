"""Every use of DVC's Python API in this project's orchestration (``xlm flow``), in one place.

Written against DVC 3.50 - 3.67 (pyproject pins ``dvc>=3.50,<4``). Several of these calls are not DVC's public API:
``dvc.repo.reproduce.{get_active_graph, collect_stages, plan_repro}`` (the planner behind ``dvc repro``), a dvc.yaml
file's ``lockfile_contents`` and a params dependency's ``hash_info`` (what dvc.lock recorded). When DVC changes
them, this module is the one to adapt; the rest of the project sees only ``PlannedStage`` and ``StageStatus``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from dvc.dependency.param import ParamsDependency
from dvc.exceptions import DvcException, NotDvcRepoError
from dvc.repo import Repo
from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

from pipeline.errors import PipelineError

__all__ = ["DvcException", "PlannedStage", "StageStatus", "find_project_root", "flatten", "plan_stages",
           "stage_status"]


@dataclass(frozen=True)
class PlannedStage:
    address: str                   # what `dvc repro` takes: "clean", or "sub/dvc.yaml:clean" outside the root
    name: str
    upstream: tuple[str, ...]      # addresses of the planned stages whose outputs this one reads
    metrics: tuple[str, ...]       # its `metrics:` files, relative to the project root
    reports: tuple[str, ...]       # markdown files to show after it runs


@dataclass(frozen=True)
class StageStatus:
    changed: bool
    reason: str                    # "up to date" or what changed, e.g. "changed params: pretrain.lr (0.1 -> 0.2)"


def _is_metrics_file(project: Path, out) -> bool:
    """A declared metric, or a JSON file under metrics/: dvc.yaml declares only the headline (metrics/summary.json)
    as a metric, so that `dvc metrics show` stays narrow; the flow still shows each stage's own figures."""
    path = _relative(project, out.fs_path)
    return bool(out.metric) or (path.startswith("metrics/") and path.endswith(".json"))


def find_project_root(start: str | Path = ".") -> Path:
    try:
        return Path(Repo.find_root(str(start))).resolve()
    except NotDvcRepoError:
        raise PipelineError(f"{Path(start).resolve()} is not inside a DVC project; run `xlm flow` from the "
                            "folder that holds dvc.yaml (or `dvc init` one)") from None


def plan_stages(project: Path, targets: list[str] | None = None,
                extra_reports: Mapping[str, list[str]] | None = None) -> list[PlannedStage]:
    """The stages `dvc repro [targets]` would consider, in the order it would run them (DVC's own planner).

    A stage's reports are its ``*.md`` outputs plus ``extra_reports[stage name]``.
    """
    with Repo(str(project)) as repo:
        try:
            graph = get_active_graph(repo.index.graph)
            chosen = collect_stages(repo, [_api_target(project, t) for t in targets]) if targets else None
            order = plan_repro(graph, chosen)
        except DvcException as exc:
            known = ", ".join(_address(project, s) for s in repo.index.stages)
            raise PipelineError(f"DVC cannot plan {targets or 'dvc.yaml'}: {exc} (stages: {known})") from None
        planned = set(order)
        return [PlannedStage(
            address=_address(project, stage),
            name=stage.name,
            # edges go from a stage to the stages producing its dependencies
            upstream=tuple(_address(project, dep) for dep in graph.successors(stage) if dep in planned),
            metrics=tuple(_relative(project, out.fs_path) for out in stage.outs if _is_metrics_file(project, out)),
            reports=tuple(dict.fromkeys(
                [_relative(project, out.fs_path) for out in stage.outs if out.fs_path.endswith(".md")]
                + list((extra_reports or {}).get(stage.name, [])))),
        ) for stage in order]


def stage_status(project: Path, address: str) -> StageStatus:
    """What `dvc status <stage>` says, in one line (and param changes down to the key that moved)."""
    with Repo(str(project)) as repo:
        target = _api_target(project, address)
        stage = repo.stage.collect(target)[0]
        report = repo.status(targets=[target])
        if not report:
            return StageStatus(False, "up to date (dvc.lock matches its deps, params and outs)")
        lock = getattr(stage.dvcfile, "lockfile_contents", None)     # dvc.yaml stages; .dvc files have none
        if lock is not None and stage.name not in (lock.get("stages") or {}):
            return StageStatus(True, "never run (not in dvc.lock yet)")
        entries = next(iter(report.values()))
        return StageStatus(True, "; ".join(_describe(project, entry, stage) for entry in entries))


def flatten(tree, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (params sections, metrics files)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _describe(project: Path, entry: str | dict, stage) -> str:
    if isinstance(entry, str):                          # "always changed", "changed command", "changed checksum"
        return entry
    parts = []
    for kind, paths in entry.items():                   # {"changed deps": {"data/raw": "modified", ...}}
        for path, what in paths.items():                # DVC names paths relative to the cwd
            if isinstance(what, dict):                  # a params file: {"pretrain": "modified"}
                parts.append(f"changed params: {', '.join(_param_changes(stage, path) or list(what))}")
            else:
                parts.append(f"{kind}: {_relative(project, os.path.abspath(path))} {what}")
    return "; ".join(parts)


def _param_changes(stage, params_file: str) -> list[str]:
    """dvc.lock records whole sections (`- pretrain`); name the keys inside them that changed: pretrain.lr (a -> b)."""
    changes = []
    for dep in stage.deps:
        if not isinstance(dep, ParamsDependency) or str(dep) != params_file:
            continue
        locked = flatten(dep.hash_info.value or {})
        current = flatten(dep.read_params(flatten=False))
        for key in dict.fromkeys([*locked, *current]):
            old, new = locked.get(key, "(absent)"), current.get(key, "(absent)")
            if old != new:
                changes.append(f"{key} ({old} -> {new})")
    return changes


def _address(project: Path, stage) -> str:
    """The stage as `dvc repro` names it from the project root (DVC's own `addressing` is relative to the cwd)."""
    dvcfile = _relative(project, stage.dvcfile.path)
    return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"


def _api_target(project: Path, address: str) -> str:
    """An absolute target for DVC's Python API, which resolves relative ones against the cwd, not the repo."""
    dvcfile, _, name = address.rpartition(":")
    return f"{project / (dvcfile or 'dvc.yaml')}:{name}"


def _relative(project: Path, path: str) -> str:
    return os.path.relpath(path, project)
