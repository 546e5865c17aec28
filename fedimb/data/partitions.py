"""Split a labelled training set over K clients.

Each scheme is one function ``(labels, num_clients, cfg, seed) -> list of index arrays``
registered in :data:`PARTITIONERS`. :func:`partition_indices` checks the result: the parts are
disjoint, together hold every sample, and come back sorted.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from fedimb.config import ConfigError, PartitionConfig

Partitioner = Callable[[np.ndarray, int, PartitionConfig, int], list[np.ndarray]]


def _label_dataset(labels: np.ndarray):  # -> datasets.Dataset
    import datasets

    # "row" carries the original index through flwr's dataset.select()
    # arrow format: a column comes back as one pyarrow array; the default (and numpy) format
    # hands flwr a lazy Column that np.array() converts row by row (~10 s for 60k rows)
    return datasets.Dataset.from_dict({"label": labels, "row": np.arange(labels.size)}).with_format("arrow")


def _equal_sizes(total: int, num_clients: int) -> np.ndarray:
    """``total // K`` each, the remainder spread one by one over the first clients."""
    sizes = np.full(num_clients, total // num_clients, dtype=np.int64)
    sizes[: total % num_clients] += 1
    return sizes


def _materialise(labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Turn a K x C count matrix into index lists: each class shuffled, then cut in client order."""
    parts: list[list[np.ndarray]] = [[] for _ in range(counts.shape[0])]
    for c in range(counts.shape[1]):
        idx = rng.permutation(np.flatnonzero(labels == c))
        bounds = np.concatenate([[0], np.cumsum(counts[:, c])])
        for k in range(counts.shape[0]):
            parts[k].append(idx[bounds[k]: bounds[k + 1]])
    return [np.concatenate(p) if p else np.empty(0, dtype=np.int64) for p in parts]


# ---------------------------------------------------------------- schemes


def iid_partition(
    labels: np.ndarray, num_clients: int, cfg: PartitionConfig, seed: int
) -> list[np.ndarray]:
    """Random equal split (sizes differ by at most one)."""
    # flwr's IidPartitioner cuts contiguous shards without shuffling or a seed: label-sorted
    # data would come out pathological, so we shuffle ourselves
    perm = np.random.default_rng(seed).permutation(labels.size)
    return list(np.array_split(perm, num_clients))


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, cfg: PartitionConfig, seed: int
) -> list[np.ndarray]:
    """Label skew: each class split over the clients by proportions ~ Dir(alpha) (flwr-datasets)."""
    from flwr_datasets.partitioner import DirichletPartitioner

    part = DirichletPartitioner(
        num_partitions=num_clients, partition_by="label", alpha=float(cfg.alpha),
        min_partition_size=cfg.min_size, self_balancing=False, shuffle=False, seed=seed,
    )
    part.dataset = _label_dataset(labels)
    try:
        with warnings.catch_warnings():
            # it warns on every resample; the failure after 10 becomes our ConfigError
            warnings.simplefilter("ignore", UserWarning)
            return [part.load_partition(k)["row"].to_numpy() for k in range(num_clients)]
    except ValueError as exc:
        if "attempts" not in str(exc):
            raise
        raise ConfigError(
            "partition.alpha",
            f"Dirichlet(alpha={cfg.alpha}) could not give each of {num_clients} clients at least "
            f"partition.min_size={cfg.min_size} of {labels.size} samples after 10 resamples; "
            "raise partition.alpha, lower partition.min_size or use fewer clients",
        ) from None


def _assign_labels(num_clients: int, classes: int, k: int, rng: np.random.Generator) -> list[list[int]]:
    """NIID-Bench #C=k: client i holds label i % C, then distinct random others.

    Labels nobody holds yet are handed out first so that every label has an owner whenever
    K * k >= C (NIID-Bench itself drops them when K < C).
    """
    held = [[i % classes] for i in range(num_clients)]
    orphans = [int(c) for c in rng.permutation(np.arange(num_clients, classes))]
    for _ in range(1, k):
        for i in range(num_clients):
            if orphans:
                held[i].append(orphans.pop())
    for i in range(num_clients):
        while len(held[i]) < k:
            c = int(rng.integers(classes))
            if c not in held[i]:
                held[i].append(c)
    return held


def shards_partition(
    labels: np.ndarray, num_clients: int, cfg: PartitionConfig, seed: int
) -> list[np.ndarray]:
    """Each client holds exactly ``classes_per_client`` labels; a label is split evenly among its holders."""
    classes = int(labels.max()) + 1
    k = cfg.classes_per_client
    if k > classes:
        raise ConfigError("partition.classes_per_client", f"{k} is more than the {classes} classes")
    if num_clients * k < classes:
        raise ConfigError(
            "partition.classes_per_client",
            f"{num_clients} clients x {k} labels cannot cover all {classes} classes; raise it "
            "or federation.num_clients (no sample may be dropped)",
        )
    rng = np.random.default_rng(seed)
    held = _assign_labels(num_clients, classes, k, rng)
    counts = np.zeros((num_clients, classes), dtype=np.int64)
    class_sizes = np.bincount(labels, minlength=classes)
    for c in range(classes):
        owners = [i for i in range(num_clients) if c in held[i]]
        counts[owners, c] = _equal_sizes(int(class_sizes[c]), len(owners))
    return _materialise(labels, counts, rng)


def quantity_partition(
    labels: np.ndarray, num_clients: int, cfg: PartitionConfig, seed: int
) -> list[np.ndarray]:
    """Quantity skew: client sizes ~ Dir(alpha) * N (each at least 1), content IID."""
    rng = np.random.default_rng(seed)
    props = rng.dirichlet(np.full(num_clients, float(cfg.alpha)))
    spare = labels.size - num_clients  # one sample per client is reserved up front
    real = props * spare
    sizes = np.floor(real).astype(np.int64)
    # largest remainders get the samples that flooring lost, so the sizes add up to N
    sizes[np.argsort(-(real - sizes), kind="stable")[: spare - int(sizes.sum())]] += 1
    sizes += 1
    perm = rng.permutation(labels.size)
    return list(np.split(perm, np.cumsum(sizes)[:-1]))


def inner_dirichlet_partition(
    labels: np.ndarray, num_clients: int, cfg: PartitionConfig, seed: int
) -> list[np.ndarray]:
    """Equal client sizes; each client draws its samples' classes from its own prior ~ Dir(alpha).

    Same generative process as flwr-datasets' InnerDirichletPartitioner (exhausted classes are
    dropped from every prior), done on counts with pre-drawn uniforms. Ours because flwr's calls
    ``rng.choice`` per sample (4-6 s on 60k samples) and fails with "Probabilities contain NaN"
    for small alpha once a client's whole prior sits on exhausted classes.
    """
    rng = np.random.default_rng(seed)
    classes = int(labels.max()) + 1
    remaining = np.bincount(labels, minlength=classes)
    priors = rng.dirichlet(np.full(classes, float(cfg.alpha)), size=num_clients)
    priors[:, remaining == 0] = 0.0
    order = rng.permutation(np.repeat(np.arange(num_clients), _equal_sizes(labels.size, num_clients)))
    draws = rng.random(order.size)
    counts = np.zeros((num_clients, classes), dtype=np.int64)
    cum = np.cumsum(priors, axis=1)
    for k, u in zip(order.tolist(), draws.tolist()):
        row = cum[k]
        if row[-1] <= 0:  # its prior mass sat only on exhausted classes: fall back to what is left
            row = np.cumsum(remaining.astype(np.float64))
        c = min(int(np.searchsorted(row, u * row[-1], side="right")), classes - 1)
        while remaining[c] == 0:  # float edge: landed on a zero-width class
            c = (c + 1) % classes
        counts[k, c] += 1
        remaining[c] -= 1
        if remaining[c] == 0:
            priors[:, c] = 0.0
            cum = np.cumsum(priors, axis=1)
    return _materialise(labels, counts, rng)


def _sinkhorn_split(
    labels: np.ndarray, num_clients: int, cfg: PartitionConfig, rng: np.random.Generator
) -> np.ndarray:
    """K x C counts: Dirichlet rows, alternating row/column normalisation, classes cut by column."""
    classes = int(labels.max()) + 1
    class_sizes = np.bincount(labels, minlength=classes)
    p = rng.dirichlet(np.full(classes, float(cfg.alpha)), size=num_clients)
    for _ in range(cfg.normalise_rounds):
        p = p / (p.sum(axis=1, keepdims=True) + 1e-12)
        p = p / (p.sum(axis=0, keepdims=True) + 1e-12)
    counts = np.zeros((num_clients, classes), dtype=np.int64)
    for c in range(classes):
        col = p[:, c]
        col = col / col.sum() if col.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
        real = col * class_sizes[c]
        base = np.floor(real).astype(np.int64)
        base[np.argsort(-(real - base), kind="stable")[: class_sizes[c] - int(base.sum())]] += 1
        counts[:, c] = base
    return counts


def _balance_rows(counts: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Move samples from clients above their target to clients below it, keeping class sums.

    The receiver with the largest deficit takes from the donor with the largest surplus, in the
    class the receiver already holds most of among the donor's classes (keeps skew where possible).
    """
    counts = counts.copy()
    excess = counts.sum(axis=1) - targets
    while excess.max() > 0:
        donor, receiver = int(np.argmax(excess)), int(np.argmin(excess))
        available = counts[donor] > 0
        c = int(np.argmax(np.where(available, counts[receiver], -1)))
        if counts[receiver, c] == 0:
            c = int(np.argmax(counts[donor]))
        moved = int(min(excess[donor], -excess[receiver], counts[donor, c]))
        counts[donor, c] -= moved
        counts[receiver, c] += moved
        excess[donor] -= moved
        excess[receiver] += moved
    return counts


def dir_balance_partition(
    labels: np.ndarray, num_clients: int, cfg: PartitionConfig, seed: int
) -> list[np.ndarray]:
    """FairFAL's ``dir_balance``: Dirichlet label skew with every client holding N // K (+1)."""
    rng = np.random.default_rng(seed)
    counts = _sinkhorn_split(labels, num_clients, cfg, rng)
    counts = _balance_rows(counts, _equal_sizes(labels.size, num_clients))
    return _materialise(labels, counts, rng)


PARTITIONERS: dict[str, Partitioner] = {
    "iid": iid_partition,
    "dirichlet": dirichlet_partition,
    "shards": shards_partition,
    "quantity": quantity_partition,
    "inner_dirichlet": inner_dirichlet_partition,
    "dir_balance": dir_balance_partition,
}


def partition_indices(
    labels: np.ndarray, num_clients: int, cfg: PartitionConfig, seed: int
) -> list[np.ndarray]:
    """Indices into ``labels`` of each client: disjoint, together all samples, sorted, seeded."""
    labels = np.asarray(labels, dtype=np.int64)
    if num_clients > labels.size:
        raise ConfigError(
            "federation.num_clients",
            f"more clients ({num_clients}) than training samples ({labels.size}); "
            "lower federation.num_clients or imbalance.factor, or raise partition.copies",
        )
    if cfg.name not in PARTITIONERS:
        allowed = ", ".join(PARTITIONERS)
        raise ConfigError("partition.name", f"'{cfg.name}' is not allowed; choose one of {allowed}")
    # schemes index classes 0..C-1: drop the gaps left by empty classes
    _, dense = np.unique(labels, return_inverse=True)
    raw = PARTITIONERS[cfg.name](dense, num_clients, cfg, seed)
    parts = [np.sort(np.asarray(p, dtype=np.int64)) for p in raw]
    joined = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    if len(parts) != num_clients or joined.size != labels.size or np.unique(joined).size != labels.size:
        raise RuntimeError(f"partition '{cfg.name}' is not a disjoint, complete split")
    return parts
