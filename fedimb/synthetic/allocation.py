"""Which synthetic samples each client gets: (class, domain) pairs and the closed loop's error-driven targets.

Pure functions of counts and errors (numpy), shared by the server's synthetic phase and its
closed loop. Their unit is the generator's label: a class, or for a generator conditioned on
(class, domain) the pair id ``domain · C + class`` (``Generator.condition_ids``). A client's
counts in that layout (:func:`condition_counts`) hold its classes in its own domain's block and
zeros elsewhere, so :func:`~fedimb.synthetic.topup.topup_counts` fills the pairs it lacks, the
other domains' included, within the same target and cap as the class-only top-up.

The closed loop (``synthetic.closed_loop_every``) turns the global model's errors into targets:
per label, the static target times a weight proportional to the error (:func:`error_weights`,
mean 1, so the targets add up to the static ones), the class weight times the domain weight for
a pair; then the same cap on synthetic:real as ever.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedimb.config import ExperimentConfig
from fedimb.synthetic.topup import topup_counts


def generator_domains(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The domains a generator of ``cfg`` is conditioned on: ``domains.names`` under
    ``synthetic.condition=class_domain``, else ()."""
    return tuple(cfg.domains.names) if cfg.synthetic.condition == "class_domain" else ()


def client_domain_indices(cfg: ExperimentConfig) -> np.ndarray | None:
    """Each client's domain, an index into ``domains.names``, by partition id; None without domains.

    The assignment :mod:`fedimb.data.domains` gives the clients' images (same seed, same shares).
    """
    if not cfg.domains.names:
        return None
    from fedimb.data.domains import assign_domains, domain_shares  # the data layer: only runs with domains

    return assign_domains(cfg.federation.num_clients, domain_shares(cfg.domains), cfg.seed)


def client_generator_domain(cfg: ExperimentConfig, partition_id: int) -> int | None:
    """The domain index a client's images carry for a (class, domain) generator; None for a class one."""
    if not generator_domains(cfg):
        return None
    return int(client_domain_indices(cfg)[partition_id])


def condition_counts(counts: np.ndarray, domains: np.ndarray | None, num_domains: int) -> np.ndarray:
    """Class counts (K × C) laid out per generator label (K × D·C): client k's in its domain's block.

    ``domains`` None (a class-conditional generator) returns ``counts`` as they are.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if domains is None:
        return counts
    num_clients, num_classes = counts.shape
    out = np.zeros((num_clients, num_domains * num_classes), dtype=np.int64)
    for k, d in enumerate(np.asarray(domains, dtype=np.int64)):
        out[k, d * num_classes:(d + 1) * num_classes] = counts[k]
    return out


def error_weights(errors: Sequence[float] | np.ndarray) -> np.ndarray:
    """Weights proportional to ``errors``, mean 1 (the targets keep their total).

    An error that was not measured (NaN: a class absent from the evaluation set) takes the mean
    of the others; all errors zero (or none measured) give equal weights, the static top-up.
    """
    values = np.asarray(errors, dtype=np.float64)
    measured = values[np.isfinite(values)]
    if measured.size == 0 or measured.sum() <= 0:
        return np.ones(len(values))
    values = np.clip(np.where(np.isfinite(values), values, measured.mean()), 0.0, None)
    return values * (len(values) / values.sum())


def condition_weights(class_errors: Sequence[float] | np.ndarray,
                      domain_errors: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """The closed loop's weight of every generator label: the class's, times the domain's for a pair
    (``d · C + c``); both mean 1, so the product is too."""
    per_class = error_weights(class_errors)
    if domain_errors is None:
        return per_class
    return np.outer(error_weights(domain_errors), per_class).reshape(-1)


def topup_targets(counts: np.ndarray, target_per_class: int, weights: np.ndarray) -> np.ndarray:
    """Per generator label, the static target (``target_per_class``, 0 = the client's largest
    count) times its weight, rounded to whole samples."""
    counts = np.asarray(counts, dtype=np.int64)
    base = int(target_per_class) if target_per_class > 0 else int(counts.max(initial=0))
    return np.rint(base * np.asarray(weights, dtype=np.float64)).astype(np.int64)


def plan_topups(counts: np.ndarray, domains: np.ndarray | None, num_domains: int, target_per_class: int,
                max_ratio: float, weights: np.ndarray | None = None) -> np.ndarray:
    """Synthetic samples per client (K rows) and generator label, within the usual target and cap.

    ``counts``: class counts, K × C. With ``domains`` (each client's index) the labels are the
    (class, domain) pairs and only pairs some client holds are filled (the generator never learned
    the others). ``weights`` (the closed loop's, per label) scale the targets; None is the static
    top-up, for a class generator exactly :func:`~fedimb.synthetic.topup.topup_counts` per client.
    """
    per_label = condition_counts(counts, domains, num_domains)
    learned = None if domains is None else per_label.sum(axis=0) > 0
    rows = []
    for row in per_label:
        target = target_per_class if weights is None else topup_targets(row, target_per_class, weights)
        rows.append(topup_counts(row, target, max_ratio, allowed=learned))
    return np.asarray(rows, dtype=np.int64).reshape(per_label.shape)


def errors_from_row(row: Mapping[str, Any], domain_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The global model's errors in a logged round: per class ``1 - per_class_recall``, per domain
    ``1 - balanced_accuracy_domain_<name>`` (None without domains, or when the row has none).

    None when the row has no per-class recall (no evaluation that round).
    """
    from fedimb.metrics import DOMAIN_COLUMN_PREFIX

    recall = row.get("per_class_recall")
    if recall is None:
        return None
    class_errors = 1.0 - np.asarray(recall, dtype=np.float64)
    columns = [f"{DOMAIN_COLUMN_PREFIX}{name}" for name in domain_names]
    if not domain_names or not all(column in row for column in columns):
        return class_errors, None
    scores = [float(row[column]) for column in columns]
    return class_errors, np.asarray([1.0 - v if math.isfinite(v) else math.nan for v in scores])
