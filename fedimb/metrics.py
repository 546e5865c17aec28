"""Classification and client-fairness metrics, in numpy only.

The server evaluates on a *balanced* test set, so plain accuracy hides what happens to the
rare classes of the long-tailed training set. Besides accuracy we report balanced accuracy,
macro-F1 and the mean recall of the head, middle and tail thirds of the classes, ranked by
how often each class occurs in the (federated) training data.

Definitions match scikit-learn, which the tests check against; scikit-learn itself is not
needed at runtime.
"""

from __future__ import annotations

import numpy as np

# The three class groups, most frequent first.
GROUP_NAMES = ("head", "mid", "tail")


def _as_labels(y: np.ndarray | list[int], num_classes: int, what: str) -> np.ndarray:
    labels = np.asarray(y).astype(np.int64, copy=False).ravel()
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{what} holds labels outside [0, {num_classes})")
    return labels


def confusion(y_true: np.ndarray | list[int], y_pred: np.ndarray | list[int], num_classes: int) -> np.ndarray:
    """Confusion matrix ``(num_classes, num_classes)``: rows are true classes, columns predictions."""
    t = _as_labels(y_true, num_classes, "y_true")
    p = _as_labels(y_pred, num_classes, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} != {p.size}")
    # One bincount over the flattened (true, pred) index is far faster than a Python loop.
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def class_groups(num_classes: int, train_class_counts: np.ndarray | None = None) -> dict[str, list[int]]:
    """Split class ids into head / mid / tail thirds by training frequency (``np.array_split``).

    Classes are sorted by ``train_class_counts`` descending, ties by class id; without counts
    class id order is used (class 0 = head). ``array_split`` makes the *first* parts the larger
    ones, so C=10 gives 4 head, 3 mid and 3 tail classes.
    """
    ids = np.arange(num_classes)
    if train_class_counts is None:
        order = ids
    else:
        counts = np.asarray(train_class_counts, dtype=np.float64).ravel()
        if counts.size != num_classes:
            raise ValueError(f"train_class_counts has {counts.size} entries, expected {num_classes}")
        # lexsort sorts by the last key first: descending count, then ascending class id.
        order = np.lexsort((ids, -counts))
    parts = np.array_split(order, len(GROUP_NAMES))
    return {name: sorted(int(c) for c in part) for name, part in zip(GROUP_NAMES, parts)}


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # sklearn's zero_division=0: a ratio whose denominator is 0 counts as 0.
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _mean_over(values: np.ndarray, mask: np.ndarray) -> float:
    # NaN (not 0) when nothing qualifies: "undefined" must not read as "all wrong".
    return float(values[mask].mean()) if mask.any() else float("nan")


def classification_metrics(
    y_true: np.ndarray | list[int],
    y_pred: np.ndarray | list[int],
    num_classes: int,
    train_class_counts: np.ndarray | None = None,
) -> dict[str, float | list[float]]:
    """Accuracy, balanced accuracy, macro-F1, per-class recall and head/mid/tail recall.

    - ``balanced_accuracy``: mean recall over the classes present in ``y_true`` (as sklearn).
    - ``macro_f1``: sklearn ``f1_score(average="macro", labels=range(C), zero_division=0)``.
    - ``per_class_recall``: length-C list; a class absent from ``y_true`` gets 0.0.
    - ``head/mid/tail_recall``: mean recall over the group's classes present in ``y_true``
      (NaN if none is); groups come from :func:`class_groups`.
    """
    return metrics_from_confusion(confusion(y_true, y_pred, num_classes), train_class_counts)


def metrics_from_confusion(matrix: np.ndarray, train_class_counts: np.ndarray | None = None
                           ) -> dict[str, float | list[float]]:
    """:func:`classification_metrics` from a confusion matrix (rows true, columns predicted).

    Confusion matrices add up, so the clients' matrices summed give the metrics of their pooled
    test splits: federated evaluation with no test sample leaving a client.
    """
    cm = np.asarray(matrix, dtype=np.float64)
    num_classes = cm.shape[0]
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    present = support > 0
    recall = _safe_divide(tp, support)
    # 2tp / (2tp + fp + fn) equals the harmonic mean of precision and recall whenever it is
    # defined, and is 0 exactly where sklearn's zero_division=0 would step in.
    f1 = _safe_divide(2 * tp, support + predicted)
    total = cm.sum()
    metrics: dict[str, float | list[float]] = {
        "accuracy": float(tp.sum() / total) if total else float("nan"),
        "balanced_accuracy": _mean_over(recall, present),
        "macro_f1": float(f1.mean()) if num_classes else float("nan"),
        "per_class_recall": [float(r) for r in recall],
    }
    for name, members in class_groups(num_classes, train_class_counts).items():
        mask = np.zeros(num_classes, dtype=bool)
        mask[members] = True
        metrics[f"{name}_recall"] = _mean_over(recall, mask & present)
    return metrics


def client_fairness(client_accuracies: list[float]) -> dict[str, float]:
    """Mean, population std (ddof=0), worst and best of the clients' local accuracies.

    Returns an empty dict for an empty list, so the result can always be merged into a
    round's metrics (e.g. in rounds where client-side evaluation is switched off).
    """
    if len(client_accuracies) == 0:
        return {}
    acc = np.asarray(client_accuracies, dtype=np.float64)
    return {
        "client_accuracy_mean": float(acc.mean()),
        "client_accuracy_std": float(acc.std(ddof=0)),
        "worst_client_accuracy": float(acc.min()),
        "best_client_accuracy": float(acc.max()),
    }


# Columns of the test set scored in every acquisition domain (``domains`` in the config).
DOMAIN_COLUMN_PREFIX = "balanced_accuracy_domain_"
WORST_DOMAIN_COLUMN = "worst_domain_balanced_accuracy"


def domain_metrics(matrices: dict[str, np.ndarray], train_class_counts: np.ndarray | None = None
                   ) -> dict[str, float | list[float]]:
    """The metrics of a test set scored once per domain, from one confusion matrix per domain name.

    The main metrics (:func:`metrics_from_confusion`) come from the summed matrices: every domain
    scores the whole test set, so each weighs the same. Then ``balanced_accuracy_domain_<name>``
    for each domain, in the given order, and ``worst_domain_balanced_accuracy``, their minimum.
    """
    pooled = metrics_from_confusion(np.sum(list(matrices.values()), axis=0), train_class_counts)
    per_domain = {f"{DOMAIN_COLUMN_PREFIX}{name}": metrics_from_confusion(m)["balanced_accuracy"]
                  for name, m in matrices.items()}
    scored = [v for v in per_domain.values() if np.isfinite(v)]
    return {**pooled, **per_domain, WORST_DOMAIN_COLUMN: float(min(scored)) if scored else float("nan")}
