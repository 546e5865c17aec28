"""Robust aggregation rules against hand-computed cases, on their own and composed with strategies."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from strategies.guard import RoundFailed
from tests.fakes import guard, make, reply


def weights_of(record: ArrayRecord) -> np.ndarray:
    return record["w"].numpy()


def aggregate(name: str, points: list[list[float]], start: list[float] | None = None, strategy: str = "fedavg",
              **robust):
    s, _ = make(strategy)
    guard(s, {"w": start or [0.0] * len(points[0])}, min_replies=1, robust={"name": name, **robust})
    out, _ = s.aggregate_train(1, [reply(101 + i, {"w": p}, 1) for i, p in enumerate(points)])
    return weights_of(out)


def test_median_of_three_hand_written_updates():
    np.testing.assert_allclose(aggregate("median", [[1.0, 5.0], [2.0, 0.0], [10.0, 3.0]]), [2.0, 3.0])


def test_trimmed_mean_cuts_each_end():
    np.testing.assert_allclose(aggregate("trimmed_mean", [[1.0], [2.0], [3.0], [100.0]], trim=0.25), [2.5])


# Krum with f = 1 scores each point by its n − f − 2 = 2 nearest squared distances:
# (0,0): 1 + 2 = 3; (1,0): 1 + 1 = 2; (0,2): 2 + 4 = 6; (10,10): 162 + 164; (1,1): 1 + 2 = 3.
KRUM_POINTS = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [10.0, 10.0], [1.0, 1.0]]


def test_krum_picks_the_hand_computed_update():
    np.testing.assert_allclose(aggregate("krum", KRUM_POINTS, byzantine=1), [1.0, 0.0])


def test_multikrum_averages_the_best_scored():
    # the three lowest scores: (1,0), (0,0), (1,1); equal weights
    np.testing.assert_allclose(aggregate("multikrum", KRUM_POINTS, byzantine=1, select=3), [2 / 3, 1 / 3], rtol=1e-6)


# Three short honest updates, a long honest one (a client with ten times the data) and a flipped one,
# from start 0, f = 1 (Multi-Krum keeps n − f = 4, scores over the 2 nearest squared distances):
# raw: (1,±.2): .04 + .16 = .20, (1,0): .08, (10,0): 81 + 81.04, (−1,0): 4 + 4.04 → drops the long one;
# unit updates: (1,±.2)/1.0198: .0388 + .0388, (1,0) and (10,0) both (1,0): 0 + .0388, (−1,0): 3.96 + 3.96
# → drops the flipped one; the kept replies are averaged as sent.
NON_IID_POINTS = [[1.0, 0.2], [1.0, -0.2], [1.0, 0.0], [10.0, 0.0], [-1.0, 0.0]]


def test_multikrum_on_directions_keeps_a_long_honest_update_and_drops_the_flipped_one():
    np.testing.assert_allclose(aggregate("multikrum", NON_IID_POINTS, byzantine=1), [0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(aggregate("multikrum", NON_IID_POINTS, byzantine=1, directions=True), [3.25, 0.0],
                               atol=1e-6)


# NON_IID_POINTS with an honest update at right angles to most, (0.2, 1): unit updates a (.9806, .1961),
# b (.9806, −.1961), c = d (1, 0), e (.1961, .9806), g (−1, 0); coordinate-wise median (.9806, 0), so the
# cosines are .98, .98, 1, 1, .20 and −1: only g is dropped, and the mean of the rest as sent is
# ((1 + 1 + 1 + 10 + .2) / 5, (.2 − .2 + 1) / 5) = (2.64, .2). Multi-Krum on directions keeping four
# (f = 1) leaves out e as well: its 3 nearest squared distances 1.23 + 1.61 + 2.0 are the second highest.
SIDEWAYS_POINTS = [*NON_IID_POINTS[:4], [0.2, 1.0], NON_IID_POINTS[4]]


def test_cosine_drops_only_the_update_against_the_median_direction():
    np.testing.assert_allclose(aggregate("cosine", SIDEWAYS_POINTS), [2.64, 0.2], atol=1e-6)
    np.testing.assert_allclose(aggregate("multikrum", SIDEWAYS_POINTS, byzantine=1, select=4, directions=True),
                               [3.25, 0.0], atol=1e-6)


def test_cosine_threshold_and_its_drops():
    s, _ = make("fedavg")
    guard(s, {"w": [0.0, 0.0]}, min_replies=1, robust={"name": "cosine", "min_cosine": 0.5})
    out, _ = s.aggregate_train(2, [reply(101 + i, {"w": p}, 1) for i, p in enumerate(SIDEWAYS_POINTS[:4])])
    # over a, b, c and d the median direction is (.9903, 0) (x: the mean of .9806 and 1): cosines .98, .98, 1, 1
    np.testing.assert_allclose(weights_of(out), [3.25, 0.0], atol=1e-6)
    s, _ = make("fedavg")
    guard(s, {"w": [0.0, 0.0]}, min_replies=1, robust={"name": "cosine", "min_cosine": 0.99})
    s.aggregate_train(2, [reply(101 + i, {"w": p}, 1) for i, p in enumerate(SIDEWAYS_POINTS[:4])])
    assert [(f.node, f.partition, f.reason) for f in s.guard.dropped.failures] == [
        (101, 0, "dropped by cosine"), (102, 1, "dropped by cosine")]


def test_the_replies_a_selection_rule_drops_are_recorded_with_their_partitions():
    s, _ = make("fedavg")
    guard(s, {"w": [0.0, 0.0]}, min_replies=1, robust={"name": "multikrum", "byzantine": 1, "select": 3})
    s.aggregate_train(4, [reply(101 + i, {"w": p}, 1) for i, p in enumerate(KRUM_POINTS)])
    # scores above: (0,2) and (10,10), nodes 103 and 104 = partitions 2 and 3, are left out
    dropped = s.guard.dropped.failures
    assert [(f.round, f.node, f.partition, f.reason) for f in dropped] == [
        (4, 103, 2, "dropped by multikrum"), (4, 104, 3, "dropped by multikrum")]
    assert s.guard.log.failures == []  # a dropped reply is not a failure


def test_bulyan_drops_the_outlier_and_averages_around_the_median():
    # f = 1, n = 7: multikrum keeps θ = 5 (scores 0:30 1:15 2:10 3:15 4:18 6:54 100:huge → 0..4);
    # then the β = 3 values closest to their median 2 (1, 2, 3) are averaged
    points = [[0.0], [1.0], [2.0], [3.0], [4.0], [6.0], [100.0]]
    np.testing.assert_allclose(aggregate("bulyan", points, byzantine=1), [2.0])


def test_clip_bounds_each_update_norm():
    # (3,4) has norm 5 → (0.6, 0.8); (0.3, 0.4) is inside the bound; mean (0.45, 0.6)
    np.testing.assert_allclose(aggregate("clip", [[3.0, 4.0], [0.3, 0.4]], max_norm=1.0), [0.45, 0.6], rtol=1e-6)
    # no bound given: the median update norm, here 5 of (5, 5, 50)
    np.testing.assert_allclose(aggregate("clip", [[3.0, 4.0], [4.0, 3.0], [30.0, 40.0]]), [10 / 3, 11 / 3], rtol=1e-6)


def test_clip_works_on_updates_not_weights():
    np.testing.assert_allclose(aggregate("clip", [[13.0, 14.0], [10.3, 10.4]], start=[10.0, 10.0], max_norm=1.0),
                               [10.45, 10.6], rtol=1e-6)


def test_too_few_replies_for_the_rule_fail_the_round():
    with pytest.raises(RoundFailed, match="bulyan with byzantine=1 needs at least 7 valid replies, got 3"):
        aggregate("bulyan", [[0.0], [1.0], [2.0]], byzantine=1)


def test_a_robust_rule_composes_with_server_momentum():
    # FedAvgM over the median: start 1, median 3 → pseudo-gradient −2, lr 1 → 3 (as FedAvgM of an average of 3)
    s, _ = make("fedavgm", server_lr=1.0, server_momentum=0.5)
    s.current_arrays = ArrayRecord({"w": Array(np.array([1.0], dtype=np.float32))})
    guard(s, {"w": [1.0]}, min_replies=1, robust={"name": "median"})
    out, _ = s.aggregate_train(1, [reply(101, {"w": [3.0]}, 1), reply(102, {"w": [2.0]}, 5), reply(103, {"w": [90.0]}, 1)])
    np.testing.assert_allclose(weights_of(out), [3.0])


def test_median_also_makes_scaffolds_control_step_robust():
    s, _ = make("scaffold")
    guard(s, {"w": [0.0]}, min_replies=1, robust={"name": "median"})
    replies = []
    for i, (w, delta) in enumerate([(1.0, 1.0), (2.0, 2.0), (50.0, 90.0)]):
        r = reply(101 + i, {"w": [w]}, 1)
        r.content["control-delta"] = ArrayRecord({"w": Array(np.array([delta], dtype=np.float32))})
        replies.append(r)
    out, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(weights_of(out), [2.0])
    np.testing.assert_allclose(s.control["w"], [3 * 2.0 / 4])  # every Δc_i is the median 2; c = Σ / N


def prototype_reply(node: int, value: float, hostile: bool):
    """A cafedcl reply: head weights all ``value``; prototypes the unit vectors, negated when ``hostile``."""
    r = reply(node, {"head.weight": [[value, value], [value, value]]}, 1, confidence=1.0)
    protos = [[-1.0, 0.0], [0.0, -1.0]] if hostile else [[1.0, 0.0], [0.0, 1.0]]
    r.content["proto-stats"] = ArrayRecord({
        "protos": Array(np.array(protos, dtype=np.float32)), "counts": Array(np.ones(2, dtype=np.float32)),
        "dispersion": Array(np.ones(2, dtype=np.float32)), "uncertainty": Array(np.zeros(2, dtype=np.float32)),
        "synthetic": Array(np.zeros(2, dtype=np.float32)), "quality": Array(np.ones(2, dtype=np.float32))})
    return r


def test_krum_drops_a_rejected_clients_prototypes_with_its_weights():
    s, _ = make("cafedcl", ema=0.0)
    start = {"head.weight": [[0.0, 0.0]] * 2}
    guard(s, start, min_replies=1, robust={"name": "krum", "byzantine": 1})
    points = [0.0, 1.0, 2.0, 3.0, 40.0]  # Krum with f = 1 picks 1.0 or 2.0: never the 40
    replies = [prototype_reply(101 + i, v, hostile=v == 40.0) for i, v in enumerate(points)]
    out, _ = s.aggregate_train(1, replies)
    assert out["head.weight"].numpy()[0, 0] in (1.0, 2.0)
    np.testing.assert_allclose(s.prototypes, [[1.0, 0.0], [0.0, 1.0]])


def test_cosine_drops_a_flipped_clients_prototypes_with_its_weights():
    s, _ = make("cafedcl", ema=0.0)
    guard(s, {"head.weight": [[0.0, 0.0]] * 2}, min_replies=1, robust={"name": "cosine"})
    # the last points against the others' median
    replies = [prototype_reply(101 + i, v, hostile=v < 0) for i, v in enumerate([1.0, 2.0, 3.0, 4.0, -40.0])]
    out, _ = s.aggregate_train(1, replies)
    assert out["head.weight"].numpy()[0, 0] == pytest.approx(2.5)  # (1 + 2 + 3 + 4) / 4
    np.testing.assert_allclose(s.prototypes, [[1.0, 0.0], [0.0, 1.0]])


def test_exclude_after_leaves_out_a_client_dropped_in_most_rounds_and_keeps_the_rest():
    s, _ = make("fedavg")
    guard(s, {"w": [0.0, 0.0]}, min_replies=1,
          robust={"name": "multikrum", "byzantine": 1, "directions": True, "exclude_after": 2})
    honest = [[1.0, 0.2], [1.0, -0.2], [1.0, 0.0], [10.0, 0.0]]
    for rnd in (1, 2):  # Multi-Krum with f = 1 keeps 4 of 5 and drops the flipped node 105 (NON_IID_POINTS)
        out, _ = s.aggregate_train(rnd, [reply(101 + i, {"w": p}, 1) for i, p in enumerate(NON_IID_POINTS)])
        np.testing.assert_allclose(weights_of(out), [3.25, 0.0], atol=1e-6)
    assert s.guard.history == {"partition 0": [2, 0], "partition 1": [2, 0], "partition 2": [2, 0],
                               "partition 3": [2, 0], "node 105": [2, 2]}
    # round 3: node 105 is left out unscored; f − 1 = 0, so all the others are kept, the sideways node 106
    # (0.2, 1) too, which Multi-Krum with f = 1 would have dropped (test above): mean of the five as sent
    replies = [reply(101 + i, {"w": p}, 1) for i, p in enumerate([*honest, [-1.0, 0.0], [0.2, 1.0]])]
    out, _ = s.aggregate_train(3, replies)
    np.testing.assert_allclose(weights_of(out), [2.64, 0.2], atol=1e-6)
    assert [(f.round, f.node, f.reason) for f in s.guard.dropped.failures if f.round == 3] == [
        (3, 105, "dropped by multikrum (left out: dropped in 2 of 2 rounds scored)")]
    state = s.state_dict()
    assert state["robust_history"]["node 105"] == [2, 2]
    fresh, _ = make("fedavg")
    guard(fresh, {"w": [0.0, 0.0]}, min_replies=1, robust={"name": "multikrum", "byzantine": 1, "exclude_after": 2})
    fresh.load_state_dict(state)  # a resumed run goes on leaving node 105 out
    assert fresh.guard.left_out("node 105") and not fresh.guard.left_out("partition 0")
