"""FedProto (Tan et al., AAAI 2022): prototypes only on the wire, a model per client, by hand and end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from clients.algorithms.base import ClientRound
from clients.algorithms.fedproto import (FedProtoClient, class_means, nearest_prototype_scores,
                                         prototype_distance_loss)
from fedimb.config import ConfigError, load_config
from fedimb.models import FeatureClassifier, build_model
from strategies import check_strategy_config
from strategies.fedproto import average_prototypes
from tests.conftest import DIGITS_SMALL
from tests.fakes import make, reply


def test_server_averages_prototypes_by_counts():
    protos = np.array([[[1.0, 0.0], [0.0, 0.0]], [[3.0, 2.0], [0.0, 4.0]]])  # K=2 clients, C=2, D=2
    counts = np.array([[1.0, 0.0], [3.0, 2.0]])
    c, has = average_prototypes(protos, counts)
    np.testing.assert_allclose(c, [[(1 * 1 + 3 * 3) / 4, (0 + 3 * 2) / 4], [0.0, 4.0]])
    assert has.tolist() == [True, True]
    _, has = average_prototypes(protos, np.array([[1.0, 0.0], [3.0, 0.0]]))
    assert has.tolist() == [True, False]


def test_client_terms_by_hand():
    features = torch.tensor([[1.0, 2.0], [0.0, 0.0], [5.0, 5.0]])
    targets = torch.tensor([0, 1, 2])
    protos = torch.tensor([[0.0, 0.0], [1.0, 1.0], [9.0, 9.0]])
    has = torch.tensor([True, True, False])
    # (1 + 4) + (1 + 1) + 0 (class 2 has no prototype), over 3 samples x 2 dims
    assert float(prototype_distance_loss(features, targets, protos, has)) == pytest.approx(7 / 6)
    means, counts = class_means(features, torch.tensor([0, 0, 2]), 3)
    assert counts.tolist() == [2.0, 0.0, 1.0]
    assert torch.allclose(means, torch.tensor([[0.5, 1.0], [0.0, 0.0], [5.0, 5.0]]))
    scores = nearest_prototype_scores(torch.tensor([[0.9, 0.9]]), protos, has)
    assert scores[0, :2].tolist() == pytest.approx([-1.62, -0.02]) and scores[0, 2] < -1e8
    assert int(scores.argmax()) == 1


def test_server_sends_no_weights_and_keeps_prototypes_of_absent_classes():
    strategy, spec = make("fedproto", lambda_proto=0.5)
    assert spec.client_algorithm == "fedproto" and not spec.global_model and spec.keeps_client_state

    def stats(protos, counts):
        r = reply(101, {}, sum(counts))
        r.content["arrays"] = ArrayRecord()
        r.content["proto-stats"] = ArrayRecord({"protos": Array(np.array(protos, dtype=np.float32)),
                                                "counts": Array(np.array(counts, dtype=np.float32))})
        return r

    out, _ = strategy.aggregate_train(1, [stats([[2.0, 0.0], [0.0, 2.0]], [1, 1]),
                                          stats([[4.0, 0.0], [0.0, 0.0]], [1, 0])])
    assert len(out) == 0  # no model on the server
    np.testing.assert_allclose(strategy.prototypes, [[3.0, 0.0], [0.0, 2.0]])
    strategy.aggregate_train(2, [stats([[1.0, 1.0], [0.0, 0.0]], [2, 0])])
    np.testing.assert_allclose(strategy.prototypes, [[1.0, 1.0], [0.0, 2.0]])  # class 1 kept from round 1


def test_client_keeps_its_own_model_and_replies_prototypes_only():
    cfg = load_config(None, DIGITS_SMALL + ["strategy.name=fedproto"])
    content = RecordDict({"config": ConfigRecord({"client-models": ["cnn4", "resnet8"]})})
    state = RecordDict()
    models = [FedProtoClient.own_model(cfg, content, state, (1, 8, 8), 3, pid) for pid in (0, 1)]
    assert [type(m.body[0]).__name__ for m in models] == ["Conv2d", "Conv2d"]
    assert sum(p.numel() for p in models[0].parameters()) != sum(p.numel() for p in models[1].parameters())
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2])
    rnd = ClientRound(models[0], {}, content, state, 0.1, 0.0, x, y, torch.bincount(y).float())
    client = FedProtoClient(rnd)
    out = RecordDict()
    client.finish(1, out, {})
    assert len(client.reply_arrays()) == 0
    assert out["proto-stats"]["protos"].numpy().shape == (3, 64) and "fedproto-model" in state
    again = FedProtoClient.own_model(cfg, content, state, (1, 8, 8), 3, 0)
    for a, b in zip(again.state_dict().values(), models[0].state_dict().values()):
        assert torch.equal(a, b)


def test_fedproto_refuses_active_learning_and_unknown_models():
    with pytest.raises(ConfigError, match="strategy.name"):
        check_strategy_config(load_config(None, DIGITS_SMALL + ["strategy.name=fedproto", "active_learning.enabled=true"]))
    with pytest.raises(ConfigError, match="strategy.params.models"):
        check_strategy_config(load_config(None, DIGITS_SMALL + ["strategy.name=fedproto", "strategy.params.models=[vgg]"]))


@pytest.mark.slow
def test_heterogeneous_clients_learn_with_prototypes_only_on_the_wire(tmp_path):
    from fedimb.app.simulation import run_experiment

    cfg = load_config(None, DIGITS_SMALL + ["strategy.name=fedproto", "strategy.params.models=[cnn4,resnet8]",
                                            "federation.num_clients=3", "federation.rounds=3", "partition.name=iid",
                                            "train.lr=0.05"])
    run_experiment(cfg, tmp_path / "run")
    with open(tmp_path / "run" / "rounds.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert float(rows[-1]["balanced_accuracy"]) > 0.5  # 10 classes: chance is 0.1
    smallest_model = min(sum(p.numel() * 4 for p in build_model(name, (1, 8, 8), 10).parameters())
                         for name in ("cnn4", "resnet8"))
    # 3 clients train and evaluate each round: prototypes (10 x 64 floats) and metrics, never a model
    assert all(0 < int(r["bytes_sent"]) + int(r["bytes_received"]) < smallest_model for r in rows if r["round"] != "0")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["evaluation"] == "federated"


def test_client_predicts_by_the_nearest_global_prototype_and_by_its_head_before_any():
    model = FeatureClassifier(torch.nn.Identity(), feature_dim=2, num_classes=3)
    x = torch.tensor([[0.9, 0.9], [5.0, 0.0]])
    head = FedProtoClient.evaluation_logits(model, x, RecordDict(), batch_size=1)
    assert torch.allclose(head, model.head(x).detach())
    content = RecordDict({"prototypes": ArrayRecord({
        "P": Array(np.array([[0.0, 0.0], [1.0, 1.0], [5.0, 0.0]], dtype=np.float32)),
        "has": Array(np.array([1.0, 1.0, 0.0], dtype=np.float32))})})
    scores = FedProtoClient.evaluation_logits(model, x, content, batch_size=1)
    assert scores.argmax(1).tolist() == [1, 1]  # class 2 is nearest to the second sample but has no prototype


def test_a_balanced_client_test_is_its_own_method_label_and_a_checked_choice():
    from fedimb.report import method_label

    assert method_label({"strategy": {"name": "fedproto"}, "eval": {"client_test": "balanced"}}, {}) == \
        "fedproto@balanced-test"
    assert method_label({"strategy": {"name": "fedproto"}, "eval": {"client_test": "local"}}, {}) == "fedproto"
    with pytest.raises(ConfigError, match="eval.client_test"):
        load_config(None, DIGITS_SMALL + ["eval.client_test=global"])


def test_a_balanced_client_test_is_the_whole_test_set():
    from clients.app import ClientSession, _local_test
    from fedimb.data import build_federated_data

    empty = torch.zeros(0)
    for client_test, whole in (("local", False), ("balanced", True)):
        cfg = load_config(None, DIGITS_SMALL + [f"eval.client_test={client_test}"])
        data = build_federated_data(cfg)
        session = ClientSession(cfg, 1, torch.device("cpu"), empty, empty, empty, 10, (1, 8, 8))
        _, y = _local_test(session)
        assert (len(y) == len(data.splits.test_y)) == whole
