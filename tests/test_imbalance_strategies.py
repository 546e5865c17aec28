"""CAFedCL-style prototypes, FedProto and CLIMB against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from clients.algorithms.prototypes import class_statistics, geometric_consistency, prototype_infonce
from fedimb.config import ConfigError
from strategies.cafedcl import aggregate_prototypes, prototype_weights
from strategies.climb import ClimbParams, climb_weights, dual_update
from tests.fakes import make, reply


def test_cafedcl_weights_three_clients_by_hand():
    counts = np.array([[10.0, 0.0], [10.0, 5.0], [20.0, 5.0]])
    unc = np.array([[0.0, 0.0], [0.5, 0.2], [0.0, 0.2]])
    disp = np.array([[0.1, 0.0], [0.1, 0.4], [0.3, 0.1]])
    w = prototype_weights(counts, unc, disp, None, beta=2.0, eps=0.1, mode="confidence")
    raw0 = np.array([10 / 0.2, 10 * math.exp(-1.0) / 0.2, 20 / 0.4])
    np.testing.assert_allclose(w[:, 0], raw0 / raw0.sum())
    raw1 = np.array([0.0, 5 * math.exp(-0.4) / 0.5, 5 * math.exp(-0.4) / 0.2])
    np.testing.assert_allclose(w[:, 1], raw1 / raw1.sum())
    assert w[0, 1] == 0.0  # a client without the class never weighs in


def test_fedavg_proto_weights_are_counts():
    counts = np.array([[10.0, 0.0], [30.0, 5.0]])
    w = prototype_weights(counts, np.ones_like(counts), np.ones_like(counts), None, 2.0, 0.1, "count")
    np.testing.assert_allclose(w, [[0.25, 0.0], [0.75, 1.0]])


def test_aggregate_prototypes_normalises_and_marks_missing():
    protos = np.array([[[1.0, 0.0], [0.0, 0.0], [0, 0]], [[0.0, 1.0], [0.0, 2.0], [0, 0]]])
    weights = np.array([[0.5, 0.0, 0.0], [0.5, 1.0, 0.0]])
    p, has = aggregate_prototypes(protos, weights)
    np.testing.assert_allclose(p[0], [math.sqrt(0.5), math.sqrt(0.5)])
    np.testing.assert_allclose(p[1], [0.0, 1.0])
    assert has.tolist() == [True, True, False]


def test_class_statistics_by_hand():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0], [0.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    s = class_statistics(feats, logits, labels, 2)
    assert torch.allclose(s["protos"][0], torch.tensor([0.5, 0.5]))
    assert torch.allclose(s["protos"][1], torch.tensor([1.0, 0.0]))
    assert torch.allclose(s["counts"], torch.tensor([2.0, 1.0]))
    assert s["dispersion"][0] == pytest.approx(0.5) and s["dispersion"][1] == pytest.approx(0.0)
    assert s["uncertainty"][1] == pytest.approx(1.0)  # uniform softmax: entropy = log C
    assert s["uncertainty"][0] == pytest.approx(0.5, abs=1e-3)  # one uniform, one certain


def test_prototype_infonce_by_hand():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    has = torch.tensor([True, True, False])
    feats = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    targets = torch.tensor([0, 1, 2])  # the class-2 sample has no prototype: skipped
    loss = prototype_infonce(feats, targets, protos, has, tau=0.5)
    one = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert float(loss) == pytest.approx(one)


def test_geometric_consistency_zero_when_structure_matches():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    has = torch.tensor([True, True])
    feats = torch.tensor([[5.0, 0.0], [0.0, 2.0]])
    assert float(geometric_consistency(feats, torch.tensor([0, 1]), protos, has)) == pytest.approx(0.0)
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # local similarity 1 off the diagonal vs 0 globally: two entries of 1 over four
    assert float(geometric_consistency(feats, torch.tensor([0, 1]), protos, has)) == pytest.approx(0.5)


def stats_record(protos, counts, unc, disp, synthetic=None, quality=None) -> ArrayRecord:
    classes = len(counts)
    return ArrayRecord({"protos": torch.tensor(protos), "counts": torch.tensor(counts),
                        "uncertainty": torch.tensor(unc), "dispersion": torch.tensor(disp),
                        "synthetic": torch.tensor(synthetic or [0.0] * classes),
                        "quality": torch.tensor(quality or [1.0] * classes)})


def test_cafedcl_strategy_sends_prototypes_and_smooths():
    strategy, spec = make("cafedcl", ema=0.5)
    assert spec.client_algorithm == "prototypes"
    replies = []
    for nid, proto in ((101, [[1.0, 0.0], [0.0, 1.0]]), (102, [[1.0, 0.0], [0.0, 1.0]])):
        r = reply(nid, {"w": [1.0]}, 10, confidence=0.9)
        r.content["proto-stats"] = stats_record(proto, [5.0, 5.0], [0.1, 0.1], [0.1, 0.1])
        replies.append(r)
    strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(strategy.prototypes, [[1, 0], [0, 1]], atol=1e-6)
    r = reply(101, {"w": [1.0]}, 10, confidence=0.9)
    r.content["proto-stats"] = stats_record([[0.0, 1.0], [0.0, 1.0]], [5.0, 0.0], [0.1, 0.0], [0.1, 0.0])
    strategy.aggregate_train(2, [r])
    half = math.sqrt(0.5)
    np.testing.assert_allclose(strategy.prototypes[0], [half, half], atol=1e-6)  # EMA of old and new
    np.testing.assert_allclose(strategy.prototypes[1], [0, 1], atol=1e-6)  # kept: nobody sent class 1

    class Grid:
        def get_node_ids(self):
            return [101, 102, 103, 104]

    msgs = list(strategy.configure_train(3, ArrayRecord(), ConfigRecord(), Grid()))
    assert "prototypes" in msgs[0].content and float(msgs[0].content["config"]["proto-lambda"]) == 1.0


def test_prototype_inference_head_picks_the_nearest_prototype():
    """With inference=prototype the evaluated model's argmax is the cosine-nearest global prototype."""
    from fedimb.models import build_model, get_weights, set_weights

    model = build_model("mlp", (1, 8, 8), 3, seed=0)
    strategy, _ = make("cafedcl", inference="prototype", tau=0.5)
    arrays = ArrayRecord(get_weights(model))
    assert strategy.evaluation_arrays(arrays) is arrays  # no prototypes yet: the head as trained
    dim = model.head.in_features
    protos = np.zeros((3, dim))
    protos[0, 0], protos[1, 1] = 1.0, 1.0
    strategy.prototypes, strategy.has = protos, np.array([True, True, False])  # class 2: nobody holds it
    state = strategy.evaluation_arrays(arrays).to_torch_state_dict()
    np.testing.assert_allclose(state["head.weight"].numpy(), protos / 0.5)
    set_weights(model, state)
    z = torch.zeros((3, dim))
    z[0, 0], z[0, 1] = 5.0, 1.0  # long but mostly along P_0
    z[1, 0], z[1, 1] = 0.1, 0.3  # short, closer to P_1
    z[2, 2] = 1.0  # orthogonal to both: still never the absent class
    assert model.head(z).argmax(1).tolist() == [0, 1, 0]
    assert "head.weight" in arrays and not np.allclose(arrays.to_torch_state_dict()["head.weight"].numpy(),
                                                       protos / 0.5)  # training weights untouched
    with pytest.raises(ConfigError, match="inference"):
        make("cafedcl", inference="knn")


def test_prototype_params_are_checked():
    with pytest.raises(ConfigError, match="prototype_weighting"):
        make("cafedcl", prototype_weighting="entropy")


def test_climb_weights_and_dual_update_by_hand():
    # CLIMB's weights do not depend on sample counts: λ = (0, 0.4), mean 0.2 -> (0.8, 1.2) / 2
    np.testing.assert_allclose(climb_weights(np.array([0.0, 0.4]), 0.2), [0.4, 0.6])
    # a third client with λ = 0.6 sat the round out: mean λ = 1/3 -> (2/3, 16/15) / (26/15)
    np.testing.assert_allclose(climb_weights(np.array([0.0, 0.4]), 1.0 / 3.0), [10 / 26, 16 / 26])
    assert ClimbParams().lambda_max == 5.0  # the clamp of the paper's code
    new = dual_update(np.array([0.0, 0.5]), np.array([1.0, 3.0]), ClimbParams(eta=2.0, epsilon=0.0, lambda_max=1.0), 2)
    np.testing.assert_allclose(new, [0.0, 1.0])  # 0 + 2(-1)/2 → clipped at 0; 0.5 + 2(1)/2 → clipped at 1


def test_climb_strategy_moves_weight_to_the_worse_client():
    strategy, _ = make("climb", eta=2.0, epsilon=0.0)
    strategy.aggregate_train(1, [reply(101, {"w": [0.0]}, 1, **{"climb-loss": 1.0}),
                                 reply(102, {"w": [1.0]}, 1, **{"climb-loss": 2.0})])
    assert strategy.lambdas[1] > strategy.lambdas[0] == 0.0
    out, _ = strategy.aggregate_train(2, [reply(101, {"w": [0.0]}, 1, **{"climb-loss": 1.0}),
                                          reply(102, {"w": [1.0]}, 1, **{"climb-loss": 1.0})])
    assert out["w"].numpy()[0] > 0.5


def test_climb_averages_clients_alike_whatever_their_sample_counts():
    strategy, _ = make("climb", eta=2.0, epsilon=0.0)
    # λ = 0 for both: weights 1/2 each, where FedAvg's n_k/n would give 1/4 and 3/4
    out, _ = strategy.aggregate_train(1, [reply(101, {"w": [0.0]}, 1, **{"climb-loss": 1.0}),
                                          reply(102, {"w": [1.0]}, 3, **{"climb-loss": 1.0})])
    np.testing.assert_allclose(out["w"].numpy(), [0.5])


def test_synthetic_quality_and_recognition_by_hand():
    from clients.algorithms.prototypes import recognition, synthetic_quality

    # n = (4, 0, 0), s = (4, 2, 0), r = (0.5, 0.25, -): q = ((4 + 2) / 8, 0.25, 1)
    q = synthetic_quality(torch.tensor([4.0, 0.0, 0.0]), torch.tensor([4.0, 2.0, 0.0]), torch.tensor([0.5, 0.25, 0.0]))
    assert torch.allclose(q, torch.tensor([0.75, 0.25, 1.0]))
    model = torch.nn.Identity()  # the logits are the inputs
    x = torch.tensor([[0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0], [0.0, 0.0, 0.0]])
    # softmax rows (1/3, 1/3, 1/3), (3/5, 1/5, 1/5), (1/3, 1/3, 1/3); labels 0, 0, 1; nothing of class 2
    r = recognition(model, x, torch.tensor([0, 0, 1]), 3, batch_size=2)
    assert torch.allclose(r, torch.tensor([(1 / 3 + 3 / 5) / 2, 1 / 3, 0.0]))


def test_a_synthetic_only_class_weighs_less_than_the_same_class_held_for_real():
    from clients.algorithms.base import ClientRound
    from clients.algorithms.prototypes import PrototypeClient
    from fedimb.models import FeatureClassifier, get_weights

    torch.manual_seed(0)
    model = FeatureClassifier(torch.nn.Linear(4, 3), feature_dim=3, num_classes=2)
    x = torch.randn(6, 4)
    y = torch.tensor([0, 0, 0, 1, 1, 1])

    def stats(real_count: int) -> dict[str, np.ndarray]:
        rnd = ClientRound(model, get_weights(model), RecordDict(), RecordDict(), 0.1, 0.0, x, y,
                          torch.bincount(y[:real_count], minlength=2).float(), real_count=real_count)
        out = RecordDict()
        PrototypeClient(rnd).finish(steps=1, reply=out, metrics={})
        return {k: v.numpy() for k, v in out["proto-stats"].items()}

    held, topped = stats(real_count=6), stats(real_count=3)  # class 1 real on one client, synthetic on the other
    assert held["quality"].tolist() == [1.0, 1.0] and topped["quality"][0] == 1.0
    assert topped["counts"].tolist() == [3.0, 0.0] and topped["synthetic"].tolist() == [0.0, 3.0]
    assert 0 < topped["quality"][1] < 1
    np.testing.assert_allclose(held["protos"], topped["protos"])  # the same samples make the same prototype
    weights = prototype_weights(np.stack([h["counts"] + h["synthetic"] for h in (held, topped)]),
                                np.stack([held["uncertainty"], topped["uncertainty"]]),
                                np.stack([held["dispersion"], topped["dispersion"]]),
                                np.stack([held["quality"], topped["quality"]]), beta=2.0, eps=0.05, mode="confidence")
    assert weights[1, 1] < weights[0, 1]
    assert weights[1, 1] / weights[0, 1] == pytest.approx(float(topped["quality"][1]), rel=1e-5)
    assert weights[0, 0] == pytest.approx(weights[1, 0])
