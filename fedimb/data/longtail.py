"""Global long tail: subsample the training set so class sizes decay from head to tail."""

from __future__ import annotations

import math

import numpy as np

from fedimb.config import LONG_TAIL_PROFILES, ConfigError

# floor(n * rho^-x) must not lose a sample to rounding when the product is an exact integer
_EPS = 1e-9


def long_tail_counts(
    class_counts: np.ndarray, factor: float, profile: str = "exp", minor_fraction: float = 0.5
) -> np.ndarray:
    """Per-class sizes to keep; class 0 is the head, the last class has ``n_max / factor``.

    ``n_max`` is the smallest original (non-empty) class size so that every class can supply
    its share. ``exp``: class i keeps ``floor(n_max * factor^(-i/(C-1)))``. ``step``: the last
    ``floor(C * minor_fraction)`` classes (at least 1, at most C-1) keep ``floor(n_max/factor)``,
    the others ``n_max``. ``factor == 1`` returns the counts unchanged.
    """
    counts = np.asarray(class_counts, dtype=np.int64)
    if factor < 1:
        raise ConfigError("imbalance.factor", f"must be >= 1 (1 = no long tail), got {factor}")
    if profile not in LONG_TAIL_PROFILES:
        allowed = ", ".join(LONG_TAIL_PROFILES)
        raise ConfigError("imbalance.profile", f"'{profile}' is not allowed; choose one of {allowed}")
    num_classes = counts.size
    present = counts[counts > 0]
    if factor == 1 or num_classes < 2 or present.size == 0:
        return counts.copy()
    n_max = int(present.min())
    if profile == "exp":
        exponents = -np.arange(num_classes) / (num_classes - 1)
        target = np.floor(n_max * np.power(float(factor), exponents) + _EPS).astype(np.int64)
    else:
        num_minor = min(max(int(math.floor(num_classes * minor_fraction + _EPS)), 1), num_classes - 1)
        target = np.full(num_classes, n_max, dtype=np.int64)
        target[num_classes - num_minor:] = int(math.floor(n_max / factor + _EPS))
    # an empty class stays empty instead of asking for samples it does not have
    return np.minimum(target, counts)


def apply_long_tail(
    labels: np.ndarray,
    factor: float,
    profile: str = "exp",
    minor_fraction: float = 0.5,
    seed: int = 0,
    num_classes: int | None = None,
) -> np.ndarray:
    """Sorted indices of the samples kept by the long tail, drawn at random per class (seeded)."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=num_classes or 0)
    keep = long_tail_counts(counts, factor, profile, minor_fraction)
    if np.array_equal(keep, counts):
        return np.arange(labels.size)
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=int(n), replace=False)
        for c, n in enumerate(keep)
        if n > 0
    ]
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)
