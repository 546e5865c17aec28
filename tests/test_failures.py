"""Failed and hostile clients at the aggregation: min_replies, validation, the norm rule, failures.csv."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict

from fedimb.failures import FailureLog, required_replies
from strategies.guard import RoundFailed
from tests.fakes import error_reply, guard, make, reply


def weights_of(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def with_record(message, key: str, arrays: dict[str, list]):
    message.content[key] = ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()})
    return message


START = {"w": [0.0, 0.0]}


def test_required_replies_count_or_fraction():
    assert required_replies(3, 10) == 3 and required_replies(3, 2) == 2
    assert required_replies(0.5, 10) == 5 and required_replies(0.5, 3) == 2 and required_replies(1.0, 4) == 4
    assert required_replies(0.01, 4) == 1


def test_a_round_goes_on_with_enough_valid_replies_and_records_the_failure():
    strategy, _ = make("fedavg")
    log = guard(strategy, START, asked=[101, 102, 103], min_replies=2)
    out, _ = strategy.aggregate_train(1, [reply(101, {"w": [1.0, 2.0]}, 10), error_reply(103, "disk full"),
                                          reply(102, {"w": [4.0, 8.0]}, 30)])
    np.testing.assert_allclose(weights_of(out)["w"], [3.25, 6.5])
    assert [(f.round, f.partition, f.phase, f.reason) for f in log.failures] == [(1, 2, "train", "disk full")]


def test_too_few_valid_replies_fail_naming_each_node_and_reason():
    strategy, _ = make("fedavg")
    guard(strategy, START, asked=[101, 102, 103, 104], min_replies=3)
    with pytest.raises(RoundFailed) as caught:
        strategy.aggregate_train(2, [reply(101, {"w": [1.0, 2.0]}, 10), error_reply(103, "disk full"),
                                     reply(102, {"w": [np.nan, 2.0]}, 10)])
    message = str(caught.value)
    assert "round 2 train: 1 valid replies of 4, federation.min_replies=3 needs 3" in message
    assert "partition 1 (node 102): rejected: weights: w is not finite" in message
    assert "partition 2 (node 103): disk full" in message
    assert "partition 3 (node 104): no reply before the round timeout" in message


def test_default_min_replies_needs_every_sampled_client():
    strategy, _ = make("fedavg")
    guard(strategy, START, asked=[101, 102])
    with pytest.raises(RoundFailed, match="needs 2"):
        strategy.aggregate_train(1, [reply(101, {"w": [1.0, 2.0]}, 10), error_reply(102, "boom")])


def test_a_nan_update_never_enters_the_average():
    honest = [reply(101, {"w": [1.0, 2.0]}, 10), reply(102, {"w": [4.0, 8.0]}, 30)]
    strategy, _ = make("fedavg")
    guard(strategy, START, min_replies=2)
    with_nan, _ = strategy.aggregate_train(1, [*honest, reply(103, {"w": [np.nan, 1e30]}, 1000)])
    clean, _ = make("fedavg")[0].aggregate_train(1, [reply(101, {"w": [1.0, 2.0]}, 10), reply(102, {"w": [4.0, 8.0]}, 30)])
    assert np.array_equal(weights_of(with_nan)["w"], weights_of(clean)["w"])


@pytest.mark.parametrize("make_bad, reason", [
    (lambda: reply(103, {"w": [1.0, 2.0, 3.0]}, 5), "weights: w has shape (3,), expected (2,)"),
    (lambda: reply(103, {"v": [1.0, 2.0]}, 5), "weights: keys differ (missing w; unexpected v)"),
    (lambda: reply(103, {"w": [np.inf, 2.0]}, 5), "weights: w is not finite"),
    (lambda: reply(103, {"w": [1.0, 2.0]}, 0), "metrics: num-examples must be one number > 0, got 0"),
    (lambda: reply(103, {"w": [1.0, 2.0]}, 5, train_loss=float("nan")), "metrics: train_loss is not finite"),
    (lambda: with_record(reply(103, {"w": [1.0, 2.0]}, 5), "control-delta", {"w": [1.0, 2.0]}),
     "unexpected record control-delta"),
], ids=["shape", "keys", "inf", "weight", "nan-metric", "extra-record"])
def test_each_malformed_update_is_rejected_with_its_reason(make_bad, reason):
    strategy, _ = make("fedavg")
    log = guard(strategy, START, min_replies=2)
    replies = [reply(101, {"w": [1.0, 2.0]}, 5), reply(102, {"w": [3.0, 4.0]}, 5), make_bad()]
    out, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(weights_of(out)["w"], [2.0, 3.0])
    assert [f.reason for f in log.failures] == [f"rejected: {reason}"]


def test_wrong_dtype_is_rejected():
    strategy, _ = make("fedavg")
    log = guard(strategy, START, min_replies=1)
    bad = reply(102, {"w": [1.0, 2.0]}, 5)
    bad.content["arrays"] = ArrayRecord({"w": Array(np.array([1, 2], dtype=np.int64))})
    strategy.aggregate_train(1, [reply(101, {"w": [1.0, 2.0]}, 5), bad])
    assert log.failures[0].reason == "rejected: weights: w has dtype int64, expected float32"


def test_float_weights_of_another_width_are_accepted():
    # FedAdam keeps float64 global weights (the round starts from them); the clients reply float32
    strategy, _ = make("fedavg")
    log = guard(strategy, {"w": [1.0, 2.0]}, min_replies=2)
    strategy.round_start = ArrayRecord({"w": Array(np.array([1.0, 2.0], dtype=np.float64))})
    strategy.aggregate_train(1, [reply(101, {"w": [1.0, 2.0]}, 5), reply(102, {"w": [2.0, 3.0]}, 5)])
    assert log.failures == []


def test_scaffold_control_variate_is_validated():
    strategy, _ = make("scaffold")
    log = guard(strategy, START, min_replies=1)
    good = with_record(reply(101, {"w": [1.0, 2.0]}, 5), "control-delta", {"w": [1.0, 1.0]})
    infinite = with_record(reply(102, {"w": [1.0, 2.0]}, 5), "control-delta", {"w": [np.inf, 1.0]})
    missing = reply(103, {"w": [1.0, 2.0]}, 5)
    strategy.aggregate_train(1, [good, infinite, missing])
    assert [f.reason for f in log.failures] == ["rejected: control-delta: w is not finite",
                                               "rejected: record control-delta: missing"]
    np.testing.assert_allclose(strategy.control["w"], [0.25, 0.25])  # only the good Δc: 1/4


def test_prototype_statistics_are_validated_against_the_head():
    strategy, _ = make("cafedcl")
    start = {"head.weight": np.zeros((3, 2)).tolist(), "head.bias": [0.0, 0.0, 0.0]}
    log = guard(strategy, start, min_replies=1)

    def proto_reply(node: int, protos) -> object:
        r = reply(node, start, 5, confidence=0.5)
        return with_record(r, "proto-stats", {"protos": protos, "counts": [1, 1, 1], "dispersion": [0.1] * 3,
                                              "uncertainty": [0.2] * 3, "synthetic": [0] * 3, "quality": [1] * 3})

    strategy.aggregate_train(1, [proto_reply(101, np.eye(3, 2).tolist()), proto_reply(102, np.ones((2, 2)).tolist()),
                                 proto_reply(103, [[np.nan, 0.0]] * 3)])
    assert [f.reason for f in log.failures] == ["rejected: proto-stats: protos has shape (2, 2), expected (3, 2)",
                                               "rejected: proto-stats: protos is not finite"]
    np.testing.assert_allclose(strategy.prototypes, np.eye(3, 2))  # partition 0's alone


def test_norm_rule_rejects_an_update_far_above_the_round_median():
    strategy, _ = make("fedavg")
    log = guard(strategy, START, min_replies=1, norm_factor=3.0)
    replies = [reply(101, {"w": [1.0, 0.0]}, 1), reply(102, {"w": [0.0, 1.0]}, 1), reply(103, {"w": [1.0, 1.0]}, 1),
               reply(104, {"w": [100.0, 0.0]}, 1)]
    out, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(weights_of(out)["w"], [2 / 3, 2 / 3], rtol=1e-6)
    assert log.failures[0].partition == 3 and log.failures[0].reason.startswith("rejected: update norm 100 > 3 x")


def test_evaluate_failures_are_recorded_too():
    strategy, _ = make("fedavg")
    log = guard(strategy, START, min_replies=1)
    strategy.asked = {"evaluate": [Message(RecordDict(), dst_node_id=n, message_type="evaluate") for n in (101, 102)]}
    strategy.aggregate_evaluate(1, [reply(101, {}, 5, accuracy=0.5, loss=1.0), error_reply(102, "left")])
    assert [(f.phase, f.partition, f.reason) for f in log.failures] == [("evaluate", 1, "left")]


def test_failure_log_writes_and_restores_failures_csv(tmp_path):
    counts: list[int] = []
    strategy, _ = make("fedavg")
    guard(strategy, START, asked=[101, 102], min_replies=1)
    strategy.guard.log = FailureLog(tmp_path, counts.append)
    strategy.aggregate_train(1, [reply(101, {"w": [1.0, 2.0]}, 5), error_reply(102, "crash, with a comma")])
    strategy.aggregate_train(2, [reply(101, {"w": [1.0, 2.0]}, 5), reply(102, {"w": [1.0, 2.0]}, 5)])
    strategy.aggregate_train(3, [reply(101, {"w": [1.0, 2.0]}, 5), error_reply(102, "again")])
    assert counts == [1, 0, 1]
    with open(tmp_path / "failures.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["round"], r["partition"], r["phase"], r["reason"]) for r in rows] == [
        ("1", "1", "train", "crash, with a comma"), ("3", "1", "train", "again")]
    resumed = FailureLog(tmp_path)
    resumed.restore(up_to_round=2)  # a run resumed after round 2 logs round 3 again
    assert [f.round for f in resumed.failures] == [1]
    assert (tmp_path / "failures.csv").read_text().count("\n") == 2


def test_a_phase_that_asked_nobody_is_no_failure():
    strategy, _ = make("fedavg")
    log = guard(strategy, START, min_replies=3)
    strategy.asked = {"evaluate": []}  # eval.client_every=0: no client evaluation this round
    assert strategy.aggregate_evaluate(1, []) is None
    assert log.failures == []


def test_an_error_the_superlink_writes_for_an_unreachable_node_names_that_node():
    from flwr.app import Error

    from strategies.base import attribute_errors

    sent = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (101, 102)]
    for i, message in enumerate(sent):
        message.metadata.__dict__["_message_id"] = f"id-{i}"  # what the grid sets when it sends
    error = Message(Error(code=5, reason="node unavailable"), reply_to=sent[1])
    error.metadata.__dict__["_src_node_id"] = 0  # the SuperLink's own id, not the site's
    assert [m.metadata.src_node_id for m in attribute_errors([error], sent)] == [102]


def test_a_round_without_client_evaluation_does_not_wait_for_the_last_ones():
    from flwr.app import ConfigRecord

    from tests.test_resume import FakeGrid

    strategy, _ = make("fedavg")
    log = guard(strategy, START, min_replies=1.0)
    strategy.client_eval_every, strategy.rounds = 2, 4
    asked = list(strategy.configure_evaluate(2, ArrayRecord(), ConfigRecord(), FakeGrid()))
    assert asked  # round 2 evaluates
    strategy.aggregate_evaluate(2, [reply(m.metadata.dst_node_id, {}, 5, accuracy=0.5, loss=1.0) for m in asked])
    assert list(strategy.configure_evaluate(3, ArrayRecord(), ConfigRecord(), FakeGrid())) == []
    strategy.aggregate_evaluate(3, [])  # round 3 asked nobody: no failure, nothing missing
    assert log.failures == []
