"""Tests of fedimb.data: loaders, long tail, partitioners, partition reports."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from fedimb.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    FederationConfig,
    ImbalanceConfig,
    PartitionConfig,
)
from fedimb.data import (
    PARTITIONERS,
    apply_long_tail,
    build_federated_data,
    client_class_counts,
    format_partition_table,
    load_dataset,
    partition_indices,
    partition_stats,
    plot_partition,
)
from fedimb.data.datasets import load_fmnist, splits_from_hf
from fedimb.data.longtail import long_tail_counts

FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"
SCHEMES = sorted(PARTITIONERS)


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(dataset="digits"))


@pytest.fixture(scope="module")
def fmnist():
    return load_dataset(DataConfig(dataset="fmnist", root=FMNIST_ROOT))


def _cfg(name: str, **kw) -> PartitionConfig:
    kw.setdefault("min_size", 0)
    return PartitionConfig(name=name, **kw)


def _mean_tv(labels: np.ndarray, name: str, alpha: float, seed: int = 0) -> float:
    parts = partition_indices(labels, 10, _cfg(name, alpha=alpha), seed)
    return partition_stats(client_class_counts(labels, parts, 10))["mean_distance_to_global"]


# ---------------------------------------------------------------- datasets


def test_digits_splits(digits):
    assert digits.train_x.shape == (1347, 1, 8, 8) and digits.test_x.shape == (450, 1, 8, 8)
    assert digits.train_x.dtype == np.float32 and digits.train_y.dtype == np.int64
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert abs(float(digits.train_x.mean())) < 1e-4 and abs(float(digits.train_x.std()) - 1) < 1e-3
    test_counts = np.bincount(digits.test_y, minlength=10)
    assert test_counts.min() >= 43 and test_counts.max() <= 46  # stratified 25 %
    assert load_dataset(DataConfig(dataset="digits")) is digits  # cached per process


def test_fmnist_loads_and_test_is_balanced(fmnist):
    assert fmnist.train_x.shape == (60000, 1, 28, 28) and fmnist.test_x.shape == (10000, 1, 28, 28)
    assert abs(float(fmnist.train_x.mean())) < 1e-3
    assert np.bincount(fmnist.test_y).tolist() == [1000] * 10


def test_fmnist_missing_root_names_data_root(tmp_path):
    for root in (tmp_path / "nope", tmp_path):  # missing directory, then missing files
        with pytest.raises(ConfigError) as err:
            load_fmnist(DataConfig(dataset="fmnist", root=str(root)))
        assert err.value.field_name == "data.root"


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def test_fmnist_reads_plain_and_gzipped_idx(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 255, (20, 28, 28)), gz=False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(20) % 10, gz=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 255, (10, 28, 28)), gz=True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(10), gz=False)
    splits = load_fmnist(DataConfig(dataset="fmnist", root=str(tmp_path)))
    assert splits.train_x.shape == (20, 1, 28, 28) and splits.test_y.tolist() == list(range(10))


def test_unknown_dataset_name():
    with pytest.raises(ConfigError) as err:
        load_dataset(DataConfig(dataset="nope"))
    assert err.value.field_name == "data.dataset"


def test_hf_conversion_grey_pil_and_rgb_arrays():
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    feats = datasets.Features({"picture": datasets.Image(), "y": datasets.ClassLabel(num_classes=3)})
    grey = [Image.fromarray(rng.integers(0, 255, (6, 5), dtype=np.uint8)) for _ in range(4)]
    train = datasets.Dataset.from_dict({"picture": grey, "y": [0, 1, 2, 1]}, features=feats)
    test = datasets.Dataset.from_dict({"picture": grey[:2], "y": [2, 0]}, features=feats)
    splits = splits_from_hf(train, test, "auto", "auto", "tiny")
    assert splits.train_x.shape == (4, 1, 6, 5) and splits.test_x.shape == (2, 1, 6, 5)
    assert splits.num_classes == 3 and splits.train_y.tolist() == [0, 1, 2, 1]
    assert splits.train_x.dtype == np.float32 and abs(float(splits.train_x.mean())) < 1e-5

    rgb = [rng.integers(0, 255, (4, 4, 3), dtype=np.uint8) for _ in range(3)]  # HWC, 4 x 4
    train = datasets.Dataset.from_dict({"image": rgb, "labels": [0, 4, 1]})  # no Image/ClassLabel types
    splits = splits_from_hf(train, train, "auto", "auto", "rgb")
    assert splits.input_shape == (3, 4, 4) and splits.num_classes == 5
    chw_images = [rng.integers(0, 255, (3, 4, 4)) for _ in range(2)]
    chw = datasets.Dataset.from_dict({"img": chw_images, "label": [0, 1]})
    assert splits_from_hf(chw, chw).input_shape == (3, 4, 4)
    with pytest.raises(ConfigError) as err:
        splits_from_hf(train, train, "pixels", "auto", "rgb")
    assert err.value.field_name == "data.hf_image_key"


# ---------------------------------------------------------------- long tail


def test_long_tail_counts_exact():
    assert long_tail_counts(np.array([100, 100, 100]), 10, "exp").tolist() == [100, 31, 10]
    # n_max is the smallest class, so every class can supply it
    assert long_tail_counts(np.array([150, 100, 120]), 10, "exp").tolist() == [100, 31, 10]
    assert long_tail_counts(np.array([100] * 4), 10, "step", 0.5).tolist() == [100, 100, 10, 10]
    assert long_tail_counts(np.array([100] * 4), 4, "step", 0.25).tolist() == [100, 100, 100, 25]
    assert long_tail_counts(np.array([150, 100, 120]), 1, "exp").tolist() == [150, 100, 120]
    fm = long_tail_counts(np.full(10, 6000), 20, "exp")
    assert fm[0] == 6000 and fm[-1] == 300 and fm.sum() == 20428  # FairFAL's FMNIST-LT size


def test_apply_long_tail(digits):
    y = digits.train_y
    kept = apply_long_tail(y, 10, "exp", 0.5, seed=0)
    expected = long_tail_counts(np.bincount(y), 10, "exp")
    assert np.bincount(y[kept], minlength=10).tolist() == expected.tolist()
    assert np.all(np.diff(kept) > 0)
    assert np.array_equal(kept, apply_long_tail(y, 10, "exp", 0.5, seed=0))
    assert not np.array_equal(kept, apply_long_tail(y, 10, "exp", 0.5, seed=1))
    assert np.array_equal(apply_long_tail(y, 1, "exp", 0.5, seed=0), np.arange(y.size))


# ---------------------------------------------------------------- partitions


@pytest.mark.parametrize("name", SCHEMES)
def test_partition_disjoint_complete_deterministic(digits, name):
    y = digits.train_y[apply_long_tail(digits.train_y, 5, "exp", 0.5, seed=0)]
    cfg = _cfg(name, alpha=0.5, classes_per_client=3)
    parts = partition_indices(y, 7, cfg, seed=3)
    assert len(parts) == 7
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(y.size))  # disjoint and complete
    assert all(np.all(np.diff(p) > 0) for p in parts)
    again = partition_indices(y, 7, cfg, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_indices(y, 7, cfg, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


@pytest.mark.parametrize("name", ["dirichlet", "inner_dirichlet", "dir_balance"])
def test_alpha_controls_skew(digits, name):
    assert _mean_tv(digits.train_y, name, 0.1) > _mean_tv(digits.train_y, name, 100.0) + 0.2


def test_iid_is_close_to_global(digits):
    assert _mean_tv(digits.train_y, "iid", 1.0) < 0.15


def test_shards_each_client_has_k_classes(digits):
    y = digits.train_y
    for k, clients in ((2, 10), (3, 4)):
        parts = partition_indices(y, clients, _cfg("shards", classes_per_client=k), seed=0)
        counts = client_class_counts(y, parts, 10)
        assert ((counts > 0).sum(axis=1) == k).all()
        assert (counts.sum(axis=0) > 0).all()  # every label has an owner, even with K < C
    with pytest.raises(ConfigError) as err:
        partition_indices(y, 3, _cfg("shards", classes_per_client=2), seed=0)
    assert err.value.field_name == "partition.classes_per_client"


def test_dir_balance_equal_sizes(fmnist):
    y = fmnist.train_y[apply_long_tail(fmnist.train_y, 20, "exp", 0.5, seed=0)]
    parts = partition_indices(y, 10, _cfg("dir_balance", alpha=0.1), seed=0)
    sizes = [len(p) for p in parts]
    assert sizes == [y.size // 10 + (i < y.size % 10) for i in range(10)]
    stats = partition_stats(client_class_counts(y, parts, 10))
    assert stats["mean_missing_classes"] > 1  # still non-IID after balancing


def test_quantity_sizes_vary(digits):
    y = digits.train_y
    sizes = np.array([len(p) for p in partition_indices(y, 10, _cfg("quantity", alpha=0.1), seed=0)])
    assert sizes.min() >= 1 and sizes.max() > 5 * sizes.min()
    even = np.array([len(p) for p in partition_indices(y, 10, _cfg("quantity", alpha=1e4), seed=0)])
    assert even.max() < 1.2 * even.min()


def test_dirichlet_partitioner_failure_is_config_error(digits):
    with pytest.raises(ConfigError) as err:
        partition_indices(digits.train_y, 10, _cfg("dirichlet", alpha=0.01, min_size=130), seed=0)
    assert err.value.field_name == "partition.alpha"


def test_more_clients_than_samples():
    with pytest.raises(ConfigError) as err:
        partition_indices(np.array([0, 1, 1]), 4, _cfg("iid"), seed=0)
    assert err.value.field_name == "federation.num_clients"
    assert "more clients (4) than training samples (3)" in str(err.value)


# ---------------------------------------------------------------- reports


def test_partition_stats_hand_case():
    counts = np.array([[3, 0, 1], [1, 2, 0], [0, 0, 0]])
    stats = partition_stats(counts)
    json.dumps(stats)  # JSON-serialisable
    assert stats["num_clients"] == 3 and stats["num_classes"] == 3 and stats["total"] == 7
    assert stats["global_counts"] == [4, 2, 1] and stats["global_imbalance_ratio"] == 4.0
    c0, c1, c2 = stats["clients"]
    assert c0["size"] == 4 and c0["imbalance_ratio"] == 3.0 and c0["missing_classes"] == [1]
    assert c0["distance_to_global"] == pytest.approx(2 / 7)
    assert c1["imbalance_ratio"] == 2.0 and c1["missing_count"] == 1
    assert c1["distance_to_global"] == pytest.approx(8 / 21)
    assert c2["size"] == 0 and c2["imbalance_ratio"] is None and c2["missing_count"] == 3
    assert stats["mean_client_imbalance_ratio"] == pytest.approx(2.5)
    assert stats["mean_missing_classes"] == pytest.approx(5 / 3)
    assert stats["mean_distance_to_global"] == pytest.approx(1 / 3)
    table = format_partition_table(stats)
    assert len(table.splitlines()) == 3 + 3 and "TV" in table.splitlines()[0]


def test_plot_written(tmp_path):
    path = tmp_path / "sub" / "partition.png"
    plot_partition(np.array([[3, 0, 1], [1, 2, 0]]), path, title="tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["partition.png"]  # no temp file left


def test_plot_of_many_clients_keeps_a_bounded_canvas(tmp_path):
    import struct

    from fedimb.data.report import MAX_PLOT_HEIGHT_IN

    path = tmp_path / "partition.png"
    plot_partition(np.ones((20_000, 10), dtype=np.int64), path)
    width, height = struct.unpack(">II", path.read_bytes()[16:24])  # the PNG's IHDR chunk
    assert height <= MAX_PLOT_HEIGHT_IN * 100 and width < 1000  # 100 dpi: not 0.35 in per client


# ---------------------------------------------------------------- end to end


def test_build_federated_data_digits(digits):
    cfg = ExperimentConfig(
        seed=1, data=DataConfig(dataset="digits"), imbalance=ImbalanceConfig(factor=5),
        partition=_cfg("dir_balance", alpha=0.3), federation=FederationConfig(num_clients=5),
    )
    fed = build_federated_data(cfg)
    assert fed.splits is digits  # the test set is untouched
    assert np.array_equal(np.sort(np.concatenate(fed.client_indices)), fed.train_indices)
    assert fed.counts.shape == (5, 10) and fed.counts.sum() == fed.train_indices.size
    for k, idx in enumerate(fed.client_indices):
        assert np.bincount(digits.train_y[idx], minlength=10).tolist() == fed.counts[k].tolist()
    assert build_federated_data(cfg) is fed  # cached on the config's values


def test_copies_let_more_clients_than_samples_split_every_sample_k_times(digits):
    cfg = ExperimentConfig(data=DataConfig(dataset="digits"), partition=_cfg("iid", copies=3),
                           federation=FederationConfig(num_clients=4000))  # digits' training set has < 1,800
    fed = build_federated_data(cfg)
    assert fed.train_indices.size == 3 * digits.train_y.size
    assert np.bincount(fed.train_indices).tolist() == [3] * digits.train_y.size  # each sample three times
    assert np.array_equal(np.sort(np.concatenate(fed.client_indices)), fed.train_indices)
    assert min(len(idx) for idx in fed.client_indices) >= 1


def test_build_federated_data_fmnist_lt():
    cfg = ExperimentConfig(
        imbalance=ImbalanceConfig(factor=20), partition=_cfg("dir_balance", alpha=0.1),
        federation=FederationConfig(num_clients=10),
    )
    fed = build_federated_data(cfg)
    assert fed.counts.sum(axis=0).tolist() == [6000, 4301, 3083, 2210, 1584, 1135, 814, 583, 418, 300]
    assert np.bincount(fed.splits.test_y).tolist() == [1000] * 10


def test_validation_hold_out_is_stratified_and_disjoint_from_clients():
    from fedimb.config import load_config
    from fedimb.data import build_federated_data

    cfg = load_config(None, ["data.dataset=digits", "data.validation_fraction=0.2", "eval.split=validation",
                             "federation.num_clients=4", "imbalance.factor=5"])
    data = build_federated_data(cfg)
    clients = np.concatenate(data.client_indices)
    assert len(np.intersect1d(clients, data.validation_indices)) == 0
    full = build_federated_data(load_config(None, ["data.dataset=digits", "federation.num_clients=4",
                                                   "imbalance.factor=5"]))
    assert len(clients) + len(data.validation_indices) == len(np.concatenate(full.client_indices))
    held = np.bincount(data.splits.train_y[data.validation_indices], minlength=10)
    kept = np.bincount(data.splits.train_y[full.train_indices], minlength=10)
    np.testing.assert_allclose(held, np.maximum(1, np.round(0.2 * kept)))


def test_unit_scaling_matches_to_tensor_and_standard_is_centred():
    from fedimb.config import DataConfig
    from fedimb.data import load_dataset

    unit = load_dataset(DataConfig(dataset="digits", scaling="unit"))
    assert unit.train_x.min() == 0.0 and unit.train_x.max() == 1.0  # digits' pixels are 0..16
    standard = load_dataset(DataConfig(dataset="digits"))
    assert abs(float(standard.train_x.mean())) < 1e-4
    np.testing.assert_allclose(unit.train_x * 16.0, np.round(unit.train_x * 16.0), atol=1e-5)


def test_a_client_whose_test_shares_round_to_nothing_still_gets_a_test_sample():
    from fedimb.data.local_testset import local_test_indices

    test_labels = np.array([0, 0, 1, 1, 2, 2])
    # one test sample per client (6 // 10 → 1); shares 2/7, 2/7, 3/7 all round to 0: its most frequent class
    idx = local_test_indices(test_labels, np.array([2, 2, 3]), num_clients=10, seed=0, client_id=4)
    assert idx.size == 1 and test_labels[idx[0]] == 2
    # shares that do round up keep their proportional draw
    assert test_labels[local_test_indices(test_labels, np.array([1, 4, 1]), 10, 0, 4)].tolist() == [1]


def test_split_cache_reads_back_what_was_built_and_rebuilds_a_broken_file(tmp_path, monkeypatch):
    from fedimb.data import split_cache

    monkeypatch.setenv(split_cache.ENV, str(tmp_path))
    labels = np.array([0, 1, 1, 2, 2, 2])
    built = (np.arange(6), [np.array([0, 3]), np.array([], dtype=np.int64), np.array([1, 2, 4, 5])], np.zeros(0, np.int64))
    calls = []

    def build():
        calls.append(1)
        return built

    first = split_cache.cached_split({"seed": 0}, labels, build)
    again = split_cache.cached_split({"seed": 0}, labels, build)
    assert len(calls) == 1  # the second came from the file
    for a, b in ((first, again), (built, again)):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[2], b[2])
        assert [c.tolist() for c in a[1]] == [c.tolist() for c in b[1]]
    split_cache.cached_split({"seed": 1}, labels, build)  # another config
    split_cache.cached_split({"seed": 0}, labels[::-1].copy(), build)  # other labels (a changed dataset file)
    assert len(calls) == 3
    (path,) = [p for p in tmp_path.iterdir() if p.name.startswith(split_cache.split_key({"seed": 0}, labels))]
    path.write_bytes(b"cut off")
    assert [c.tolist() for c in split_cache.cached_split({"seed": 0}, labels, build)[1]] == [[0, 3], [], [1, 2, 4, 5]]
    assert len(calls) == 4
    monkeypatch.setenv(split_cache.ENV, "off")
    split_cache.cached_split({"seed": 0}, labels, build)
    assert len(calls) == 5
