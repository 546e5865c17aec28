"""Failing and hostile clients in real federations (Flower's simulation engine on Ray, sklearn digits)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from fedimb.app.simulation import RunError, run_experiment
from fedimb.config import load_config
from tests.conftest import DIGITS_SMALL

pytestmark = pytest.mark.slow


def rows_of(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def metrics_of(run_dir: Path) -> list[dict[str, str]]:
    """Each row's metrics; wall time and traffic (a crashed client sends no weights) left out."""
    return [{k: v for k, v in row.items() if k != "wall_time_s" and not k.startswith("bytes_")}
            for row in rows_of(run_dir / "rounds.csv")]


@pytest.fixture(scope="module")
def crash_run(tmp_path_factory) -> Path:
    """Partition 1 crashes in every round; the rounds go on with the three others."""
    run_dir = tmp_path_factory.mktemp("runs") / "crash"
    run_experiment(load_config(None, DIGITS_SMALL + ["faults.clients=[1]", "faults.crash=1.0",
                                                     "federation.min_replies=3"]), run_dir)
    return run_dir


def test_a_client_crashing_every_round_is_recorded_and_the_run_finishes(crash_run):
    failures = rows_of(crash_run / "failures.csv")
    assert [(r["round"], r["partition"], r["phase"]) for r in failures] == [(str(n), "1", "train") for n in (1, 2, 3)]
    assert all(r["reason"] == f"injected fault: crash at round {r['round']}" for r in failures)
    rounds = rows_of(crash_run / "rounds.csv")
    assert [r["failures"] for r in rounds] == ["", "1", "1", "1"]
    assert float(rounds[-1]["accuracy"]) > float(rounds[0]["accuracy"]) + 0.4
    assert (crash_run / "summary.json").is_file()


def test_a_nan_client_is_never_averaged(crash_run, tmp_path):
    # the NaN client's update is rejected: the same federation as the one its crash leaves out
    nan_run = tmp_path / "nan"
    run_experiment(load_config(None, DIGITS_SMALL + ["faults.clients=[1]", "faults.nan=1.0",
                                                     "federation.min_replies=3"]), nan_run)
    assert metrics_of(nan_run) == metrics_of(crash_run)
    failures = rows_of(nan_run / "failures.csv")
    assert [r["partition"] for r in failures] == ["1", "1", "1"]
    assert all(re.fullmatch(r"rejected: weights: \S+ is not finite", r["reason"]) for r in failures)


def test_too_few_replies_fail_the_run_naming_the_client(tmp_path):
    cfg = load_config(None, DIGITS_SMALL + ["faults.clients=[2]", "faults.crash=1.0"])  # min_replies: all of them
    with pytest.raises(RunError, match=r"round 1 train: 3 valid replies of 4.*partition 2 \(node \d+\): "
                                       r"injected fault: crash at round 1"):
        run_experiment(cfg, tmp_path / "run")
    assert rows_of(tmp_path / "run" / "failures.csv")[0]["partition"] == "2"
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.serial
def test_a_straggler_past_the_round_timeout_is_dropped_and_recorded(tmp_path):
    cfg = load_config(None, DIGITS_SMALL + ["federation.rounds=2", "eval.client_every=0", "faults.clients=[3]",
                                            "faults.straggle=1.0", "faults.straggle_s=35", "federation.round_timeout=20",
                                            "federation.min_replies=3",
                                            # a client per Ray actor: the straggler's sleeping actor must not
                                            # hold up the others' next round on a busy machine
                                            "simulation.num_cpus=0.5"])
    run_experiment(cfg, tmp_path / "run")
    failures = rows_of(tmp_path / "run" / "failures.csv")
    assert [(r["round"], r["partition"], r["reason"]) for r in failures] == [
        (str(n), "3", "no reply before the round timeout") for n in (1, 2)]
    assert (tmp_path / "run" / "summary.json").is_file()
