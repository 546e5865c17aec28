"""Each strategy's aggregation against a hand-computed case; client-side terms likewise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from clients.algorithms.fednova import normalising_factor
from clients.algorithms.fedprox import FedProxClient
from clients.algorithms.scaffold import ScaffoldClient
from clients.losses import build_loss
from clients.losses.base import LossContext
from clients.trainer import train_local
from fedimb.config import ConfigError, TrainConfig, load_config
from fedimb.models import FeatureClassifier
from strategies import STRATEGIES, build_strategy
from strategies.base import ClientFailed, StrategyContext
from strategies.fednova import fednova_update
from strategies.scaffold import update_control
from tests.fakes import make, reply, round_of


def arrays(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in rec.items()}


def test_registry_has_niid_bench_four_and_flower_ones():
    assert {"fedavg", "fedprox", "fedavgm", "fedadam", "scaffold", "fednova"} <= set(STRATEGIES)


def test_fedavg_weights_by_examples():
    strategy, _ = make("fedavg")
    out, metrics = strategy.aggregate_train(1, [reply(101, {"w": [1.0, 2.0]}, 10), reply(102, {"w": [4.0, 8.0]}, 30)])
    np.testing.assert_allclose(arrays(out)["w"], [0.25 * 1 + 0.75 * 4, 0.25 * 2 + 0.75 * 8])
    assert metrics["train_loss"] == pytest.approx(0.5)


def test_aggregation_does_not_depend_on_arrival_order():
    strategy, _ = make("fedavg")
    replies = [reply(100 + i, {"w": [0.1 * i, 1 / (i + 3)]}, 7 * i + 1) for i in range(1, 5)]
    a, _ = strategy.aggregate_train(1, replies)
    b, _ = strategy.aggregate_train(1, replies[::-1])
    assert np.array_equal(arrays(a)["w"], arrays(b)["w"])


def test_failed_client_fails_the_round():
    strategy, _ = make("fedavg")
    from flwr.app import Error

    bad = Message(Error(code=1, reason="boom"), reply_to=Message(RecordDict(), dst_node_id=103, message_type="train"))
    with pytest.raises(ClientFailed, match="boom"):
        strategy.aggregate_train(1, [reply(101, {"w": [1.0]}, 1), bad])


def test_fedavgm_server_momentum_by_hand():
    strategy, _ = make("fedavgm", server_lr=1.0, server_momentum=0.5)
    start = ArrayRecord({"w": Array(np.array([1.0], dtype=np.float32))})
    strategy.current_arrays = start
    # round 1: avg = 3 -> pseudo-gradient 1 - 3 = -2, buffer -2, w = 1 + 2 = 3
    out, _ = strategy.aggregate_train(1, [reply(101, {"w": [3.0]}, 1), reply(102, {"w": [3.0]}, 1)])
    np.testing.assert_allclose(arrays(out)["w"], [3.0])
    # round 2: avg = 4 -> grad -1, buffer 0.5*(-2) + (-1) = -2, w = 3 + 2 = 5
    out, _ = strategy.aggregate_train(2, [reply(101, {"w": [4.0]}, 1), reply(102, {"w": [4.0]}, 1)])
    np.testing.assert_allclose(arrays(out)["w"], [5.0])


def test_fedprox_sends_mu_and_client_adds_the_proximal_gradient():
    strategy, spec = make("fedprox", proximal_mu=0.5)
    assert spec.client_algorithm == "fedprox"
    assert strategy.proximal_mu == 0.5
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(3.0)
    content = RecordDict({"config": ConfigRecord({"proximal-mu": 0.5})})
    client = FedProxClient(round_of(model, {"weight": torch.tensor([[1.0]])}, content, RecordDict()))
    model.weight.grad = torch.tensor([[0.25]])
    client.before_step()  # d/dw (mu/2)(w - w_g)^2 = 0.5 * (3 - 1) = 1, on top of the loss's 0.25
    assert model.weight.grad.item() == pytest.approx(1.25)
    model.weight.grad = None  # a weight the batch loss does not reach: the term's gradient alone
    client.before_step()
    assert model.weight.grad.item() == pytest.approx(1.0)


def test_fedprox_local_steps_by_hand():
    """k momentum-SGD steps on CE + (mu/2)||w - w_g||^2 through the training loop, by hand."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]])
    y = torch.tensor([0, 1, 1, 0])
    anchor_w, anchor_b = torch.tensor([[0.2, -0.1], [0.0, 0.3]]), torch.tensor([0.1, -0.1])
    init_w, init_b = anchor_w + torch.tensor([[0.5, -0.5], [0.25, 0.0]]), torch.zeros(2)
    mu, lr, momentum, steps = 0.5, 0.1, 0.9, 3

    model = FeatureClassifier(torch.nn.Identity(), feature_dim=2, num_classes=2)
    with torch.no_grad():
        model.head.weight.copy_(init_w)
        model.head.bias.copy_(init_b)
    content = RecordDict({"config": ConfigRecord({"proximal-mu": mu})})
    client = FedProxClient(round_of(model, {"head.weight": anchor_w, "head.bias": anchor_b}, content, RecordDict()))
    cfg = TrainConfig(local_epochs=steps, lr=lr, batch_size=4, momentum=momentum, weight_decay=0.0)
    loss_fn, params = build_loss("ce", {})
    train_local(model, x, y, cfg, loss_fn, params, LossContext(torch.ones(2)), client, seed=0)

    w, b = init_w.clone(), init_b.clone()
    buf_w, buf_b = torch.zeros_like(w), torch.zeros_like(b)
    for _ in range(steps):
        p = torch.softmax(x @ w.T + b, dim=1) - torch.nn.functional.one_hot(y, 2).float()
        grad_w, grad_b = p.T @ x / len(y) + mu * (w - anchor_w), p.mean(0) + mu * (b - anchor_b)
        buf_w, buf_b = momentum * buf_w + grad_w, momentum * buf_b + grad_b
        w, b = w - lr * buf_w, b - lr * buf_b
    np.testing.assert_allclose(model.head.weight.detach().numpy(), w.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.head.bias.detach().numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_scaffold_control_update_by_hand():
    control = {"w": np.array([1.0, 1.0], dtype=np.float32)}
    deltas = [{"w": np.array([2.0, 0.0], dtype=np.float32)}, {"w": np.array([0.0, 4.0], dtype=np.float32)}]
    np.testing.assert_allclose(update_control(control, deltas, num_clients=4)["w"], [1.5, 2.0])


def test_scaffold_client_delta_by_hand():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0]]))
    start = {"weight": torch.tensor([[1.0, 1.0]])}
    content = RecordDict({"control": ArrayRecord({"weight": Array(np.array([[0.5, 0.5]], dtype=np.float32))})})
    state = RecordDict()
    client = ScaffoldClient(round_of(model, start, content, state))
    client.after_step(lr=0.1)  # w - lr (c - c_i) = 0 - 0.1 * 0.5
    np.testing.assert_allclose(model.weight.detach().numpy(), [[-0.05, -0.05]])
    reply_rd = RecordDict()
    with torch.no_grad():
        model.weight.zero_()
    client.finish(steps=5, reply=reply_rd, metrics={})
    # c_i+ = 0 - 0.5 + (1 - 0) / (5 * 0.1) = 1.5 ; delta = 1.5
    np.testing.assert_allclose(reply_rd["control-delta"]["weight"].numpy(), [[1.5, 1.5]])
    np.testing.assert_allclose(state["scaffold-control"]["weight"].numpy(), [[1.5, 1.5]])


def test_scaffold_correction_sits_outside_the_momentum_buffer():
    """k momentum-SGD steps, then w <- w - lr (c - c_i) after each (NIID-Bench's SCAFFOLD), by hand."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]])
    y = torch.tensor([0, 1, 1, 0])
    init = torch.tensor([[0.2, -0.1], [0.0, 0.3]])
    correction = torch.tensor([[0.5, -0.25], [-0.5, 0.25]])  # c - c_i, with c_i = 0
    lr, momentum, steps = 0.1, 0.9, 3

    model = FeatureClassifier(torch.nn.Identity(), feature_dim=2, num_classes=2)
    with torch.no_grad():
        model.head.weight.copy_(init)
        model.head.bias.zero_()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    content = RecordDict({"control": ArrayRecord({"head.weight": Array(correction.numpy()),
                                                  "head.bias": Array(np.zeros(2, dtype=np.float32))})})
    client = ScaffoldClient(round_of(model, start, content, RecordDict()))
    cfg = TrainConfig(local_epochs=steps, lr=lr, batch_size=4, momentum=momentum, weight_decay=0.0)
    loss_fn, params = build_loss("ce", {})
    train_local(model, x, y, cfg, loss_fn, params, LossContext(torch.ones(2)), client, seed=0)

    w, b = init.clone(), torch.zeros(2)
    buf_w, buf_b = torch.zeros_like(w), torch.zeros_like(b)
    for _ in range(steps):
        p = torch.softmax(x @ w.T + b, dim=1) - torch.nn.functional.one_hot(y, 2).float()
        grad_w, grad_b = p.T @ x / len(y), p.mean(0)  # the gradient of mean cross-entropy
        buf_w, buf_b = momentum * buf_w + grad_w, momentum * buf_b + grad_b
        w, b = w - lr * buf_w - lr * correction, b - lr * buf_b
    np.testing.assert_allclose(model.head.weight.detach().numpy(), w.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.head.bias.detach().numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_scaffold_strategy_strips_and_applies_deltas():
    strategy, _ = make("scaffold")
    r1 = reply(101, {"w": [2.0]}, 1)
    r1.content["control-delta"] = ArrayRecord({"w": Array(np.array([4.0], dtype=np.float32))})
    r2 = reply(102, {"w": [4.0]}, 1)
    r2.content["control-delta"] = ArrayRecord({"w": Array(np.array([8.0], dtype=np.float32))})
    out, _ = strategy.aggregate_train(1, [r1, r2])
    np.testing.assert_allclose(arrays(out)["w"], [3.0])
    np.testing.assert_allclose(strategy.control["w"], [12.0 / 4])


def test_fednova_factor_and_update_by_hand():
    assert normalising_factor(4, 0.0) == 4
    rho = 0.5  # (3 - 0.5 * (1 - 0.125) / 0.5) / 0.5 = 4.25
    assert normalising_factor(3, rho) == pytest.approx(4.25)
    x = {"w": np.array([10.0])}
    # p = (0.25, 0.75); d = 0.25*(10-6)/2 + 0.75*(10-2)/4 = 0.5 + 1.5 = 2; tau_eff = 0.25*2 + 0.75*4 = 3.5
    new = fednova_update(x, [{"w": np.array([6.0])}, {"w": np.array([2.0])}], [1, 3], [2.0, 4.0])
    np.testing.assert_allclose(new["w"], [10.0 - 3.5 * 2.0])
    same = fednova_update(x, [{"w": np.array([6.0])}, {"w": np.array([2.0])}], [1, 3], [3.0, 3.0])
    np.testing.assert_allclose(same["w"], [0.25 * 6 + 0.75 * 2])  # equal factors: FedAvg


def test_fednova_strategy_uses_round_start():
    strategy, _ = make("fednova")
    start = ArrayRecord({"w": Array(np.array([10.0], dtype=np.float32))})

    class Grid:
        def get_node_ids(self):
            return [101, 102, 103, 104]

    strategy.configure_train(1, start, ConfigRecord(), Grid())
    out, _ = strategy.aggregate_train(1, [reply(101, {"w": [6.0]}, 1, **{"fednova-a": 2.0}),
                                          reply(102, {"w": [2.0]}, 3, **{"fednova-a": 4.0})])
    np.testing.assert_allclose(arrays(out)["w"], [3.0], rtol=1e-6)


def test_sampling_is_reproducible_and_independent_of_node_ids():
    cfg_ctx = StrategyContext(num_clients=10, fraction=0.3, fraction_evaluate=0.0, min_clients=2, seed=5,
                              client_eval_every=0, rounds=3)
    picks = []
    for offset in (1000, 77_777):  # two "runs" with different random node ids
        cfg = load_config(None, ["data.dataset=digits"])
        strategy, _ = build_strategy(cfg, cfg_ctx)
        strategy.bind(cfg_ctx, {offset + 13 * p: p for p in range(10)})

        class Grid:
            def __init__(self, ids: set[int]) -> None:
                self.ids = ids

            def get_node_ids(self):
                return self.ids

        msgs = strategy.configure_train(2, ArrayRecord(), ConfigRecord(), Grid({offset + 13 * p for p in range(10)}))
        picks.append(sorted(strategy.partition_of[m.metadata.dst_node_id] for m in msgs))
    assert picks[0] == picks[1] and len(picks[0]) == 3


def test_unknown_strategy_param_is_a_config_error():
    with pytest.raises(ConfigError, match="strategy.params.momentum"):
        make("fedavgm", momentum=0.1)


def test_local_sgd_matches_torch_sgd_step_for_step():
    from clients.trainer import MomentumSGD

    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    theirs = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    theirs.load_state_dict(ours.state_dict())
    opt_ours = MomentumSGD(list(ours.parameters()), lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for step in range(5):
        x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


def test_local_training_hands_the_model_back_in_the_default_layout():
    """Training runs channels-last; the weights a client exports afterwards are in the default layout."""
    from clients.algorithms.base import ClientAlgorithm
    from fedimb.models import build_model

    model = build_model("lenet", (1, 28, 28), 10)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss_fn, params = build_loss("ce", {})
    cfg = TrainConfig(local_epochs=1, lr=0.1, batch_size=8, momentum=0.9, weight_decay=0.0)
    plain = ClientAlgorithm(round_of(model, before, RecordDict(), RecordDict()))
    train_local(model, x, y, cfg, loss_fn, params, LossContext(torch.ones(10)), plain, seed=0)
    conv2 = model.body[0][3].weight  # 16 x 6 x 5 x 5: channels-last strides differ from the default ones
    assert all(p.is_contiguous() for p in model.parameters()) and conv2.is_contiguous()
    assert not torch.equal(conv2, before["body.0.3.weight"])  # it trained
