"""Federated active learning end to end on digits: pools, budgets, records."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from clients.active import labelled_positions, store_positions
from fedimb.config import load_config
from fedimb.data import build_federated_data
from fedimb.app.simulation import run_experiment
from fedimb.app.active_learning import step_budget, tail_share
from tests.conftest import DIGITS_SMALL

AL = ["active_learning.enabled=true", "active_learning.initial_fraction=0.2", "active_learning.step_fraction=0.1",
      "active_learning.steps=2", "active_learning.rounds_per_step=2", "active_learning.local_epochs=5",
      "train.local_epochs=3", "federation.num_clients=3", "eval.client_every=0", "partition.name=iid"]


def test_budget_matches_fairfal_formula():
    assert step_budget(20_428, 0.05, 10) == 102  # the paper's FMNIST-LT figure
    assert step_budget(1347, 0.1, 3) == 43


def test_tail_share():
    assert tail_share(np.array([5, 0, 3, 2]), [2, 3]) == pytest.approx(0.5)
    assert tail_share(np.zeros(3, dtype=int), [2]) == 0.0


def test_initial_pool_is_seeded_and_persists():
    cfg = load_config(None, DIGITS_SMALL + AL)
    state = RecordDict()
    first = labelled_positions(state, 200, cfg, 1)
    assert len(first) == 40 and len(np.unique(first)) == 40
    assert np.array_equal(labelled_positions(RecordDict(), 200, cfg, 1), first)  # same seed, same draw
    store_positions(state, np.array([3, 1, 2]))
    assert labelled_positions(state, 200, cfg, 1).tolist() == [1, 2, 3]
    assert isinstance(state["fal-pool"], ConfigRecord)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["entropy", "fairfal"])
def test_two_step_run_grows_pools_by_the_budget(sampler, tmp_path):
    cfg = load_config(None, DIGITS_SMALL + AL + [f"active_learning.sampler={sampler}"])
    summary = run_experiment(cfg, tmp_path / "run")
    steps = summary["active_learning"]
    data = build_federated_data(cfg)
    sizes = [len(idx) for idx in data.client_indices]
    initial = sum(max(1, round(0.2 * n)) for n in sizes)
    budget = step_budget(int(sum(sizes)), 0.1, 3)
    assert [s["labelled_after"] for s in steps[:2]] == [initial + budget * 3, initial + 2 * budget * 3]
    assert [s["queried"] for s in steps[:2]] == [budget * 3, budget * 3]
    assert sum(steps[0]["queried_histogram"]) == budget * 3
    assert len(steps) == 3 and all(0.0 <= s["accuracy"] <= 1.0 for s in steps)
    assert steps[-1]["accuracy"] > 0.5
    if sampler == "fairfal":
        assert 0.0 < steps[0]["gamma_bar"] <= 1.0 and steps[1]["gamma_bar"] == steps[0]["gamma_bar"]
    with open(tmp_path / "run" / "fal.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 3
    assert (tmp_path / "run" / "fal_curve.png").stat().st_size > 1000
    rounds = json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"]
    assert rounds == 6  # 3 stages × 2 rounds, numbered across stages


def test_hello_tells_only_the_labelled_pool_s_labels():
    from flwr.app import Context, Message

    from clients.app import hello
    from fedimb import protocol
    from fedimb.config import to_yaml

    cfg = load_config(None, DIGITS_SMALL + ["active_learning.enabled=true", "active_learning.initial_fraction=0.1"])
    message = Message(RecordDict({protocol.CONFIG: ConfigRecord({protocol.EXPERIMENT_CONFIG: to_yaml(cfg)})}),
                      dst_node_id=7, message_type=protocol.HELLO)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 2, "num-partitions": 4}, state=RecordDict(),
                      run_config={})
    metrics = hello(message, context).content[protocol.METRICS]
    data = build_federated_data(cfg)
    labels = data.splits.train_y[data.client_indices[2]]
    labelled = labelled_positions(context.state, len(labels), cfg, 2)
    assert list(metrics[protocol.CLASS_COUNTS]) == np.bincount(labels[labelled], minlength=10).tolist()
    assert sum(metrics[protocol.CLASS_COUNTS]) == len(labelled) < int(metrics[protocol.NUM_EXAMPLES]) == len(labels)


def test_kafal_queries_with_the_clients_last_round_model():
    import torch

    from clients.active import keeps_last_local_model, last_local_model, query_step, store_last_local_model
    from clients.samplers.kafal import kafal_scores
    from fedimb import protocol
    from fedimb.models import build_configured_model

    cfg = load_config(None, DIGITS_SMALL + AL + ["active_learning.sampler=kafal",
                                                 "active_learning.sampler_params.weight_by_local_distribution=false"])
    assert keeps_last_local_model(cfg)
    assert not keeps_last_local_model(load_config(None, DIGITS_SMALL + AL + ["active_learning.sampler=logo"]))
    torch.manual_seed(0)
    x, y = torch.randn(30, 1, 8, 8), torch.arange(30) % 10
    labelled = np.arange(10)
    global_model, trained = (build_configured_model(cfg, (1, 8, 8), 10, seed) for seed in (1, 2))
    state = RecordDict()
    assert last_local_model(state, cfg, (1, 8, 8), 10, torch.device("cpu")) is None
    store_last_local_model(state, trained)
    local = last_local_model(state, cfg, (1, 8, 8), 10, torch.device("cpu"))
    grown, report = query_step(cfg, global_model, x, y, labelled, 4, None, 0, (1, 8, 8), 10, local)
    with torch.no_grad():
        global_model.eval(), trained.eval()
        scores = kafal_scores(global_model(x[10:]).softmax(1), trained(x[10:]).softmax(1), None)
    assert report[protocol.LOCAL_MODEL_FROM_SCRATCH] == 0
    assert sorted(set(grown) - set(labelled)) == sorted((10 + torch.topk(scores, 4).indices).tolist())
    _, before_training = query_step(cfg, global_model, x, y, labelled, 4, None, 0, (1, 8, 8), 10, None)
    assert before_training[protocol.LOCAL_MODEL_FROM_SCRATCH] == 1
