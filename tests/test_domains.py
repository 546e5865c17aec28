"""Feature skew: the device transforms by hand, the domain split, NIID-Bench's noise, per-domain evaluation."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fedimb.app.observer import HeldOutTest, RoundObserver, evaluation_set
from fedimb.config import DOMAIN_TRANSFORM_NAMES, DomainsConfig, ExperimentConfig, load_config
from fedimb.data import build_federated_data, client_test_images, client_train_data, partition_stats
from fedimb.data.datasets import Normalisation
from fedimb.data.domains import (DOMAIN_TRANSFORMS, apply_domain, assign_domains, client_domains, domain_sizes,
                                 domain_test_sets, feature_skew_report, gamma_curve, gaussian_blur, invert,
                                 lower_contrast, noise_level, rotate, sensor_noise)
from fedimb.data.local_testset import local_test_indices
from fedimb.metrics import classification_metrics, confusion, domain_metrics, metrics_from_confusion
from fedimb.models import build_configured_model, get_weights
from fedimb.records import RunRecorder
from tests.conftest import DIGITS_SMALL, assert_quick_start_refused



def image(rows: list[list[float]]) -> np.ndarray:
    """One grey image (1, 1, H, W) from its rows."""
    return np.asarray(rows, dtype=np.float64)[None, None]


# ---------------------------------------------------------------- each transform by hand


def test_gamma_squares_pixels_and_keeps_black_and_white():
    out = gamma_curve(image([[0.0, 0.5], [1.0, 0.25]]), 2.0)
    np.testing.assert_allclose(out[0, 0], [[0.0, 0.25], [1.0, 0.0625]])


def test_contrast_pulls_each_image_towards_its_own_mean():
    # mean 0.5: 0 -> 0.5 + 0.5 * (0 - 0.5) = 0.25, 1 -> 0.75
    out = lower_contrast(image([[0.0, 1.0], [0.0, 1.0]]), 0.5)
    np.testing.assert_allclose(out[0, 0], [[0.25, 0.75], [0.25, 0.75]])
    two = np.concatenate([image([[0.2, 0.2], [0.2, 0.2]]), image([[0.0, 1.0], [1.0, 0.0]])])
    np.testing.assert_allclose(lower_contrast(two, 0.5)[0], two[0])  # a flat image has nothing to lower


def test_blur_spreads_a_dot_by_the_gaussian_kernel():
    dot = np.zeros((1, 1, 9, 9))
    dot[0, 0, 4, 4] = 1.0
    weights = np.exp(-np.arange(-4, 5) ** 2 / 2.0)  # sigma 1, scipy's radius 4 sigma
    w = weights / weights.sum()
    out = gaussian_blur(dot, 1.0)[0, 0]
    assert out[4, 4] == pytest.approx(w[4] * w[4])
    assert out[4, 5] == pytest.approx(w[4] * w[5])
    assert out[3, 5] == pytest.approx(w[5] * w[5])
    assert out.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(gaussian_blur(np.full((2, 3, 5, 5), 0.3), 1.5), 0.3)


def test_sensor_noise_is_seeded_clipped_and_of_its_std():
    grey = np.full((4, 1, 50, 50), 0.5)
    out = sensor_noise(grey, 0.1, np.random.default_rng(3))
    np.testing.assert_array_equal(out, sensor_noise(grey, 0.1, np.random.default_rng(3)))
    assert (out - 0.5).std() == pytest.approx(0.1, rel=0.03)
    clipped = sensor_noise(image([[0.0, 1.0]]), 5.0, np.random.default_rng(0))
    assert clipped.min() >= 0.0 and clipped.max() <= 1.0


def test_invert_and_rotate_by_hand():
    np.testing.assert_allclose(invert(image([[0.0, 0.25], [1.0, 0.5]]))[0, 0], [[1.0, 0.75], [0.0, 0.5]])
    square = image([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(rotate(square, 90)[0, 0], [[2.0, 4.0], [1.0, 3.0]])  # counter-clockwise
    np.testing.assert_array_equal(rotate(square, 360), square)
    np.testing.assert_array_equal(rotate(square, -90), rotate(square, 270))
    wide = np.arange(6, dtype=float).reshape(1, 1, 2, 3)
    assert rotate(wide, 90).shape == wide.shape  # a model input keeps its shape
    np.testing.assert_array_equal(rotate(wide, 180)[0, 0], [[5.0, 4.0, 3.0], [2.0, 1.0, 0.0]])
    # 45 degrees about the centre pixel: it stays, the corners fall outside and turn black
    three = image([[1.0, 1.0, 1.0], [1.0, 0.5, 1.0], [1.0, 1.0, 1.0]])
    turned = rotate(three, 45)[0, 0]
    assert turned[1, 1] == pytest.approx(0.5) and turned[0, 0] < 1.0


def test_every_configurable_domain_has_a_transform():
    assert tuple(DOMAIN_TRANSFORMS) == DOMAIN_TRANSFORM_NAMES


def test_apply_domain_works_on_model_inputs_in_either_scaling():
    raw = np.array([[[[0.0, 64.0], [128.0, 255.0]]]], dtype=np.float32)
    for scaling in ("standard", "unit"):
        norm = Normalisation.fit(raw, scaling)
        x = norm.apply(raw)
        inverted = apply_domain(x, "invert", DomainsConfig(), norm, np.random.default_rng(0))
        np.testing.assert_allclose(inverted, norm.apply(255.0 - raw), atol=1e-5)
        assert inverted.dtype == np.float32
        assert apply_domain(x, "clean", DomainsConfig(), norm, np.random.default_rng(0)) is x


# ---------------------------------------------------------------- who is in which domain


def test_domain_split_gives_exact_shares():
    assert domain_sizes(10, [0.7, 0.2, 0.1]).tolist() == [7, 2, 1]
    assert domain_sizes(3, [0.7, 0.2, 0.1]).tolist() == [2, 1, 0]  # largest remainders
    assert domain_sizes(7, [1 / 3] * 3).tolist() == [3, 2, 2]  # ties go to the earlier domain
    for k in range(1, 40):
        assert domain_sizes(k, [0.5, 0.3, 0.2]).sum() == k
    index = assign_domains(10, [0.7, 0.2, 0.1], seed=0)
    assert np.bincount(index).tolist() == [7, 2, 1]
    np.testing.assert_array_equal(index, assign_domains(10, [0.7, 0.2, 0.1], seed=0))
    assert any(not np.array_equal(index, assign_domains(10, [0.7, 0.2, 0.1], seed=s)) for s in range(1, 5))


def test_client_domains_from_the_config():
    cfg = load_config(None, ["federation.num_clients=10", "domains.names=[clean,blur,invert]",
                             "domains.shares=[0.7,0.2,0.1]", "seed=3"])
    names = client_domains(cfg)
    assert [names.count(n) for n in ("clean", "blur", "invert")] == [7, 2, 1]
    equal = load_config(None, ["federation.num_clients=6", "domains.names=[gamma,rotate,noise]"])
    assert sorted(client_domains(equal)) == ["gamma"] * 2 + ["noise"] * 2 + ["rotate"] * 2
    assert client_domains(load_config(None, [])) is None


# ---------------------------------------------------------------- NIID-Bench's noise-based feature imbalance


def digits(*overrides: str) -> ExperimentConfig:
    return load_config(None, [*DIGITS_SMALL, *overrides])


@pytest.mark.parametrize("scaling", ["unit", "standard"])
def test_noise_partition_gives_client_i_std_sigma_i_over_k_minus_1(scaling):
    cfg = digits("partition.name=iid", "partition.noise_sigma=0.3", f"data.scaling={scaling}")
    clean_cfg = digits("partition.name=iid", f"data.scaling={scaling}")
    data = build_federated_data(cfg)
    norm = data.splits.normalisation
    for pid in range(4):
        noisy, y = client_train_data(data, cfg, pid)
        clean, clean_y = client_train_data(data, clean_cfg, pid)
        np.testing.assert_array_equal(y, clean_y)  # same samples: the noise changes features only
        pixels = (noisy - clean) * (1.0 if scaling == "unit" else np.float32(norm.std[0] / norm.top))
        assert noise_level(pid, 4, 0.3) == pytest.approx(0.1 * pid)
        assert pixels.std() == pytest.approx(0.1 * pid, rel=0.03, abs=1e-7)
    np.testing.assert_array_equal(client_train_data(data, cfg, 2)[0], client_train_data(data, cfg, 2)[0])


def test_noise_level_follows_niid_bench_code():
    assert [noise_level(i, 5, 0.1) for i in range(5)] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
    assert noise_level(0, 1, 0.1) == 0.0


def test_client_images_compose_domain_and_noise_and_leave_plain_runs_alone():
    plain = digits()
    data = build_federated_data(plain)
    norm = data.splits.normalisation
    np.testing.assert_array_equal(client_train_data(data, plain, 1)[0], data.splits.train_x[data.client_indices[1]])
    cfg = digits("domains.names=[invert]", "partition.noise_sigma=0.2")  # every client inverted, then noisy
    assert [p.tolist() for p in build_federated_data(cfg).client_indices] == [p.tolist() for p in data.client_indices]
    for pid, level in ((0, 0.0), (3, 0.2)):
        inverted = apply_domain(data.splits.train_x[data.client_indices[pid]], "invert", cfg.domains, norm,
                                np.random.default_rng(0))
        residual = (client_train_data(data, cfg, pid)[0] - inverted) * np.float32(norm.std[0] / norm.top)
        assert residual.std() == pytest.approx(level, rel=0.05, abs=1e-5)
    # the local test split is seen through the same device
    idx = local_test_indices(data.splits.test_y, data.counts[2], 4, cfg.seed, 2)
    local = client_test_images(data, digits("domains.names=[invert]"), 2, idx)
    expected = apply_domain(data.splits.test_x[idx], "invert", cfg.domains, norm, np.random.default_rng(0))
    np.testing.assert_array_equal(local, expected)


def test_partition_report_names_each_clients_domain_and_noise():
    cfg = digits("domains.names=[clean,blur]", "domains.shares=[0.75,0.25]", "partition.noise_sigma=0.3")
    stats = feature_skew_report(partition_stats(build_federated_data(cfg).counts), cfg)
    assert stats["domains"] == {"clean": 3, "blur": 1}
    assert [c["domain"] for c in stats["clients"]] == client_domains(cfg)
    assert [c["noise_std"] for c in stats["clients"]] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    plain = partition_stats(build_federated_data(digits()).counts)
    assert feature_skew_report(json.loads(json.dumps(plain)), digits()) == plain


# ---------------------------------------------------------------- evaluation per domain


def test_domain_metrics_hand_case():
    perfect = np.diag([4, 4, 4])
    blurred = np.array([[4, 0, 0], [4, 0, 0], [0, 0, 4]])  # class 1 always called 0
    out = domain_metrics({"clean": perfect, "blur": blurred})
    assert out["balanced_accuracy_domain_clean"] == 1.0
    assert out["balanced_accuracy_domain_blur"] == pytest.approx(2 / 3)
    assert out["worst_domain_balanced_accuracy"] == pytest.approx(2 / 3)
    # pooled over both domains: recalls 8/8, 4/8, 8/8
    assert out["balanced_accuracy"] == pytest.approx(2.5 / 3) and out["accuracy"] == pytest.approx(20 / 24)
    assert out["per_class_recall"] == [1.0, 0.5, 1.0]
    assert out == {**metrics_from_confusion(perfect + blurred), "balanced_accuracy_domain_clean": 1.0,
                   "balanced_accuracy_domain_blur": out["balanced_accuracy_domain_blur"],
                   "worst_domain_balanced_accuracy": out["worst_domain_balanced_accuracy"]}


def observer_round(cfg: ExperimentConfig, run_dir: Path) -> tuple[dict, RoundObserver, torch.nn.Module]:
    """Round 0 of the central evaluation as the server wires it (no Ray): returns the row, the observer, the model."""
    data = build_federated_data(cfg)
    splits = data.splits
    domain_x = {n: torch.from_numpy(x) for n, x in domain_test_sets(splits.test_x, cfg, splits.normalisation).items()}
    observer = RoundObserver(cfg, RunRecorder(run_dir), torch.from_numpy(splits.test_x), splits.test_y,
                             train_counts=data.counts.sum(0), input_shape=splits.input_shape, rounds_per_stage=3,
                             domain_x=domain_x)
    model = build_configured_model(cfg, splits.input_shape, splits.num_classes, cfg.seed)
    observer.central_evaluate(0, ArrayRecord(get_weights(model)))
    return observer.recorder.rounds[-1], observer, model.eval()


def test_central_evaluation_scores_every_domain(tmp_path):
    cfg = digits("domains.names=[clean,invert,noise]", "domains.shares=[0.5,0.25,0.25]")
    row, observer, model = observer_round(cfg, tmp_path)
    splits = build_federated_data(cfg).splits
    matrices = {}
    for name, x in domain_test_sets(splits.test_x, cfg, splits.normalisation).items():
        with torch.no_grad():
            preds = model(torch.from_numpy(x)).argmax(1).numpy()
        expected = classification_metrics(splits.test_y, preds, 10)["balanced_accuracy"]
        assert row[f"balanced_accuracy_domain_{name}"] == pytest.approx(expected)
        matrices[name] = expected
    assert row["worst_domain_balanced_accuracy"] == pytest.approx(min(matrices.values()))
    assert row["balanced_accuracy_domain_clean"] != pytest.approx(row["balanced_accuracy_domain_invert"])
    with open(tmp_path / "rounds.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert {"balanced_accuracy_domain_clean", "balanced_accuracy_domain_invert", "balanced_accuracy_domain_noise",
            "worst_domain_balanced_accuracy"} <= set(header)
    observer.recorder.write_summary()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final"]["worst_domain_balanced_accuracy"] == pytest.approx(row["worst_domain_balanced_accuracy"])
    assert "worst_domain_balanced_accuracy" in summary["best"]
    assert observer.recorder.plot_curves().stat().st_size > 1000


def test_without_domains_nothing_changes(tmp_path):
    row, _, model = observer_round(digits(), tmp_path)
    assert not [k for k in row if "domain" in k]
    splits = build_federated_data(digits()).splits
    with torch.no_grad():
        preds = model(torch.from_numpy(splits.test_x)).argmax(1).numpy()
    expected = classification_metrics(splits.test_y, preds, 10)["balanced_accuracy"]
    assert row["balanced_accuracy"] == pytest.approx(expected)
    assert math.isfinite(row["accuracy"])


def test_a_validation_run_scores_the_test_set_once_after_its_last_round(tmp_path):
    cfg = digits("domains.names=[clean,invert]", "domains.shares=[0.5,0.5]", "eval.split=validation",
                 "data.validation_fraction=0.2", "federation.rounds=2")
    val_x, val_y, splits = evaluation_set(cfg)
    counts = build_federated_data(cfg).counts.sum(0)
    views = {n: torch.from_numpy(x) for n, x in domain_test_sets(val_x, cfg, splits.normalisation).items()}
    observer = RoundObserver(cfg, RunRecorder(tmp_path), torch.from_numpy(val_x), val_y, train_counts=counts,
                             input_shape=splits.input_shape, rounds_per_stage=2, domain_x=views,
                             held_out=HeldOutTest.of(cfg, splits))
    model = build_configured_model(cfg, splits.input_shape, splits.num_classes, cfg.seed).eval()
    arrays = ArrayRecord(get_weights(model))

    def scored(x: np.ndarray, y: np.ndarray) -> dict:
        with torch.no_grad():
            return domain_metrics({n: confusion(y, model(torch.from_numpy(v)).argmax(1).numpy(), 10)
                                   for n, v in domain_test_sets(x, cfg, splits.normalisation).items()}, counts)

    for server_round in (0, 1):
        observer.central_evaluate(server_round, arrays)
        assert observer.test_metrics == {}  # the test set is read after the last round only
    observer.central_evaluate(2, arrays)
    test, validation = scored(splits.test_x, splits.test_y), scored(val_x, val_y)
    assert observer.test_metrics.keys() == test.keys() and "worst_domain_balanced_accuracy" in test
    for key, value in test.items():
        assert observer.test_metrics[key] == pytest.approx(value)
    row = observer.recorder.rounds[-1]  # the rounds (what the closed loop reads) stay the validation split's
    assert row["worst_domain_balanced_accuracy"] == pytest.approx(validation["worst_domain_balanced_accuracy"])
    assert row["balanced_accuracy"] != pytest.approx(test["balanced_accuracy"])


def test_domain_test_sets_are_deterministic():
    cfg = digits("domains.names=[noise,blur]")
    splits = build_federated_data(cfg).splits
    first = domain_test_sets(splits.test_x, cfg, splits.normalisation)
    second = domain_test_sets(splits.test_x, cfg, splits.normalisation)
    assert list(first) == ["noise", "blur"]
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


# ---------------------------------------------------------------- bad config: one line, exit code 2


@pytest.mark.parametrize("args, field", [
    (["domains.names=[clean,xray]"], "domains.names"),
    (["domains.names=[blur,blur]"], "domains.names"),
    (["domains.shares=[0.5,0.5]"], "domains.shares"),
    (["domains.names=[clean,blur]", "domains.shares=[0.7,0.2,0.1]"], "domains.shares"),
    (["domains.names=[clean,blur]", "domains.shares=[0.7,0.7]"], "domains.shares"),
    (["domains.names=[clean,blur]", "domains.shares=[1.5,-0.5]"], "domains.shares"),
    (["domains.blur_sigma=0"], "domains.blur_sigma"),
    (["domains.gamma=-1"], "domains.gamma"),
    (["partition.noise_sigma=-0.1"], "partition.noise_sigma"),
])
def test_bad_domain_config_is_one_line_exit_2(args, field, tmp_path, capsys):
    assert_quick_start_refused(args, field, tmp_path / "run", capsys)


@pytest.mark.slow
def test_a_federation_with_domains_and_noise_records_every_domain(tmp_path):
    from fedimb.app.simulation import run_experiment

    cfg = digits("domains.names=[clean,invert]", "domains.shares=[0.75,0.25]", "partition.noise_sigma=0.1",
                 "federation.rounds=2")
    run_experiment(cfg, tmp_path / "run")
    with open(tmp_path / "run" / "rounds.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    for row in rows:
        per_domain = [float(row["balanced_accuracy_domain_clean"]), float(row["balanced_accuracy_domain_invert"])]
        assert float(row["worst_domain_balanced_accuracy"]) == pytest.approx(min(per_domain))
    assert float(rows[-1]["balanced_accuracy_domain_clean"]) > float(rows[0]["balanced_accuracy_domain_clean"]) + 0.2
    partition = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert partition["domains"] == {"clean": 3, "invert": 1}
    assert [c["domain"] for c in partition["clients"]] == client_domains(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "balanced_accuracy_domain_invert" in summary["final"]
