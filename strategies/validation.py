"""Checks on a train reply before it may enter any aggregation.

The weights must have the global model's keys, shapes and dtypes and be finite; every extra
record a strategy reads (SCAFFOLD's control variate, the prototype statistics) must have the
signature the strategy declares and be finite too; the metrics must be finite numbers with a
positive weighting value. A reply that fails gets one reason, which the run records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedimb import protocol

Signature = dict[str, tuple[tuple[int, ...], str]]  # array key → (shape, dtype)


def signature(record: ArrayRecord) -> Signature:
    """Each array's shape and dtype, read from the record without decoding the data."""
    return {key: (tuple(int(d) for d in array.shape), str(array.dtype)) for key, array in record.items()}


def _same_kind(got: str, expected: str) -> bool:
    """The same dtype, or floats of another width: a server optimiser (FedAdam) keeps float64
    weights that every client trains as float32, and neither is a malformed update."""
    if got == expected:
        return True
    return np.issubdtype(np.dtype(got), np.floating) and np.issubdtype(np.dtype(expected), np.floating)


def _first(keys: set[str] | list[str]) -> str:
    shown = sorted(keys)
    return ", ".join(shown[:3]) + (f" (+{len(shown) - 3})" if len(shown) > 3 else "")


def record_problem(name: str, record: ArrayRecord, expected: Signature | None) -> str | None:
    """Why ``record`` does not match ``expected`` (None: any keys and shapes) or is not finite; None if fine."""
    got = signature(record)
    if expected is not None:
        missing, extra = set(expected) - set(got), set(got) - set(expected)
        if missing or extra:
            parts = ([f"missing {_first(missing)}"] if missing else []) + ([f"unexpected {_first(extra)}"] if extra else [])
            return f"{name}: keys differ ({'; '.join(parts)})"
        for key, (shape, dtype) in expected.items():
            if got[key][0] != shape:
                return f"{name}: {key} has shape {got[key][0]}, expected {shape}"
            if not _same_kind(got[key][1], dtype):
                return f"{name}: {key} has dtype {got[key][1]}, expected {dtype}"
    for key, array in record.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.number) and not np.isfinite(values).all():
            return f"{name}: {key} is not finite"
    return None


def metrics_problem(content: RecordDict, weight_key: str) -> str | None:
    """Why the reply's metrics cannot be used (missing, non-finite, weight <= 0); None if fine."""
    if protocol.METRICS not in content:
        return "metrics: missing"
    metrics = content[protocol.METRICS]
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if any(not math.isfinite(float(v)) for v in values):
            return f"metrics: {key} is not finite"
    weight = metrics.get(weight_key)
    if isinstance(weight, list) or weight is None or float(weight) <= 0:
        return f"metrics: {weight_key} must be one number > 0, got {weight!r}"
    return None


def reply_problem(content: RecordDict, weights: Signature | None, extras: Mapping[str, Signature | None],
                  weight_key: str) -> str | None:
    """The first reason a train reply must not be aggregated, or None.

    ``weights``: the global model's signature (None before any round started: finiteness only);
    ``extras``: the other records the strategy reads, each with its signature (None: finite only).
    """
    if protocol.ARRAYS not in content.array_records:
        return "weights: missing"
    problem = record_problem("weights", content[protocol.ARRAYS], weights)
    for key in content.array_records:
        if problem is not None:
            break
        if key == protocol.ARRAYS:
            continue
        problem = record_problem(key, content[key], extras[key]) if key in extras else f"unexpected record {key}"
    missing = [key for key in extras if key not in content.array_records]
    if problem is None and missing:
        problem = f"record {missing[0]}: missing"
    return problem or metrics_problem(content, weight_key)


def update_norms(contents: list[RecordDict], start: ArrayRecord | None) -> np.ndarray:
    """L2 norm of each reply's update (weights − ``start``) over its float arrays; of the weights without a start."""
    origin = {} if start is None else {k: v.numpy().astype(np.float64) for k, v in start.items()}
    norms = []
    for content in contents:
        total = 0.0
        for key, array in content[protocol.ARRAYS].items():
            values = array.numpy()
            if np.issubdtype(values.dtype, np.floating):
                total += float(np.sum((values.astype(np.float64) - origin.get(key, 0.0)) ** 2))
        norms.append(math.sqrt(total))
    return np.array(norms)


def norm_outliers(norms: np.ndarray, factor: float) -> list[int]:
    """Positions whose norm exceeds ``factor`` × the median norm (``factor`` 0: none)."""
    if factor <= 0 or len(norms) == 0:
        return []
    bound = factor * float(np.median(norms))
    return [i for i, n in enumerate(norms) if n > bound]
