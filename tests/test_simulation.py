"""Real federations: Flower's simulation engine on a real Ray runtime, on sklearn digits."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fedimb.app.process import OFFLINE_ENV
from fedimb.config import load_config
from fedimb.app.simulation import RunError, run_experiment
from fedimb.data import build_federated_data
from tests.conftest import DIGITS_SMALL

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
# the failure tests make every client fail with device=cuda, which works where CUDA does
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="device=cuda trains here instead of failing")


def rounds_of(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "rounds.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in rounds_of(run_dir)]


def process_settings() -> tuple:
    """What the runner changes process-wide for a run: its environment variables, the flwr
    logger and a blanket "ignore" warning filter (the filters libraries add on import are theirs)."""
    blanket = [f for f in warnings.filters if f[0] == "ignore" and f[1] is None and f[2] is Warning]
    return {k: os.environ.get(k) for k in OFFLINE_ENV}, logging.getLogger("flwr").level, blanket


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "fedavg"
    before = process_settings()
    run_experiment(load_config(None, DIGITS_SMALL), run_dir)
    (run_dir.parent / "settings_kept").write_text(str(process_settings() == before))
    return run_dir


def test_a_run_gives_back_the_process_settings(fedavg_run):
    assert (fedavg_run.parent / "settings_kept").read_text() == "True"


def test_accuracy_beats_round_zero_and_records_are_written(fedavg_run):
    rows = rounds_of(fedavg_run)
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    assert float(rows[-1]["accuracy"]) > float(rows[0]["accuracy"]) + 0.4
    for name in ("config.yaml", "partition.json", "rounds.csv", "summary.json", "curves.png", "partition.png"):
        assert (fedavg_run / name).is_file(), name
    summary = json.loads((fedavg_run / "summary.json").read_text())
    final = summary["final"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "tail_recall", "client_accuracy_std",
                "worst_client_accuracy"):
        assert 0.0 <= final[key] <= 1.0, key
    assert len(final["per_class_recall"]) == 10
    assert summary["seed"] == 0 and summary["versions"]["flwr"] == "1.42.0"
    partition = json.loads((fedavg_run / "partition.json").read_text())
    assert partition["total"] == 1347 and partition["num_clients"] == 4  # digits' training split
    assert not list(fedavg_run.glob("*.tmp*"))  # atomic writes leave nothing behind


def test_same_config_and_seed_give_identical_metrics(fedavg_run, tmp_path):
    again = tmp_path / "again"
    run_experiment(load_config(None, DIGITS_SMALL), again)
    assert metric_rows(again) == metric_rows(fedavg_run)
    assert (again / "partition.json").read_text() == (fedavg_run / "partition.json").read_text()


def test_a_simulation_asks_no_node_which_partition_it_holds(fedavg_run):
    # the server split the data, so it assigns the partitions: no hello message, nothing before round 1
    setup = json.loads((fedavg_run / "summary.json").read_text())["setup_bytes"]
    assert setup == {"bytes_sent": 0, "bytes_received": 0}
    data = build_federated_data(load_config(None, DIGITS_SMALL))
    reported = json.loads((fedavg_run / "partition.json").read_text())["clients"]
    assert [c["counts"] for c in reported] == data.counts.tolist()


# every strategy learns with each loss in tests/test_server_without_data.py; here, sampled
# clients on a long tail with a wider model, evaluated on the server's test set
@pytest.mark.parametrize("overrides", [
    ["strategy.name=fedavg", "federation.fraction=0.5", "train.loss.name=balanced_softmax",
     "imbalance.factor=10", "partition.name=dir_balance", "model.name=cnn4"],
], ids=["sampled-lt-cnn4"])
def test_each_strategy_learns(overrides, tmp_path):
    cfg = load_config(None, DIGITS_SMALL + ["federation.rounds=2", "eval.client_every=2"] + overrides)
    summary = run_experiment(cfg, tmp_path / "run")
    rows = rounds_of(tmp_path / "run")
    assert summary["final"]["accuracy"] > float(rows[0]["accuracy"]) + 0.2


def _ray_processes() -> int:
    """Ray's raylet and GCS processes started by this process (other jobs' Rays on the machine do not count)."""
    out = subprocess.run(["pgrep", "-c", "-P", str(os.getpid()), "-f", "raylet|gcs_server"],
                         capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


@needs_no_cuda
def test_failing_client_fails_the_run_cleanly(tmp_path):
    # device=cuda passes config checks (a Ray worker might have a GPU) but fails on every client here.
    before = _ray_processes()
    cfg = load_config(None, DIGITS_SMALL + ["simulation.device=cuda"])
    with pytest.raises(RunError, match="no GPU"):
        run_experiment(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "summary.json").exists()
    assert _ray_processes() <= before


@needs_no_cuda
def test_cli_run_exit_code_on_failure(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedimb.app.cli", "run", str(ROOT / "experiments/quickstart.yaml"),
                           *DIGITS_SMALL, "simulation.device=cuda", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1
    assert "no GPU" in proc.stderr and "Traceback" not in proc.stderr
