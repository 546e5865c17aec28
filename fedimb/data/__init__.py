"""Data pipeline: load a dataset, apply the global long tail, partition it over clients.

:func:`build_federated_data` runs the three steps for one :class:`ExperimentConfig`; it is
cached per process because every simulated client process calls it.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, astuple, dataclass

import numpy as np

from fedimb.config import DataConfig, ExperimentConfig, ImbalanceConfig, PartitionConfig
from fedimb.data.datasets import DatasetSplits, load_dataset
from fedimb.data.domains import LOCAL_TEST, TRAIN, client_images
from fedimb.data.longtail import apply_long_tail, long_tail_counts
from fedimb.data.partitions import PARTITIONERS, partition_indices
from fedimb.data.report import client_class_counts, format_partition_table, partition_stats, plot_partition
from fedimb.data.split_cache import Split, cached_split

__all__ = [
    "PARTITIONERS",
    "DatasetSplits",
    "FederatedData",
    "apply_long_tail",
    "build_federated_data",
    "client_class_counts",
    "client_test_images",
    "client_train_data",
    "format_partition_table",
    "load_dataset",
    "long_tail_counts",
    "partition_indices",
    "partition_stats",
    "plot_partition",
]


@dataclass
class FederatedData:
    """A dataset split over clients.

    ``train_indices``: samples kept by the long tail and not held out (indices into ``splits.train_x``;
    each ``partition.copies`` times);
    ``client_indices[k]``: client k's samples, also indices into ``splits.train_x``;
    ``counts``: K x C class counts; ``validation_indices``: held-out training samples
    (``data.validation_fraction`` of each class, for tuning without the test set).
    The test set is left as loaded (balanced).
    """

    splits: DatasetSplits
    train_indices: np.ndarray
    client_indices: list[np.ndarray]
    counts: np.ndarray
    validation_indices: np.ndarray


def hold_out(labels: np.ndarray, indices: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (kept, held-out), holding out ``fraction`` of each class (at least one)."""
    if fraction <= 0:
        return indices, indices[:0]
    rng = np.random.default_rng([seed, 11])
    held = []
    for cls in np.unique(labels[indices]):
        members = indices[labels[indices] == cls]
        take = max(1, int(round(fraction * len(members)))) if len(members) > 1 else 0
        held.append(rng.choice(members, size=take, replace=False))
    held_out = np.sort(np.concatenate(held))
    return np.setdiff1d(indices, held_out), held_out


def _split(labels: np.ndarray, num_classes: int, seed: int, data_cfg: DataConfig, imb: ImbalanceConfig,
           partition_cfg: PartitionConfig, num_clients: int) -> Split:
    """Long tail, hold-out and partition: (kept indices, each client's indices, held-out indices)."""
    kept = apply_long_tail(labels, imb.factor, imb.profile, imb.step_minor_fraction, seed, num_classes)
    kept, validation = hold_out(labels, kept, data_cfg.validation_fraction, seed)
    kept = np.repeat(kept, partition_cfg.copies)  # still sorted: each sample's copies side by side
    parts = partition_indices(labels[kept], num_clients, partition_cfg, seed)
    # kept is sorted, so mapping sorted positions through it keeps each client's list sorted
    return kept, [kept[p] for p in parts], validation


@functools.lru_cache(maxsize=4)
def _build_cached(
    seed: int, data: tuple, imbalance: tuple, partition: tuple, num_clients: int
) -> FederatedData:
    data_cfg, imb, partition_cfg = DataConfig(*data), ImbalanceConfig(*imbalance), PartitionConfig(*partition)
    splits = load_dataset(data_cfg)
    # the split depends on the dataset's labels (hashed into the key), not on where the files lie
    made_of = {"seed": seed, "data": {k: v for k, v in asdict(data_cfg).items() if k != "root"},
               "imbalance": asdict(imb), "partition": asdict(partition_cfg), "num_clients": num_clients}
    kept, client_indices, validation = cached_split(made_of, splits.train_y, lambda: _split(
        splits.train_y, splits.num_classes, seed, data_cfg, imb, partition_cfg, num_clients))
    counts = client_class_counts(splits.train_y, client_indices, splits.num_classes)
    return FederatedData(splits, kept, client_indices, counts, validation)


def build_federated_data(cfg: ExperimentConfig) -> FederatedData:
    """Load, long-tail (seed ``cfg.seed``) and partition (seed ``cfg.seed``) the training set."""
    # config dataclasses are unhashable: the cache is keyed on plain tuples of their fields
    return _build_cached(
        int(cfg.seed), astuple(cfg.data), astuple(cfg.imbalance), astuple(cfg.partition),
        int(cfg.federation.num_clients),
    )


def client_train_data(data: FederatedData, cfg: ExperimentConfig, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Client ``partition_id``'s training images, as its device and noise level make them, and labels."""
    idx = data.client_indices[partition_id]
    x = client_images(data.splits.train_x[idx], cfg, data.splits.normalisation, partition_id, TRAIN)
    return x, data.splits.train_y[idx]


def client_test_images(data: FederatedData, cfg: ExperimentConfig, partition_id: int,
                       test_idx: np.ndarray) -> np.ndarray:
    """Test images ``test_idx`` as client ``partition_id`` would take them (its local test split)."""
    return client_images(data.splits.test_x[test_idx], cfg, data.splits.normalisation, partition_id, LOCAL_TEST)
