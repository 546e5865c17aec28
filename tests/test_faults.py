"""Injected faults: who is hostile and when follows from (seed, round, partition); what each fault does."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedimb.config import ConfigError, load_config
from fedimb.faults import FaultPlan, InjectedFault, hostile_partitions
from fedimb.hostile import FaultsConfig
from strategies.guard import RoundFailed, refuse_faults_when_deployed


def record(values: list[float]) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.asarray(values, dtype=np.float32)), "steps": Array(np.array([3]))})


def plan(faults: FaultsConfig, server_round: int = 1, partition: int = 0) -> FaultPlan:
    return FaultPlan.for_round(faults, seed=7, num_clients=10, server_round=server_round, partition=partition)


def test_hostile_clients_are_the_listed_ones_or_a_seeded_fraction():
    assert hostile_partitions(FaultsConfig(clients=[3, 1]), 10, 0) == {1, 3}
    drawn = hostile_partitions(FaultsConfig(fraction=0.3), 10, seed=5)
    assert len(drawn) == 3 and drawn == hostile_partitions(FaultsConfig(fraction=0.3), 10, seed=5)
    assert any(hostile_partitions(FaultsConfig(fraction=0.3), 10, seed=s) != drawn for s in range(6, 12))
    assert hostile_partitions(FaultsConfig(), 10, 0) == frozenset()


def test_faults_per_round_are_deterministic_and_follow_the_rate():
    faults = FaultsConfig(clients=[0], crash=0.5, nan=1.0)
    rounds = [plan(faults, r).kinds for r in range(1, 41)]
    assert rounds == [plan(faults, r).kinds for r in range(1, 41)]  # the same draws every time
    crashes = sum("crash" in kinds for kinds in rounds)
    assert 10 < crashes < 30 and all("nan" in kinds for kinds in rounds)
    assert plan(faults, 3, partition=1).kinds == frozenset()  # an honest client
    assert plan(FaultsConfig(clients=[0], crash=0.0), 3).kinds == frozenset()


def test_crash_and_departure_raise_and_a_straggler_waits():
    with pytest.raises(InjectedFault, match="crash at round 2"):
        plan(FaultsConfig(clients=[0], crash=1.0), 2).before_training()
    gone = FaultsConfig(clients=[0], leave_round=3)
    plan(gone, 2).before_evaluation()  # still there
    with pytest.raises(InjectedFault, match="left the federation"):
        plan(gone, 3).before_evaluation()
    with pytest.raises(InjectedFault, match="left the federation"):
        plan(gone, 9).before_training()
    slow = plan(FaultsConfig(clients=[0], straggle=1.0, straggle_s=0.2))
    t0 = time.perf_counter()
    slow.before_training()
    assert time.perf_counter() - t0 >= 0.2


@pytest.mark.parametrize("kind, expected", [
    ("scale", [1.0 + 100 * 2.0, -2.0 + 100 * 1.0]),
    ("sign_flip", [1.0 - 2.0, -2.0 - 1.0]),
    ("nan", [np.nan, np.nan]),
    ("inf", [np.inf, np.inf]),
])
def test_corrupted_updates(kind, expected):
    start, trained = record([1.0, -2.0]), record([3.0, -1.0])
    out = plan(FaultsConfig(clients=[0], **{kind: 1.0})).corrupt(trained, start)
    np.testing.assert_allclose(out["w"].numpy(), expected)
    assert out["steps"].numpy().tolist() == [3]  # integer arrays are left alone


def test_wrong_shape_and_honest_replies():
    start, trained = record([1.0, -2.0]), record([3.0, -1.0])
    assert plan(FaultsConfig(clients=[0], wrong_shape=1.0)).corrupt(trained, start)["w"].shape == (1,)
    assert plan(FaultsConfig(clients=[1], nan=1.0)).corrupt(trained, start) is trained
    assert plan(FaultsConfig(clients=[0], label_flip=1.0)).flips_labels


def test_faults_config_is_checked():
    base = ["data.dataset=digits", "federation.num_clients=4"]
    for override, field in [("faults.crash=1.5", "faults.crash"), ("faults.clients=[4]", "faults.clients"),
                            ("faults.straggle_s=-1", "faults.straggle_s"), ("faults.bogus=1", "faults.bogus")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(None, base + [override])


def test_faults_are_refused_when_deployed():
    cfg = load_config(None, ["data.dataset=digits", "faults.clients=[0]", "faults.crash=1.0"])
    with pytest.raises(RoundFailed, match="simulation only"):
        refuse_faults_when_deployed(cfg)
    refuse_faults_when_deployed(load_config(None, ["data.dataset=digits", "faults.clients=[0]"]))  # nothing injected
