"""Federated evaluation: the clients' confusion matrices summed, with no test sample on the server."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict

from fedimb import protocol
from fedimb.app.observer import RoundObserver
from fedimb.config import load_config
from fedimb.metrics import classification_metrics, confusion, metrics_from_confusion
from fedimb.models import build_model
from fedimb.records import RunRecorder
from tests.conftest import DIGITS_SMALL


def _eval_reply(y_true: list[int], y_pred: list[int], num_classes: int) -> RecordDict:
    correct = sum(int(t == p) for t, p in zip(y_true, y_pred))
    return RecordDict({protocol.METRICS: MetricRecord({
        protocol.NUM_EXAMPLES: len(y_true), protocol.ACCURACY: correct / len(y_true),
        protocol.CONFUSION: [int(v) for v in confusion(y_true, y_pred, num_classes).ravel()]})})


def test_summed_confusion_matrices_give_the_pooled_metrics():
    a_true, a_pred = [0, 0, 1, 2], [0, 1, 1, 2]
    b_true, b_pred = [2, 2, 1], [2, 0, 1]
    pooled = metrics_from_confusion(confusion(a_true, a_pred, 3) + confusion(b_true, b_pred, 3))
    assert pooled == classification_metrics(a_true + b_true, a_pred + b_pred, 3)
    # by hand: recalls 1/2, 2/2, 2/3; 5 of 7 right
    assert pooled["accuracy"] == pytest.approx(5 / 7)
    assert pooled["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)


def test_observer_without_a_test_set_records_the_federated_metrics(tmp_path):
    cfg = load_config(None, DIGITS_SMALL)
    observer = RoundObserver(cfg, RunRecorder(tmp_path), None, None, train_counts=np.array([5, 3, 1]),
                             input_shape=(1, 8, 8), rounds_per_stage=3)
    assert observer.central_evaluate(0, None) is None  # nothing evaluated before the first client round
    observer.evaluate_metrics([_eval_reply([0, 0, 1, 2], [0, 1, 1, 2], 3), _eval_reply([2, 2, 1], [2, 0, 1], 3)],
                              protocol.NUM_EXAMPLES)
    observer.central_evaluate(1, None)
    row = observer.recorder.rounds[-1]
    assert row["round"] == 1 and row["accuracy"] == pytest.approx(5 / 7)
    assert row["client_accuracy_mean"] == pytest.approx((3 / 4 + 2 / 3) / 2)


def test_federated_evaluation_scores_every_domain_the_clients_name(tmp_path):
    from flwr.app import ConfigRecord

    def named(reply: RecordDict, domain: str) -> RecordDict:
        reply[protocol.CONFIG] = ConfigRecord({protocol.DOMAIN: domain})
        return reply

    cfg = load_config(None, DIGITS_SMALL)
    observer = RoundObserver(cfg, RunRecorder(tmp_path), None, None, train_counts=np.array([5, 3, 1]),
                             input_shape=(1, 8, 8), rounds_per_stage=3)
    observer.evaluate_metrics([named(_eval_reply([0, 0, 1, 2], [0, 1, 1, 2], 3), "scanner-b"),  # recalls 1/2, 1, 1
                               named(_eval_reply([2, 2, 1], [2, 0, 1], 3), "site_a"),  # recalls -, 1, 1/2
                               named(_eval_reply([0, 1], [0, 0], 3), "site_a")],  # with it: 1, 1/2, 1/2
                              protocol.NUM_EXAMPLES)
    observer.central_evaluate(1, None)
    row = observer.recorder.rounds[-1]
    assert row["balanced_accuracy_domain_scanner-b"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    assert row["balanced_accuracy_domain_site_a"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    assert row["worst_domain_balanced_accuracy"] == pytest.approx(2 / 3)
    assert row["accuracy"] == pytest.approx(6 / 9)  # the pooled metrics stay those of all the replies
    # a client that names none joins an "unnamed" domain when others do name theirs
    observer.evaluate_metrics([named(_eval_reply([0], [0], 3), "site_a"), _eval_reply([1], [0], 3)],
                              protocol.NUM_EXAMPLES)
    observer.central_evaluate(2, None)
    assert observer.recorder.rounds[-1]["worst_domain_balanced_accuracy"] == pytest.approx(0.0)
    assert "balanced_accuracy_domain_unnamed" in observer.recorder.rounds[-1]


@pytest.mark.slow
def test_simulation_records_central_and_federated_metrics_side_by_side(tmp_path):
    from fedimb.app.simulation import run_experiment

    run_dir = tmp_path / "run"
    run_experiment(load_config(None, DIGITS_SMALL + ["eval.federated=true"]), run_dir)
    with open(run_dir / "rounds.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    last = rows[-1]
    assert float(last["federated_accuracy"]) > 0.5 and float(last["accuracy"]) > 0.5
    assert float(last["worst_client_accuracy"]) <= float(last["federated_accuracy"]) <= float(
        last["best_client_accuracy"])  # pooled accuracy is a weighted mean of the clients'
    assert rows[0]["federated_accuracy"] == ""  # round 0: the server's own evaluation only
    # every round sends the model to 4 clients and gets 4 back: at least 8 models' bytes
    model_bytes = sum(p.numel() * 4 for p in build_model("mlp", (1, 8, 8), 10).parameters())
    assert all(int(r["bytes_sent"]) > 4 * model_bytes and int(r["bytes_received"]) > 4 * model_bytes
               for r in rows[1:])
    assert rows[0]["bytes_sent"] == "0"  # the hello round's bytes are the summary's setup_bytes
    assert json.loads((run_dir / "summary.json").read_text())["evaluation"] == "central and federated"


@pytest.mark.slow
def test_a_server_without_data_evaluates_federatedly(tmp_path):
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from fedimb.app import server

    cfg = load_config(None, DIGITS_SMALL + ["federation.rounds=2"])
    run_dir = tmp_path / "run"
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        server.run_federation(grid, cfg, run_dir, holds_dataset=False)

    loaded = []
    original = server.evaluation_set
    server.evaluation_set = lambda *a: loaded.append(a) or original(*a)
    try:
        run_simulation(server_app=app, client_app=client_app, num_supernodes=4,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    finally:
        server.evaluation_set = original
    assert loaded == []  # the server never loaded the dataset
    with open(run_dir / "rounds.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in rows] == [1, 2] and "federated_accuracy" not in rows[0]
    assert float(rows[-1]["balanced_accuracy"]) > 0.5
    assert json.loads((run_dir / "summary.json").read_text())["evaluation"] == "federated"


def test_metered_grid_counts_the_records_both_ways():
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message

    from fedimb.app.metering import MeteredGrid

    weights = ArrayRecord({"w": Array(np.zeros(250, dtype=np.float32))})  # 1,000 bytes of data

    class EchoGrid:
        pull_interval = 0.1  # as Flower's in-memory grid

        def push_messages(self, messages):
            self.replies = [Message(RecordDict({"arrays": m.content["arrays"]}), reply_to=m) for m in messages]
            return [m.metadata.message_id for m in messages]

        def pull_messages(self, ids):
            return self.replies

        def get_node_ids(self):
            return [1, 2]

    grid = MeteredGrid(EchoGrid())
    out = [Message(RecordDict({"arrays": weights, "config": ConfigRecord({"k": 1})}), dst_node_id=n,
                   message_type="train") for n in (1, 2)]
    grid.send_and_receive(out)
    one = weights.count_bytes()
    assert one >= 1000 and grid.get_node_ids() == [1, 2]
    counts = grid.take()
    assert counts["bytes_received"] == 2 * one and counts["bytes_sent"] > counts["bytes_received"]
    assert grid.take() == {"bytes_sent": 0, "bytes_received": 0}


def test_a_deployed_server_pulls_replies_until_all_are_in_or_the_timeout_passes():
    from flwr.app import ConfigRecord, Message

    from fedimb.app import metering

    class Reply:
        def __init__(self, reply_to: str, node: int) -> None:
            self.metadata = SimpleNamespace(reply_to_message_id=reply_to)
            self.content = RecordDict({"config": ConfigRecord({"n": node})})

        def has_error(self) -> bool:
            return False

    class SuperLinkGrid:
        """Replies trickle in: one per pull; node 3 never answers."""

        def __init__(self) -> None:
            self.pending: list[Message] = []
            self.pulls = 0

        def push_messages(self, messages):
            nodes = [m.metadata.dst_node_id for m in messages]  # the SuperLink names each message it stores
            self.pending = [Reply(f"m{n}", n) for n in nodes if n != 3]
            return [f"m{n}" for n in nodes]

        def pull_messages(self, ids):
            self.pulls += 1
            return [self.pending.pop(0)] if self.pending else []

    def messages(nodes):
        return [Message(RecordDict({"config": ConfigRecord({"k": 1})}), dst_node_id=n, message_type="train")
                for n in nodes]

    link = SuperLinkGrid()
    replies = metering.MeteredGrid(link).send_and_receive(messages([1, 2]))
    assert sorted(r.content["config"]["n"] for r in replies) == [1, 2] and link.pulls == 2
    started = time.time()
    replies = metering.MeteredGrid(link).send_and_receive(messages([1, 2, 3]), timeout=1.0)
    assert len(replies) == 2 and 1.0 <= time.time() - started < 1.0 + 2 * metering.REPLY_POLL_S
