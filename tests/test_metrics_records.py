"""Metrics against scikit-learn, the run directory written by RunRecorder, and the report."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score

from fedimb.metrics import class_groups, classification_metrics, client_fairness, confusion
from fedimb.records import RunRecorder, atomic_write_json, load_run, package_versions
from fedimb.report import aggregate, collect_runs, find_run_dirs, results_markdown, write_report

C = 10


def _check_against_sklearn(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> None:
    m = classification_metrics(y_true, y_pred, num_classes)
    labels = list(range(num_classes))
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    with warnings.catch_warnings():
        # sklearn warns about classes that are predicted but absent from y_true; expected here.
        warnings.simplefilter("ignore")
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    f1 = f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0)
    assert m["macro_f1"] == pytest.approx(f1)
    recall = recall_score(y_true, y_pred, average=None, labels=labels, zero_division=0)
    assert m["per_class_recall"] == pytest.approx(list(recall))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn_random(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, C, size=500)
    # Mostly right with noise, so every metric is away from both 0 and 1.
    y_pred = np.where(rng.random(500) < 0.6, y_true, rng.integers(0, C, size=500))
    _check_against_sklearn(y_true, y_pred, C)


def test_metrics_match_sklearn_edge_cases() -> None:
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, C, size=300)
    y_pred = y_true.copy()
    y_pred[y_pred == 4] = 5  # class 4 never predicted
    y_pred[:20] = 7
    _check_against_sklearn(y_true, y_pred, C)
    # Class 2 absent from y_true but predicted; class 9 absent from both.
    y_true2 = np.where(np.isin(y_true, [2, 9]), 0, y_true)
    y_pred2 = y_pred.copy()
    y_pred2[y_pred2 == 9] = 1
    y_pred2[:5] = 2
    _check_against_sklearn(y_true2, y_pred2, C)
    m = classification_metrics(y_true2, y_pred2, C)
    assert m["per_class_recall"][2] == 0.0 and m["per_class_recall"][9] == 0.0


def test_confusion_hand_case() -> None:
    cm = confusion([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    with pytest.raises(ValueError):
        confusion([0, 3], [0, 1], 3)


def test_head_mid_tail_split() -> None:
    counts = np.array([5, 50, 10, 50, 1, 20, 30, 2, 40, 3])
    groups = class_groups(C, counts)
    # Descending count, ties (1 and 3 both 50) by class id; array_split -> 4 / 3 / 3.
    assert groups == {"head": [1, 3, 6, 8], "mid": [0, 2, 5], "tail": [4, 7, 9]}
    assert class_groups(C) == {"head": [0, 1, 2, 3], "mid": [4, 5, 6], "tail": [7, 8, 9]}
    # Recall 1 on head classes, 0.5 on mid, 0 on tail.
    y_true = np.repeat(np.arange(C), 2)
    y_pred = y_true.copy()
    for c in groups["mid"]:
        y_pred[2 * c] = (c + 1) % C
    for c in groups["tail"]:
        y_pred[2 * c : 2 * c + 2] = (c + 1) % C
    m = classification_metrics(y_true, y_pred, C, train_class_counts=counts)
    assert m["head_recall"] == pytest.approx(1.0)
    assert m["mid_recall"] == pytest.approx(0.5)
    assert m["tail_recall"] == pytest.approx(0.0)


def test_client_fairness_hand_case() -> None:
    f = client_fairness([0.5, 0.7, 0.9, 0.9])
    assert f["client_accuracy_mean"] == pytest.approx(0.75)
    assert f["client_accuracy_std"] == pytest.approx(math.sqrt((0.0625 + 0.0025 + 0.0225 * 2) / 4))
    assert f["worst_client_accuracy"] == 0.5 and f["best_client_accuracy"] == 0.9
    assert client_fairness([]) == {}


def _metrics(acc: float, with_client: bool = True) -> dict:
    m = {
        "accuracy": acc,
        "balanced_accuracy": acc - 0.01,
        "macro_f1": acc - 0.02,
        "tail_recall": acc - 0.1,
        "per_class_recall": [acc] * 3,
    }
    if with_client:
        m["client_accuracy_std"] = np.float32(0.05)
    return m


def _no_temp_files(run_dir: Path) -> bool:
    return not [p for p in run_dir.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_partition_json_is_indented_for_people_and_one_line_for_many_clients(tmp_path: Path) -> None:
    import json

    from fedimb.data import partition_stats
    from fedimb.records import INDENTED_CLIENTS_MAX

    rec = RunRecorder(tmp_path / "run")
    for clients, lines in ((3, "many"), (INDENTED_CLIENTS_MAX + 1, 1)):
        stats = partition_stats(np.ones((clients, 4), dtype=np.int64))
        text = rec.write_partition(stats).read_text()
        assert json.loads(text)["num_clients"] == clients
        assert (len(text.splitlines()) > 10) if lines == "many" else len(text.splitlines()) == 1


def test_run_recorder_writes_run_dir(tmp_path: Path) -> None:
    rec = RunRecorder(tmp_path / "run")
    rec.write_config("name: t\nseed: 3\nstrategy:\n  name: fedavg\n")
    rec.write_partition({"counts": np.array([[1, 2], [3, 4]]), "n": np.int64(10)})
    rec.log_round(1, {"accuracy": 0.5, "per_class_recall": [0.1, 0.2, 0.3]})
    rec.log_round(2, {**_metrics(0.8), "train_loss": 0.4})
    rec.log_round(3, _metrics(0.7, with_client=False))
    rec.write_summary({"seed": 3, "strategy": "fedavg", "versions": package_versions()})
    rec.plot_curves()
    run = rec.run_dir
    for name in ("config.yaml", "partition.json", "rounds.csv", "summary.json", "curves.png"):
        assert (run / name).is_file(), name
    assert _no_temp_files(run)
    assert json.loads((run / "partition.json").read_text()) == {"counts": [[1, 2], [3, 4]], "n": 10}

    with (run / "rounds.csv").open() as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames[:2] == ["round", "wall_time_s"]
    assert reader.fieldnames[2:] == [
        "accuracy", "balanced_accuracy", "client_accuracy_std", "macro_f1",
        "per_class_recall_0", "per_class_recall_1", "per_class_recall_2", "tail_recall", "train_loss",
    ]  # fmt: skip
    assert [r["round"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["macro_f1"] == "" and rows[2]["train_loss"] == ""
    assert float(rows[1]["per_class_recall_2"]) == 0.8

    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["accuracy"] == 0.7 and summary["final"]["per_class_recall"] == [0.7] * 3
    assert "client_accuracy_std" not in summary["final"]
    assert summary["best"] == {
        "accuracy": 0.8, "round": 2, "balanced_accuracy": pytest.approx(0.79),
        "macro_f1": pytest.approx(0.78), "tail_recall": pytest.approx(0.7),
    }  # fmt: skip
    assert summary["rounds"] == 3 and summary["seed"] == 3 and summary["wall_time_s"] >= 0
    assert set(summary["versions"]) >= {"python", "torch", "flwr", "numpy", "flwr_datasets"}

    loaded = load_run(run)
    assert loaded["config"]["strategy"]["name"] == "fedavg"
    assert loaded["rounds"][1]["accuracy"] == 0.8 and "macro_f1" not in loaded["rounds"][0]


def test_atomic_json_converts_numpy_and_nan(tmp_path: Path) -> None:
    path = atomic_write_json(tmp_path / "x.json", {"a": np.float64("nan"), "b": (np.int32(1), 2.5)})
    assert json.loads(path.read_text()) == {"a": None, "b": [1, 2.5]}
    assert _no_temp_files(tmp_path)


def _fake_run(root: Path, name: str, strategy: str, loss: str, alpha: float, seed: int, accs: list[float]) -> Path:
    rec = RunRecorder(root / name)
    rec.write_config(
        f"seed: {seed}\nimbalance:\n  factor: 20.0\npartition:\n  name: dirichlet\n  alpha: {alpha}\n"
        f"strategy:\n  name: {strategy}\ntrain:\n  loss:\n    name: {loss}\n"
    )
    for r, acc in enumerate(accs, start=1):
        rec.log_round(r, _metrics(acc))
    rec.write_summary({"seed": seed})
    return rec.run_dir


def test_report_mean_std(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed, final in enumerate([0.6, 0.7, 0.8]):
        _fake_run(runs, f"fedavg_s{seed}", "fedavg", "ce", 0.5, seed, [0.3, final])
    _fake_run(runs, "prox_s0", "fedprox", "focal", 0.5, 0, [0.2, 0.5])
    (runs / "broken").mkdir()
    (runs / "broken" / "config.yaml").write_text("seed: 9\n")

    found = find_run_dirs(runs)
    assert len(found) == 4
    warnings: list[str] = []
    rows = collect_runs(found + [runs / "broken"], warnings)
    assert len(rows) == 4 and len(warnings) == 1 and "broken" in warnings[0]
    assert {r["strategy"] for r in rows} == {"fedavg", "fedprox+focal"}
    assert {r["partition"] for r in rows} == {"dirichlet(0.5), LT rho=20"}

    groups = {g["method"]: g for g in aggregate(rows)}
    fedavg = groups["fedavg"]
    assert fedavg["n"] == 3 and sorted(fedavg["seeds"]) == [0, 1, 2]
    assert fedavg["accuracy_mean"] == pytest.approx(0.7)
    assert fedavg["accuracy_std"] == pytest.approx(np.std([0.6, 0.7, 0.8]))
    assert fedavg["best_accuracy_mean"] == pytest.approx(0.7)
    assert groups["fedprox+focal"]["accuracy_std"] == 0.0

    md_path = write_report(found, tmp_path / "report")
    md = md_path.read_text()
    std_pct = 100 * np.std([0.6, 0.7, 0.8])
    assert f"| fedavg | 70.00 ± {std_pct:.2f} (3) |" in md
    assert "| fedprox+focal | 50.00 ± 0.00 (1) |" in md
    assert "69.00 ± " in md  # balanced accuracy table
    assert "### tail_recall" in md and "### client_accuracy_std" in md
    with (tmp_path / "report" / "results.csv").open() as fh:
        csv_rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert float(csv_rows["fedavg"]["accuracy_mean"]) == pytest.approx(0.7)
    assert float(csv_rows["fedavg"]["accuracy_std"]) == pytest.approx(np.std([0.6, 0.7, 0.8]))
    assert csv_rows["fedavg"]["n"] == "3" and csv_rows["fedavg"]["seeds"] == "0;1;2"
    for name in ("comparison.png", "curves_compare.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert _no_temp_files(tmp_path / "report")
    assert "fedavg" in results_markdown(aggregate(rows), ["accuracy"])

    with pytest.raises(ValueError):
        write_report([runs / "broken"], tmp_path / "empty")


def test_report_last_rounds_window_averages_the_tail_of_the_run(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "runs", "osc_s0", "fedavg", "ce", 0.5, 0, [0.1, 0.9, 0.5, 0.7, 0.5, 0.9])
    (final_row,) = collect_runs([run])
    (window_row,) = collect_runs([run], last_rounds=3)
    assert final_row["accuracy"] == pytest.approx(0.9)
    assert window_row["accuracy"] == pytest.approx((0.7 + 0.5 + 0.9) / 3)
    from fedimb.report import last_rounds_mean

    sparse = [{"round": 1, "accuracy": 0.2, "client_accuracy_std": 0.5}, {"round": 2, "accuracy": 0.4},
              {"round": 3, "accuracy": 0.6, "client_accuracy_std": 0.3}]
    assert last_rounds_mean(sparse, "client_accuracy_std", 2) == pytest.approx(0.3)  # round 1 is outside
    assert last_rounds_mean(sparse, "accuracy", 2) == pytest.approx(0.5)
    assert math.isnan(last_rounds_mean(sparse, "macro_f1", 2))


def test_copied_run_records_give_the_same_report(tmp_path: Path) -> None:
    from fedimb.records import copy_run_records

    runs = [_fake_run(tmp_path / "runs", f"fedavg_s{seed}", "fedavg", "ce", 0.5, seed, [0.3, 0.5 + seed / 10])
            for seed in range(2)]
    (runs[0] / "checkpoint.pt").write_bytes(b"x" * 100)
    copies = copy_run_records(runs, tmp_path / "kept")
    assert [c.name for c in copies] == ["fedavg_s0", "fedavg_s1"]
    assert not (copies[0] / "checkpoint.pt").exists()
    assert collect_runs(find_run_dirs(tmp_path / "kept"), last_rounds=2) == [
        {**row, "run_dir": str(copy)} for row, copy in zip(collect_runs(runs, last_rounds=2), copies)]


def test_method_label_names_strategy_params_loss_and_synthetic():
    from fedimb.report import method_label

    config = {"strategy": {"name": "cafedcl", "params": {"tau": 0.1, "inference": "prototype"}},
              "train": {"loss": {"name": "balanced_softmax"}}, "synthetic": {"enabled": True}}
    assert method_label(config, {}) == "cafedcl(inference=prototype,tau=0.1)+balanced_softmax+synthetic"
    assert method_label({"strategy": {"name": "fedavg", "params": {}}}, {}) == "fedavg"
