"""What a partition looks like: per-client class counts, imbalance statistics, table and heatmap."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ANNOTATE_MAX_CELLS = 400  # above this many cells the numbers become unreadable
# Inches of heatmap height: a row per client reads up to about 40 clients; past that the height
# stays put and rows merge into pixels (100,000 rows at 0.35 in each were a 10 GB canvas)
MAX_PLOT_HEIGHT_IN = 15.0


def client_class_counts(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """K x C matrix: how many samples of each class every client holds."""
    labels = np.asarray(labels, dtype=np.int64)
    rows = [np.bincount(labels[np.asarray(p, dtype=np.int64)], minlength=num_classes) for p in parts]
    return np.stack(rows).astype(np.int64) if rows else np.zeros((0, num_classes), dtype=np.int64)


def _ratio(row: np.ndarray) -> float | None:
    present = row[row > 0]
    return float(present.max() / present.min()) if present.size else None


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def partition_stats(counts: np.ndarray) -> dict[str, Any]:
    """JSON-ready summary of a K x C count matrix (imbalance ratios, missing classes, TV distance).

    Ratios and distances of an empty client are ``None`` and left out of the means.
    """
    counts = np.asarray(counts, dtype=np.int64)
    global_counts = counts.sum(axis=0)
    total = int(global_counts.sum())
    p_global = global_counts / total if total else np.zeros_like(global_counts, dtype=float)
    # whole-matrix arithmetic, then plain lists: 100,000 clients row by row took seconds
    sizes = counts.sum(axis=1)
    held = counts > 0
    largest = counts.max(axis=1, initial=0)
    smallest = np.where(held, counts, np.iinfo(np.int64).max).min(axis=1, initial=np.iinfo(np.int64).max)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(held.any(axis=1), largest / smallest, np.nan)
        tvs = 0.5 * np.abs(counts / sizes[:, None] - p_global).sum(axis=1)
    missing_of = [[] for _ in range(len(counts))]
    for k, c in zip(*np.nonzero(~held)):
        missing_of[k].append(int(c))
    clients = [{
        "id": k,
        "size": size,
        "counts": row,
        "imbalance_ratio": None if np.isnan(ratio) else ratio,
        "missing_classes": missing,
        "missing_count": len(missing),
        "distance_to_global": tv if size else None,
    } for k, (size, row, ratio, missing, tv) in enumerate(zip(sizes.tolist(), counts.tolist(), ratios.tolist(),
                                                              missing_of, tvs.tolist()))]
    return {
        "num_clients": int(counts.shape[0]),
        "num_classes": int(counts.shape[1]),
        "total": total,
        "global_counts": [int(v) for v in global_counts],
        "global_imbalance_ratio": _ratio(global_counts),
        "clients": clients,
        "mean_client_imbalance_ratio": _mean([c["imbalance_ratio"] for c in clients]),
        "mean_missing_classes": float(np.mean([c["missing_count"] for c in clients])) if clients else 0.0,
        "mean_distance_to_global": _mean([c["distance_to_global"] for c in clients]),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_partition_table(stats: dict[str, Any]) -> str:
    """Fixed-width text table: one row per client, one column per class, then size, IR, missing, TV."""
    num_classes = stats["num_classes"]
    width = max(len(str(stats["total"])), len(f"c{num_classes - 1}"), 3) + 1
    head = ["client".ljust(7)] + [f"c{c}".rjust(width) for c in range(num_classes)]
    head += ["size".rjust(8), "IR".rjust(8), "miss".rjust(5), "TV".rjust(6)]
    lines = ["".join(head)]
    for client in stats["clients"]:
        cells = [str(client["id"]).ljust(7)] + [str(v).rjust(width) for v in client["counts"]]
        cells += [
            str(client["size"]).rjust(8),
            _fmt(client["imbalance_ratio"], ".1f").rjust(8),
            str(client["missing_count"]).rjust(5),
            _fmt(client["distance_to_global"], ".3f").rjust(6),
        ]
        lines.append("".join(cells))
    total = ["all".ljust(7)] + [str(v).rjust(width) for v in stats["global_counts"]]
    total += [str(stats["total"]).rjust(8), _fmt(stats["global_imbalance_ratio"], ".1f").rjust(8)]
    lines.append("".join(total))
    lines.append(
        f"mean client IR {_fmt(stats['mean_client_imbalance_ratio'], '.2f')}, "
        f"mean missing classes {stats['mean_missing_classes']:.2f}, "
        f"mean TV distance to global {_fmt(stats['mean_distance_to_global'], '.3f')}"
    )
    return "\n".join(lines)


def plot_partition(counts: np.ndarray, path: str | os.PathLike[str], title: str = "") -> None:
    """Heatmap PNG of a K x C count matrix (clients x classes), written atomically."""
    # Figure without pyplot: renders with Agg and leaves the global backend/state alone
    from matplotlib.figure import Figure

    counts = np.asarray(counts)
    num_clients, num_classes = counts.shape
    fig = Figure(figsize=(max(4.0, 0.5 * num_classes + 2), min(MAX_PLOT_HEIGHT_IN, max(3.0, 0.35 * num_clients + 1.5))))
    ax = fig.add_subplot()
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="samples")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    if num_classes <= 30:
        ax.set_xticks(range(num_classes))
    if num_clients <= 30:
        ax.set_yticks(range(num_clients))
    if counts.size <= ANNOTATE_MAX_CELLS:
        threshold = counts.max() / 2 if counts.size else 0
        for (k, c), value in np.ndenumerate(counts):
            colour = "black" if value > threshold else "white"
            ax.text(c, k, str(int(value)), ha="center", va="center", fontsize=7, color=colour)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # a reader (dashboard, report) must never see a half-written PNG
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=100)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a plot is meant to be shared
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
