"""``fedimb sweep SUITE.yaml``: a grid of runs (axes × seeds), then one report.

A suite names a base config, axes of labelled override lists and seeds::

    base: ../quickstart.yaml          # relative to the suite file
    out: runs/sweeps/quick
    overrides: [federation.rounds=5]  # applied to every run
    seeds: [0, 1, 2]
    axes:
      method: {fedavg: [strategy.name=fedavg], fedprox: [strategy.name=fedprox]}
      partition: {iid: [partition.name=iid], dir0.5: [partition.name=dirichlet, partition.alpha=0.5]}

Every run's config is validated before the first one starts. A run whose directory already
holds ``summary.json`` of the same config is skipped, so an interrupted sweep picks up where it
stopped; one finished with another config (a changed override) stops the sweep with an error
instead of being reported as if it were this run.
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from rich.console import Console

from fedimb.config import ConfigError, ExperimentConfig, load_config

console = Console(stderr=True)


@dataclass
class PlannedRun:
    """One cell × seed of the grid."""

    label: str
    overrides: list[str]
    cfg: ExperimentConfig
    run_dir: Path


# Where a run's files live and how it was scheduled: they do not change its results.
_OPERATIONAL = ("name", "simulation", "data.root", "synthetic.cache_dir")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def result_knobs(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config keys (dotted) that decide a run's results: a disabled block's knobs and operational keys left out."""
    knobs = _flat(asdict(cfg))
    off = [block for block in ("synthetic", "active_learning") if not knobs[f"{block}.enabled"]]
    dropped = tuple(f"{block}." for block in off) + tuple(f"{key}." for key in _OPERATIONAL)
    return {k: v for k, v in knobs.items()
            if k.endswith(".enabled") or (k not in _OPERATIONAL and not k.startswith(dropped))}


def is_finished(run: PlannedRun) -> bool:
    """Whether ``run.run_dir`` holds a finished run (``summary.json``) of this very config.

    Raises :class:`ConfigError` naming the first differing key when the directory holds a
    run finished with another config, so a sweep never reports old results under new knobs.
    """
    if not (run.run_dir / "summary.json").is_file():
        return False
    saved = run.run_dir / "config.yaml"
    if not saved.is_file():  # written by every run since the first release; nothing to compare
        return True
    try:
        then = load_config(saved)
    except ConfigError as exc:  # a key the schema has since dropped or retyped, as in checkpoint.written_for
        raise ConfigError(exc.field_name, f"{saved} no longer reads: {str(exc).split(': ', 2)[-1]}; "
                                          "move that run away or choose another output directory") from None
    old, new = result_knobs(then), result_knobs(run.cfg)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        key = changed[0]
        raise ConfigError(key, f"{run.run_dir} finished with {old.get(key)!r}, this sweep asks for {new.get(key)!r}"
                               f"{f' (and {len(changed) - 1} more keys)' if len(changed) > 1 else ''}; "
                               "move that run away or choose another output directory")
    return True


def _suite_value(suite: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = suite.get(key, default)
    if not isinstance(value, kind):
        raise ConfigError(f"suite.{key}", f"must be a {kind.__name__}, got {type(value).__name__}")
    return value


def plan_sweep(suite_path: Path, extra_overrides: list[str] | tuple[str, ...] = (),
               out: Path | None = None, seeds: list[int] | None = None) -> tuple[list[PlannedRun], Path]:
    """Expand a suite into validated runs and the sweep's output directory (``seeds`` replaces the suite's)."""
    if not suite_path.is_file():
        raise ConfigError("suite", f"file not found: {suite_path}")
    suite = OmegaConf.to_container(OmegaConf.load(suite_path), resolve=True)
    if not isinstance(suite, dict):
        raise ConfigError("suite", "must be a mapping with base, axes, seeds")
    unknown = set(suite) - {"base", "out", "overrides", "seeds", "axes", "name"}
    if unknown:
        raise ConfigError(f"suite.{sorted(unknown)[0]}", "unknown key; allowed: name, base, out, overrides, seeds, axes")
    base = suite_path.parent / _suite_value(suite, "base", str, "")
    common = [str(o) for o in _suite_value(suite, "overrides", list, [])] + list(extra_overrides)
    seeds = seeds if seeds else _suite_value(suite, "seeds", list, [0])
    axes = _suite_value(suite, "axes", dict, {})
    sweep_dir = out or Path(_suite_value(suite, "out", str, f"runs/sweeps/{suite_path.stem}"))
    axis_items = []
    for axis, cells in axes.items():
        if not isinstance(cells, dict) or not cells:
            raise ConfigError(f"suite.axes.{axis}", "must map labels to lists of key=value overrides")
        axis_items.append([(str(label), [str(o) for o in ovs]) for label, ovs in cells.items()])
    runs: list[PlannedRun] = []
    for combo in itertools.product(*axis_items):
        label = "_".join(lbl for lbl, _ in combo) or "run"
        cell_overrides = [o for _, ovs in combo for o in ovs]
        for seed in seeds:
            overrides = common + cell_overrides + [f"seed={int(seed)}"]
            try:
                cfg = load_config(base, overrides)
            except ConfigError as exc:
                raise ConfigError(exc.field_name, f"{str(exc).split(': ', 2)[-1]} (in sweep cell {label})") from None
            runs.append(PlannedRun(label, overrides, cfg, sweep_dir / "runs" / f"{label}-s{int(seed)}"))
    if not runs:
        raise ConfigError("suite.axes", "the grid is empty")
    return runs, sweep_dir


def narrow(runs: list[PlannedRun], only: list[str] | None) -> list[PlannedRun]:
    """The runs whose cell label matches one of the shell patterns ``only`` (all runs without)."""
    if not only:
        return runs
    kept = [r for r in runs if any(fnmatch.fnmatch(r.label, pattern) for pattern in only)]
    if not kept:
        raise ConfigError("--only", f"no cell label matches {' '.join(only)}")
    return kept


def choose(runs: list[PlannedRun], labels: list[str], seeds_outermost: bool = False,
           field: str = "cells") -> list[PlannedRun]:
    """The runs of the cells ``labels``, in the plan's order, or with ``seeds_outermost`` seed by
    seed in the order of ``labels`` (so a seed's first run trains what its later runs reuse from
    the cache, e.g. a generator). An unknown label is an error naming ``field``."""
    known = {r.label for r in runs}
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise ConfigError(f"--{field}", f"unknown cells {' '.join(unknown)}; known: {', '.join(sorted(known))}")
    chosen = [r for r in runs if r.label in labels]
    if seeds_outermost:
        chosen.sort(key=lambda r: (r.cfg.seed, labels.index(r.label)))
    return chosen


def execute(runs: list[PlannedRun], sweep_dir: Path, dry_run: bool = False, resume: bool = False,
            on_finished: Callable[[PlannedRun], None] | None = None) -> tuple[list[PlannedRun], list[str]]:
    """Run every planned run not yet finished; return the finished runs and the names of failed ones.

    Every run is checked, and a stale finished run stops everything, before the first one trains.
    A run that fails does not stop the others. ``resume``: a run that left a checkpoint and no
    summary continues from it instead of starting over. ``on_finished``: called with each run this
    call trains to its end, before the next one starts (so a caller can keep its record even if a
    later run is stopped).
    """
    from fedimb.app.simulation import RunError, check_before_run, run_experiment

    for run in runs:
        check_before_run(run.cfg)
    done = [is_finished(run) for run in runs]  # a stale run stops the sweep before anything trains
    console.print(f"sweep: {len(runs)} runs → {sweep_dir}", highlight=False)
    if dry_run:
        for run in runs:
            console.print(f"  {run.run_dir.name}: {' '.join(run.overrides)}", highlight=False)
        return [r for r, finished in zip(runs, done, strict=True) if finished], []
    failed: list[str] = []
    for i, (run, finished_before) in enumerate(zip(runs, done, strict=True), 1):
        if finished_before:
            console.print(f"[{i}/{len(runs)}] {run.run_dir.name}: done before, skipped", highlight=False)
            continue
        resuming = resume and (run.run_dir / "checkpoint.pt").is_file()
        console.print(f"[{i}/{len(runs)}] {run.run_dir.name}{': resuming' if resuming else ''}", highlight=False)
        try:
            run_experiment(run.cfg, run.run_dir, checked=True, resume=resuming)  # every run was checked above
        except RunError as exc:
            console.print(f"[red]{run.run_dir.name}: {exc}[/]", highlight=False, soft_wrap=True)
            failed.append(run.run_dir.name)
            continue
        if on_finished is not None:
            on_finished(run)
    return [r for r in runs if (r.run_dir / "summary.json").is_file()], failed


def failure(failed: list[str], total: int, written: Path | None, what: str = "the report") -> Exception:
    """The error that ends a sweep with failed runs, after ``written`` was made from the others."""
    from fedimb.app.simulation import RunError

    others = f"{what} of the others is in {written}" if written else "no run finished"
    return RunError(f"{len(failed)} of {total} sweep runs failed ({', '.join(failed)}); {others}; "
                    "rerun the sweep to retry them")


def run_sweep(suite_path: Path, extra_overrides: list[str] | tuple[str, ...] = (),
              out: Path | None = None, dry_run: bool = False, seeds: list[int] | None = None,
              only: list[str] | None = None) -> Path:
    """Run every planned run not yet finished, then write the report; return results.md.

    ``only``: shell patterns on cell labels (e.g. ``lt100_dirbal0.1_*``) that narrow the grid.
    A run that fails does not stop the others: the report is written from the finished runs,
    then :class:`RunError` names the failed ones (rerunning the sweep retries only those).
    """
    from fedimb.report import write_report

    runs, sweep_dir = plan_sweep(suite_path, extra_overrides, out, seeds)
    runs = narrow(runs, only)
    finished, failed = execute(runs, sweep_dir, dry_run=dry_run)
    if dry_run:
        return sweep_dir
    report = write_report([r.run_dir for r in finished], sweep_dir) if finished else None
    if failed:
        raise failure(failed, len(runs), report)
    return report
