"""The run directory: config, partition statistics, per-round metrics, summary and curves.

Layout of one run directory::

    config.yaml      resolved experiment config
    partition.json   per-client class counts and other partition statistics
    rounds.csv       one row per logged round (rewritten whole after every round)
    checkpoint.pt    the last completed round's model and server state (fedimb/checkpoint.py)
    summary.json     final and best metrics, wall time, seed, package versions, ...
    curves.png       metric curves over rounds

Every file is written atomically (temp file in the same directory, then ``os.replace``), so
a run that is killed mid-write, or a report that reads while a run is going, never sees a
half-written file.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedimb.metrics import DOMAIN_COLUMN_PREFIX as DOMAIN_PREFIX
from fedimb.metrics import WORST_DOMAIN_COLUMN as WORST_DOMAIN

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Panels of curves.png: (metric, title). The last two only appear when logged.
CURVE_PANELS = (
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("macro_f1", "Macro-F1"),
    ("tail_recall", "Tail recall"),
    ("client_accuracy_std", "Client accuracy std"),
    ("train_loss", "Train loss"),
)
OPTIONAL_PANELS = ("client_accuracy_std", "train_loss")
INDENTED_CLIENTS_MAX = 1_000  # partition.json is indented for people up to this many clients
BEST_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "tail_recall", WORST_DOMAIN)
VERSIONED_PACKAGES = {
    "torch": ("torch",),
    "flwr": ("flwr",),
    "ray": ("ray",),
    "numpy": ("numpy",),
    "diffusers": ("diffusers",),
    "flwr_datasets": ("flwr-datasets", "flwr_datasets"),
    "omegaconf": ("omegaconf",),
}


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; create parent directories. Returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The temp file must be in the same directory: os.replace is only atomic within a filesystem.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically. Returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Recursively turn numpy scalars/arrays, Paths and tuples into JSON types.

    Non-finite floats become ``None``: ``NaN`` is not valid JSON and other tools reject it.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON atomically (numpy types converted, NaN -> null); ``indent=None``: one line,
    through the C encoder (an indented dump goes through Python's, about ten times slower)."""
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Render a matplotlib ``Figure`` to PNG with the Agg canvas and write it atomically."""
    buf = io.BytesIO()
    # Figure.savefig uses the Agg canvas for PNG; no pyplot, so no global backend state.
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if _is_sequence(value):
        return [_plain(v) for v in value]
    return value


def flatten_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Expand list metrics into ``name_0 .. name_{n-1}`` columns; scalars pass through."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if _is_sequence(value):
            for i, item in enumerate(value):
                flat[f"{key}_{i}"] = _plain(item)
        else:
            flat[key] = _plain(value)
    return flat


def _column_key(name: str, list_bases: set[str]) -> tuple[str, int]:
    # Expanded columns sort numerically (recall_2 before recall_10), next to their base name.
    base, _, idx = name.rpartition("_")
    if base in list_bases and idx.isdigit():
        return base, int(idx)
    return name, -1


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class RunRecorder:
    """Writes one run directory; keeps the logged rounds in ``self.rounds``.

    Each entry of ``self.rounds`` is ``{"round", "wall_time_s", **metrics}`` with list metrics
    (e.g. ``per_class_recall``) kept as lists; they are expanded only in ``rounds.csv``.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rounds: list[dict[str, Any]] = []
        self._t0 = time.monotonic()
        self._list_bases: set[str] = set()

    def elapsed(self) -> float:
        """Seconds since the recorder was created."""
        return time.monotonic() - self._t0

    def write_config(self, yaml_text: str) -> Path:
        """Write the resolved config as ``config.yaml``."""
        return atomic_write_text(self.run_dir / "config.yaml", yaml_text)

    def write_partition(self, stats: dict[str, Any]) -> Path:
        """Write partition statistics as ``partition.json`` (past 1,000 clients on one line)."""
        many = len(stats.get("clients", ())) > INDENTED_CLIENTS_MAX
        return atomic_write_json(self.run_dir / "partition.json", stats, indent=None if many else 2)

    def log_round(self, round: int, metrics: dict[str, Any]) -> Path:  # noqa: A002 (the CSV column's name)
        """Record one round's metrics and rewrite ``rounds.csv`` with the union of all columns."""
        row: dict[str, Any] = {"round": int(round), "wall_time_s": self.elapsed()}
        row.update({k: _plain(v) for k, v in metrics.items() if k not in row})
        self._list_bases.update(k for k, v in metrics.items() if _is_sequence(v))
        self.rounds.append(row)
        return self._write_csv()

    def restore(self, rows: list[dict[str, Any]], elapsed_s: float) -> Path:
        """Continue a resumed run: its logged rows and wall clock so far; rewrites ``rounds.csv``.

        Rows that a killed run logged after its last checkpoint are dropped here and logged
        again when their rounds run again.
        """
        self.rounds = [dict(row) for row in rows]
        self._list_bases = {k for row in rows for k, v in row.items() if _is_sequence(v)}
        self._t0 = time.monotonic() - elapsed_s
        return self._write_csv()

    def _write_csv(self) -> Path:
        flat_rows = [flatten_metrics(r) for r in self.rounds]
        names = {k for r in flat_rows for k in r} - {"round", "wall_time_s"}
        columns = ["round", "wall_time_s"] + sorted(names, key=lambda n: _column_key(n, self._list_bases))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        for flat in flat_rows:
            writer.writerow({k: ("" if v is None else v) for k, v in flat.items()})
        return atomic_write_text(self.run_dir / "rounds.csv", buf.getvalue())

    def best(self) -> dict[str, Any]:
        """Best value over rounds of each of ``BEST_METRICS`` and ``round`` of best accuracy."""
        best: dict[str, Any] = {}
        for name in BEST_METRICS:
            scored = [(r[name], r["round"]) for r in self.rounds if _finite(r.get(name))]
            if not scored:
                continue
            # Ties go to the earliest round: max() keeps the first maximum it sees.
            value, at_round = max(scored, key=lambda pair: pair[0])
            best[name] = value
            if name == "accuracy":
                best["round"] = at_round
        return best

    def write_summary(self, extra: dict[str, Any] | None = None) -> Path:
        """Write ``summary.json``: final, best, rounds, wall_time_s, plus ``extra`` at top level.

        ``rounds`` is the last logged round number (``rounds_logged`` the row count). The
        recorder's own keys win over same-named keys in ``extra``.
        """
        last = self.rounds[-1] if self.rounds else {}
        final = {k: v for k, v in last.items() if k not in ("round", "wall_time_s")}
        summary: dict[str, Any] = dict(extra or {})
        summary.update(
            {
                "final": final,
                "best": self.best(),
                "rounds": last.get("round", 0),
                "rounds_logged": len(self.rounds),
                "wall_time_s": self.elapsed(),
            }
        )
        return atomic_write_json(self.run_dir / "summary.json", summary)

    def plot_curves(self) -> Path:
        """Plot the metric curves over rounds to ``curves.png``."""
        return plot_rounds(self.rounds, self.run_dir / "curves.png")


def domain_columns(rounds: list[dict[str, Any]]) -> list[str]:
    """The per-domain balanced-accuracy columns of ``rounds``, in the order they first appear."""
    return list(dict.fromkeys(k for r in rounds for k in r if k.startswith(DOMAIN_PREFIX)))


def plot_rounds(rounds: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Plot accuracy, balanced accuracy, macro-F1, tail recall (+ optional panels) vs round.

    With acquisition domains a panel shows each domain's balanced accuracy and the worst one's.
    """
    panels: list[tuple[str, list[str]]] = [
        (label, [name])
        for name, label in CURVE_PANELS
        if name not in OPTIONAL_PANELS or any(_finite(r.get(name)) for r in rounds)
    ]
    per_domain = domain_columns(rounds)
    if per_domain:
        panels.insert(2, ("Balanced accuracy per domain", [*per_domain, WORST_DOMAIN]))
    # matplotlib takes a third of a second to import: only a process that draws pays it, not every CLI call
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ncols = 2 if len(panels) <= 4 else 3
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (label, names) in zip(axes, panels):
        for name in names:
            # Evaluation may skip rounds (eval.every), so each curve uses only rounds that have it.
            points = [(r["round"], r[name]) for r in rounds if _finite(r.get(name))]
            if points:
                xs, ys = zip(*points)
                if name == WORST_DOMAIN:
                    ax.plot(xs, ys, marker="o", markersize=3, linestyle="--", color="black", label="worst")
                else:
                    ax.plot(xs, ys, marker="o", markersize=3, label=name.removeprefix(DOMAIN_PREFIX))
        if len(names) > 1:
            ax.legend(fontsize=7)
        ax.set_title(label)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def package_versions() -> dict[str, str]:
    """Versions of python and the key packages; ``"not installed"`` for missing ones."""
    versions = {"python": platform.python_version()}
    for key, dist_names in VERSIONED_PACKAGES.items():
        versions[key] = "not installed"
        for dist in dist_names:
            try:
                versions[key] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def _parse_cell(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def read_rounds_csv(path: Path) -> list[dict[str, Any]]:
    """Read ``rounds.csv``: numbers as floats, empty cells left out of the row."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as fh:
        return [{k: _parse_cell(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def load_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a run directory as ``{"config": dict, "summary": dict, "rounds": list[dict]}``.

    Missing files give an empty dict / list, so partly written runs can still be inspected.
    """
    from omegaconf import OmegaConf  # deferred: only readers of finished runs need it

    run = Path(run_dir)
    config: dict[str, Any] = {}
    if (run / "config.yaml").is_file():
        loaded = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True)
        config = loaded if isinstance(loaded, dict) else {}
    summary: dict[str, Any] = {}
    if (run / "summary.json").is_file():
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    return {"config": config, "summary": summary, "rounds": read_rounds_csv(run / "rounds.csv")}


# Every file a run writes into its directory (an --overwrite removes these and nothing else).
RUN_FILES = ("config.yaml", "partition.json", "partition.png", "rounds.csv", "failures.csv", "checkpoint.pt",
             "summary.json", "curves.png", "fal.csv", "fal_curve.png", "synthetic_grid.png")
# Any of these means the directory already holds a run.
RUN_MARKERS = ("config.yaml", "rounds.csv", "checkpoint.pt", "summary.json")


def holds_run(run_dir: str | os.PathLike[str]) -> bool:
    """Whether ``run_dir`` already holds (part of) a run."""
    return any((Path(run_dir) / name).is_file() for name in RUN_MARKERS)


def clear_run(run_dir: str | os.PathLike[str]) -> None:
    """Remove a run's files from ``run_dir``, and temp files a killed writer left; other files stay."""
    root = Path(run_dir)
    for name in RUN_FILES:
        (root / name).unlink(missing_ok=True)
    for stale in root.glob(".*.tmp"):
        if stale.name.startswith(tuple(f".{name}." for name in RUN_FILES)):
            stale.unlink(missing_ok=True)


# The text records that a report needs; checkpoints, plots and cached data stay behind.
RECORD_FILES = ("config.yaml", "summary.json", "rounds.csv", "partition.json")


def copy_run_records(run_dirs: list[Path], dest: str | os.PathLike[str]) -> list[Path]:
    """Copy each run's text records to ``dest/<run name>/`` (small enough to commit); return the copies.

    A report built from the copies (``fedimb report dest``) equals one built from the runs.
    """
    copies: list[Path] = []
    for run_dir in run_dirs:
        target = Path(dest) / Path(run_dir).name
        for name in RECORD_FILES:
            source = Path(run_dir) / name
            if source.is_file():
                atomic_write_bytes(target / name, source.read_bytes())
        copies.append(target)
    return copies
