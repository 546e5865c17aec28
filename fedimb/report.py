"""Tables and plots over many run directories (``fedimb sweep`` and ``fedimb report``).

Runs are grouped by (setting, method): the setting is the partition label (plus the global
long tail, and the dataset when runs span several), the method is the strategy name (plus
the client loss when it is not plain cross-entropy). Each group is summarised by the mean and
population std (ddof=0) of the final metrics over its seeds.

Runs are read from run directories or from a records file (``*.jsonl.gz``, see
:func:`write_records`): the compact form in which the results pages keep their runs.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedimb.records import _parse_cell, atomic_write_bytes, atomic_write_text, load_run, read_rounds_csv, save_figure

REPORT_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "tail_recall", "client_accuracy_std")
# All columns of a report: the final metrics above plus the best accuracy over rounds.
ALL_METRICS = REPORT_METRICS + ("best_accuracy",)
# Fractions in [0, 1] shown as percent; anything else is shown as a plain number.
PERCENT_METRICS = frozenset(ALL_METRICS) | {"head_recall", "mid_recall", "client_accuracy_mean"}


RECORDS_SUFFIX = ".jsonl.gz"


def is_records_file(path: str | Path) -> bool:
    """Whether ``path`` is a records file (``*.jsonl.gz``) rather than a run directory."""
    return str(path).endswith(RECORDS_SUFFIX) and Path(path).is_file()


def find_run_dirs(root: str | Path) -> list[Path]:
    """All directories under ``root`` (itself included) that contain ``summary.json``, sorted;
    a records file is returned as it is (it holds its runs)."""
    if is_records_file(root):
        return [Path(root)]
    return sorted({p.parent for p in Path(root).rglob("summary.json") if p.is_file()})


def record_of_run(run_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """One run directory as a line of a records file: its name, ``fields``, and the config,
    summary and rounds a report reads (texts kept as written, so they parse to the same values)."""
    run_dir = Path(run_dir)
    rounds = run_dir / "rounds.csv"
    return {"name": run_dir.name, **fields,
            "config": (run_dir / "config.yaml").read_text(encoding="utf-8"),
            "summary": json.loads((run_dir / "summary.json").read_text(encoding="utf-8")),
            "rounds": rounds.read_text(encoding="utf-8") if rounds.is_file() else ""}


def write_records(path: str | Path, header: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    """Write a records file: gzipped JSON lines, ``{"page": header}`` first, then one line per record.

    The bytes depend only on the content (no timestamp in the gzip header).
    """
    lines = [json.dumps({"page": header}, ensure_ascii=False)]
    lines += [json.dumps(record, ensure_ascii=False) for record in records]
    return atomic_write_bytes(path, gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), 9, mtime=0))


def read_records(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and the records of a records file, in the order they were written."""
    lines = gzip.decompress(Path(path).read_bytes()).decode("utf-8").splitlines()
    entries = [json.loads(line) for line in lines if line.strip()]
    if not entries or "page" not in entries[0]:
        raise ValueError(f"{path}: not a records file (no header line)")
    return entries[0]["page"], entries[1:]


def run_of_record(record: dict[str, Any], where: str | Path) -> dict[str, Any]:
    """A line of a records file as :func:`fedimb.records.load_run` gives a run directory, plus
    ``run_dir``: ``where/<group>/<name>``, the run's place inside the records file."""
    from omegaconf import OmegaConf  # deferred, as in load_run

    config = OmegaConf.to_container(OmegaConf.create(record["config"]), resolve=True) if record.get("config") else {}
    reader = csv.DictReader(io.StringIO(record.get("rounds", ""), newline=""))
    rounds = [{k: _parse_cell(v) for k, v in row.items() if v not in ("", None)} for row in reader]
    place = Path(where, *[record["group"]] if record.get("group") else [], record["name"])
    return {"run_dir": str(place), "config": config if isinstance(config, dict) else {},
            "summary": record.get("summary") or {}, "rounds": rounds}


def load_runs(sources: list[Path], warnings: list[str] | None = None) -> list[dict[str, Any]]:
    """Load run directories and records files as ``{"run_dir", "config", "summary", "rounds"}``.

    A directory without ``summary.json`` is skipped; a line saying so is appended to ``warnings``
    when a list is passed.
    """
    runs: list[dict[str, Any]] = []
    for source in sources:
        if is_records_file(source):
            runs += [run_of_record(record, source) for record in read_records(source)[1]]
        elif not (Path(source) / "summary.json").is_file():
            if warnings is not None:
                warnings.append(f"{source}: no summary.json (run unfinished or failed), skipped")
        else:
            runs.append({"run_dir": str(Path(source)), **load_run(source)})
    return runs


def _as_runs(items: list[Path] | list[dict[str, Any]], warnings: list[str] | None) -> list[dict[str, Any]]:
    # Runs already loaded pass through; paths are loaded.
    return [run for item in items for run in ([item] if isinstance(item, dict) else load_runs([item], warnings))]


def partition_label(config: dict[str, Any]) -> str:
    """Short label of a run's data setting, e.g. ``"dirichlet(0.5), LT rho=20"``."""
    part = config.get("partition") or {}
    name = str(part.get("name", "unknown"))
    if name == "shards":
        label = f"shards(#C={part.get('classes_per_client')})"
    elif name in ("dirichlet", "quantity", "inner_dirichlet", "dir_balance"):
        label = f"{name}({part.get('alpha'):g})" if part.get("alpha") is not None else name
    else:
        label = name
    factor = (config.get("imbalance") or {}).get("factor", 1.0)
    if factor is not None and float(factor) > 1:
        label += f", LT rho={float(factor):g}"
    return label


def _with_params(name: str, params: dict[str, Any]) -> str:
    """``name(k=v,...)`` with the params set; runs that differ only in a knob are different methods."""
    return f"{name}(" + ",".join(f"{k}={params[k]}" for k in sorted(params)) + ")" if params else name


def method_label(config: dict[str, Any], summary: dict[str, Any]) -> str:
    """Strategy name with the params set in the config (``cafedcl(inference=prototype)``), plus
    ``+<loss>`` (with its params set) when the client loss is not ``ce``, ``+synthetic`` with a
    generator top-up, ``@balanced-test`` when the clients score on the balanced test set, and
    ``/<sampler>`` in active learning."""
    strategy = (config.get("strategy") or {}).get("name") or summary.get("strategy") or "unknown"
    strategy = _with_params(str(strategy), (config.get("strategy") or {}).get("params") or {})
    loss_config = (config.get("train") or {}).get("loss") or {}
    loss = loss_config.get("name", "ce")
    label = f"{strategy}+{_with_params(loss, loss_config.get('params') or {})}" if loss and loss != "ce" else strategy
    if (config.get("synthetic") or {}).get("enabled"):
        label += "+synthetic"
    if (config.get("eval") or {}).get("client_test") == "balanced":  # scored otherwise: another row
        label += "@balanced-test"
    active = config.get("active_learning") or {}
    return f"{label}/{active.get('sampler', '?')}" if active.get("enabled") else label


def _number(value: Any) -> float:
    # Missing or null (NaN written as null) metrics become NaN and are skipped when averaging.
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def last_rounds_mean(rounds: list[dict[str, Any]], metric: str, window: int) -> float:
    """Mean of ``metric`` over the rows of the last ``window`` rounds of ``rounds.csv`` (NaN if none).

    Smooths out a final round that lands on a high or low point of an oscillating run. A metric
    logged only every few rounds (client-side ones) averages the values inside that window.
    """
    if not rounds:
        return float("nan")
    last = max(_number(row.get("round")) for row in rounds)
    values = [_number(row[metric]) for row in rounds
              if metric in row and _number(row.get("round")) > last - window]
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def collect_runs(run_dirs: list[Path] | list[dict[str, Any]], warnings: list[str] | None = None,
                 last_rounds: int = 0) -> list[dict[str, Any]]:
    """One row per run: run_dir, strategy, partition, dataset, seed and the report metrics.

    ``run_dirs``: run directories and records files (see :func:`load_runs`), or runs loaded
    by it. The metrics are the final round's (``summary.json``), or with ``last_rounds = k > 0``
    the mean over the last k logged rounds of ``rounds.csv``.
    """
    runs = _as_runs(run_dirs, warnings)
    rows: list[dict[str, Any]] = []
    for run in runs:
        config, summary = run["config"], run["summary"]
        if not config and warnings is not None:
            warnings.append(f"{run['run_dir']}: no config.yaml, setting and method unknown")
        final = summary.get("final") or {}
        row: dict[str, Any] = {
            "run_dir": run["run_dir"],
            "strategy": method_label(config, summary),
            "partition": partition_label(config) if config else "unknown",
            "dataset": str((config.get("data") or {}).get("dataset", "unknown")),
            "seed": config.get("seed", summary.get("seed")),
        }
        if last_rounds > 0:
            row.update({m: last_rounds_mean(run["rounds"], m, last_rounds) for m in REPORT_METRICS})
        else:
            row.update({m: _number(final.get(m)) for m in REPORT_METRICS})
        row["best_accuracy"] = _number((summary.get("best") or {}).get("accuracy"))
        rows.append(row)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    kept = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
    if kept.size == 0:
        return float("nan"), float("nan"), 0
    return float(kept.mean()), float(kept.std(ddof=0)), int(kept.size)


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group rows by (setting, method); mean, std (ddof=0) and count of each metric over seeds.

    Each group has ``setting, method, n, seeds`` and ``<metric>_mean / _std / _n`` for every
    metric in ``ALL_METRICS`` (``_n`` counts the runs that logged that metric).
    """
    several_datasets = len({r.get("dataset") for r in rows}) > 1
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        # Only name the dataset when it differs between runs, else it is noise in every cell.
        setting = f"{row.get('dataset')}: {row['partition']}" if several_datasets else row["partition"]
        groups[(setting, row["strategy"])].append(row)
    out: list[dict[str, Any]] = []
    for (setting, method), members in sorted(groups.items()):
        group: dict[str, Any] = {
            "setting": setting,
            "method": method,
            "n": len(members),
            "seeds": [m.get("seed") for m in members],
            "run_dirs": [m["run_dir"] for m in members],
        }
        for metric in ALL_METRICS:
            mean, std, n = _mean_std([_number(m.get(metric)) for m in members])
            group.update({f"{metric}_mean": mean, f"{metric}_std": std, f"{metric}_n": n})
        out.append(group)
    return out


def format_cell(metric: str, mean: float, std: float, n: int) -> str:
    """``"mean ± std (n)"``; percent with 2 decimals for fraction metrics, "–" when missing."""
    if n == 0 or not math.isfinite(mean):
        return "–"
    if metric in PERCENT_METRICS:
        return f"{100 * mean:.2f} ± {100 * std:.2f} ({n})"
    return f"{mean:.4f} ± {std:.4f} ({n})"


def _unique(items: list[str]) -> list[str]:
    # Sorted, so tables and plots list methods and settings in the same stable order.
    return sorted(set(items))


def results_markdown(groups: list[dict[str, Any]], metric_cols: tuple[str, ...] | list[str] = ALL_METRICS) -> str:
    """One markdown table per metric: rows = methods, columns = settings."""
    settings = _unique([g["setting"] for g in groups])
    methods = _unique([g["method"] for g in groups])
    by_key = {(g["setting"], g["method"]): g for g in groups}
    blocks: list[str] = []
    for metric in metric_cols:
        unit = " (%)" if metric in PERCENT_METRICS else ""
        lines = [
            f"### {metric}{unit}",
            "",
            "| method | " + " | ".join(settings) + " |",
            "|---|" + "---|" * len(settings),
        ]
        for method in methods:
            cells = []
            for setting in settings:
                g = by_key.get((setting, method))
                cells.append(
                    format_cell(metric, g[f"{metric}_mean"], g[f"{metric}_std"], g[f"{metric}_n"]) if g else "–"
                )
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def results_csv(groups: list[dict[str, Any]], metric_cols: tuple[str, ...] | list[str] = ALL_METRICS) -> str:
    """CSV text, one line per group; metric means/stds as fractions (not percent)."""
    columns = ["setting", "method", "n", "seeds"]
    for metric in metric_cols:
        columns += [f"{metric}_mean", f"{metric}_std"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for g in groups:
        row = {k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in g.items()}
        row["seeds"] = ";".join(str(s) for s in g["seeds"])
        writer.writerow(row)
    return buf.getvalue()


def plot_comparison(groups: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars (setting x method) of balanced accuracy and accuracy with std error bars."""
    settings = _unique([g["setting"] for g in groups])
    methods = _unique([g["method"] for g in groups])
    by_key = {(g["setting"], g["method"]): g for g in groups}
    width = 0.8 / max(len(methods), 1)
    # Wide enough for every bar, whatever the number of settings; the legend gets its own column.
    fig = Figure(figsize=(max(8.0, 0.35 * len(settings) * len(methods) + 4.0), 7.5), layout="constrained")
    axes = fig.subplots(2, 1, squeeze=False).ravel()
    xs = np.arange(len(settings))
    colours = matplotlib.colormaps["tab20"].colors  # 20 distinct colours: methods do not share one
    for ax, metric, title in zip(axes, ("balanced_accuracy", "accuracy"), ("Balanced accuracy", "Accuracy")):
        for i, method in enumerate(methods):
            means = [_number(by_key.get((s, method), {}).get(f"{metric}_mean")) * 100 for s in settings]
            stds = [_number(by_key.get((s, method), {}).get(f"{metric}_std")) * 100 for s in settings]
            # NaN bars (method not run in a setting) are drawn as nothing rather than as 0.
            ax.bar(xs + (i - (len(methods) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=method,
                   color=colours[i % len(colours)])
        ax.set_xticks(xs, settings, rotation=20 if len(settings) > 1 else 0, ha="right" if len(settings) > 1 else "center")
        ax.set_ylabel(f"{title} (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def _mean_curve(rounds_of_runs: list[list[dict[str, Any]]], metric: str = "accuracy") -> tuple[list[float], list[float]]:
    # Average per round over the seeds that logged that round (eval.every may skip rounds).
    per_round: dict[float, list[float]] = defaultdict(list)
    for rounds in rounds_of_runs:
        for row in rounds:
            value = row.get(metric)
            if isinstance(value, float) and math.isfinite(value) and "round" in row:
                per_round[float(row["round"])].append(value)
    rounds = sorted(per_round)
    return rounds, [float(np.mean(per_round[r])) for r in rounds]


def plot_curves_compare(groups: list[dict[str, Any]], path: Path, metric: str = "accuracy",
                        rounds: dict[str, list[dict[str, Any]]] | None = None) -> Path:
    """One panel per setting, one mean-over-seeds ``metric`` curve per method.

    ``rounds``: each run's logged rounds by its ``run_dir``; read from the run directories if not given.
    """
    rounds = rounds or {}
    settings = _unique([g["setting"] for g in groups])
    ncols = min(3, max(len(settings), 1))
    nrows = math.ceil(max(len(settings), 1) / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.4 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, setting in zip(axes, settings):
        for g in (g for g in groups if g["setting"] == setting):
            logged = [rounds[d] if d in rounds else read_rounds_csv(Path(d) / "rounds.csv") for d in g["run_dirs"]]
            xs, values = _mean_curve(logged, metric)
            if xs:
                ax.plot(xs, [100 * v for v in values], label=f"{g['method']} (n={g['n']})")
        ax.set_title(setting, fontsize="medium")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    for ax in axes[len(settings) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(run_dirs: list[Path] | list[dict[str, Any]], out_dir: Path, last_rounds: int = 0) -> Path:
    """Write results.md, results.csv, comparison.png and curves_compare.png; return results.md.

    ``run_dirs``: run directories and records files, or runs loaded by :func:`load_runs`.
    ``last_rounds = k > 0`` reports each run's mean over its last k logged rounds instead of
    its final round. Raises ``ValueError`` when none of ``run_dirs`` holds a ``summary.json``.
    """
    out = Path(out_dir)
    warnings: list[str] = []
    runs = _as_runs(run_dirs, warnings)
    rows = collect_runs(runs, warnings, last_rounds=last_rounds)
    if not rows:
        raise ValueError(f"no finished runs (summary.json) among {len(run_dirs)} run directories")
    groups = aggregate(rows)
    which = f"Metrics averaged over each run's last {last_rounds} logged rounds" if last_rounds > 0 else "Final-round metrics"
    text = f"# Results\n\n{which} on the balanced test set: mean ± std (population, ddof=0)"
    text += " over seeds (n runs), in percent.\n\n" + results_markdown(groups)
    if warnings:
        text += "\n### Skipped\n\n" + "\n".join(f"- {w}" for w in warnings) + "\n"
    atomic_write_text(out / "results.csv", results_csv(groups))
    plot_comparison(groups, out / "comparison.png")
    plot_curves_compare(groups, out / "curves_compare.png", rounds={r["run_dir"]: r["rounds"] for r in runs})
    return atomic_write_text(out / "results.md", text)
