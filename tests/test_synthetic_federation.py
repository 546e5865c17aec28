"""Synthetic samples in the federation: what crosses the wire, and top-ups that match the policy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.app import train_generator_round
from fedimb.protocol import EXPERIMENT_CONFIG as CONFIG_KEY
from fedimb.protocol import GENERATOR_RANGE as RANGE_KEY
from fedimb.config import load_config, to_yaml
from fedimb.data import build_federated_data
from fedimb.synthetic.generator import Generator
from fedimb.synthetic.topup import topup_counts
from fedimb.app.simulation import run_experiment
from tests.conftest import DIGITS_SMALL

SYN = ["synthetic.enabled=true", "synthetic.rounds=1", "synthetic.local_steps=5", "synthetic.quality_per_class=4",
       "synthetic.ddim_steps=4", "imbalance.factor=10", "partition.name=dir_balance", "partition.alpha=0.3",
       "federation.num_clients=3", "federation.rounds=1", "eval.client_every=0"]


def test_generator_round_sends_only_weights_and_scalars():
    cfg = load_config(None, DIGITS_SMALL + SYN)
    data = build_federated_data(cfg)
    shape, classes = data.splits.input_shape, data.splits.num_classes
    generator = Generator.build("cpu", shape, classes, seed=0, data_range=(-1.0, 5.0))
    content = RecordDict({"arrays": ArrayRecord(generator.state_dict()),
                          "config": ConfigRecord({CONFIG_KEY: to_yaml(cfg), RANGE_KEY: [-1.0, 5.0], "server-round": 1})})
    message = Message(content=content, dst_node_id=7, message_type="train.generator")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 3}, state=RecordDict(),
                      run_config={})
    reply = train_generator_round(message, context).content
    assert set(reply.keys()) == {"arrays", "metrics"}
    assert set(reply["arrays"].keys()) == set(generator.state_dict().keys())  # the generator's weights, nothing else
    for key, array in reply["arrays"].items():
        assert tuple(array.shape) == tuple(generator.state_dict()[key].shape)
    assert all(not isinstance(v, list) for v in reply["metrics"].values())
    assert int(reply["metrics"]["num-examples"]) == len(data.client_indices[1])


def test_client_samples_with_the_class_sampler_it_is_sent():
    import numpy as np
    import torch

    from clients.app import topup
    from clients.synthetic import load_pool
    from fedimb.synthetic.topup import ClassSampler, sample_pool

    cfg = load_config(None, DIGITS_SMALL + SYN + ["synthetic.policy=client_sample", "synthetic.guidance_scale=3",
                                                  "synthetic.tail_guidance_scale=1"])
    data = build_federated_data(cfg)
    shape, classes = data.splits.input_shape, data.splits.num_classes
    generator = Generator.build("cpu", shape, classes, seed=0, data_range=(-1.0, 5.0))
    sampler = ClassSampler.for_classes(cfg.synthetic, data.counts.sum(axis=0))
    pid = int(np.argmax([(topup_counts(c, 0, 1.0) * (sampler.guidance == 1.0)).sum() for c in data.counts]))
    need = topup_counts(data.counts[pid], 0, 1.0)
    assert need[sampler.guidance == 1.0].sum() > 0 and need[sampler.guidance == 3.0].sum() > 0  # both samplers in play
    config = ConfigRecord({CONFIG_KEY: to_yaml(cfg), RANGE_KEY: [-1.0, 5.0], **sampler.to_config()})
    message = Message(content=RecordDict({"generator": ArrayRecord(generator.state_dict()), "config": config}),
                      dst_node_id=7, message_type="query.topup")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": pid, "num-partitions": 3}, state=RecordDict(),
                      run_config={})
    topup(message, context)
    x, y = load_pool(context.state, torch.device("cpu"))
    seed = cfg.seed * 31 + pid
    expected, _ = sample_pool(generator, need, cfg.synthetic, seed=seed, sampler=sampler)
    one_sampler, _ = sample_pool(generator, need, cfg.synthetic, seed=seed)
    assert torch.allclose(x, expected, atol=1e-5) and not torch.allclose(x, one_sampler, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["server_pool", "client_sample"])
def test_topups_match_the_policy_exactly(policy, tmp_path):
    cfg = load_config(None, DIGITS_SMALL + SYN + [f"synthetic.policy={policy}", "synthetic.max_ratio=0.5",
                                                  f"synthetic.cache_dir={tmp_path / 'cache'}"])
    summary = run_experiment(cfg, tmp_path / "run")
    counts = build_federated_data(cfg).counts
    expected = [int(topup_counts(c, 0, 0.5).sum()) for c in counts]
    assert summary["synthetic"]["synthetic_per_client"] == expected
    assert len(summary["synthetic"]["recognisability"]) == 10
    assert (tmp_path / "run" / "synthetic_grid.png").is_file()
    assert (tmp_path / "cache").is_dir() and any((tmp_path / "cache").rglob("config.json"))
    if policy == "server_pool":  # a rerun reuses the cached generator and pools
        again = run_experiment(cfg, tmp_path / "again")
        assert again["synthetic"]["generator_reused"] and not summary["synthetic"]["generator_reused"]
        assert again["synthetic"]["generator_training_s"] == summary["synthetic"]["generator_training_s"] > 0
        assert json.loads((tmp_path / "again" / "summary.json").read_text())["synthetic"]["synthetic_per_client"] == expected
        # the probe's in-process rounds are the federation's own: the same generator, bit for bit
        import torch

        from benchmarks.generator_probe import LocalGrid
        from clients.app import app
        from fedimb.app.synthetic import DataFacts, train_federated

        grid = LocalGrid(app, cfg.federation.num_clients)
        facts = DataFacts.of_splits(build_federated_data(cfg).splits)
        probed = train_federated(grid, cfg, grid.partition_of, counts, facts, to_yaml(cfg))
        cached = Generator.from_pretrained(next((tmp_path / "cache").rglob("generator")))
        assert all(torch.equal(probed.state_dict()[k], v) for k, v in cached.state_dict().items())


@pytest.mark.slow
def test_fedprox_and_fairfal_runs_take_the_top_up(tmp_path):
    cache = [f"synthetic.cache_dir={tmp_path / 'cache'}", "strategy.name=fedprox", "federation.rounds=2"]
    with_pool = run_experiment(load_config(None, DIGITS_SMALL + SYN + cache), tmp_path / "prox")
    counts = build_federated_data(load_config(None, DIGITS_SMALL + SYN)).counts
    assert with_pool["synthetic"]["synthetic_per_client"] == [int(topup_counts(c, 0, 1.0).sum()) for c in counts]
    without = run_experiment(load_config(None, DIGITS_SMALL + SYN + cache + ["synthetic.enabled=false"]),
                             tmp_path / "prox-real")
    assert with_pool["final"]["balanced_accuracy"] != without["final"]["balanced_accuracy"]  # the pool was trained on
    fal = ["active_learning.enabled=true", "active_learning.sampler=fairfal", "active_learning.initial_fraction=0.2",
           "active_learning.step_fraction=0.1", "active_learning.steps=1", "active_learning.rounds_per_step=1",
           "active_learning.local_epochs=2", "strategy.name=fedavg"]
    summary = run_experiment(load_config(None, DIGITS_SMALL + SYN + cache[:1] + fal), tmp_path / "fal")
    assert summary["synthetic"]["generator_reused"]  # the same generator as the fedprox runs: cached
    assert summary["synthetic"]["synthetic_per_client"] == with_pool["synthetic"]["synthetic_per_client"]
    assert len(summary["active_learning"]) == 2  # one row per stage: the initial pool and one query step


@pytest.mark.slow
def test_local_generators_top_up_only_held_classes(tmp_path):
    import math

    cfg = load_config(None, DIGITS_SMALL + SYN + ["synthetic.training=local", "synthetic.policy=client_sample",
                                                  f"synthetic.cache_dir={tmp_path / 'cache'}"])
    summary = run_experiment(cfg, tmp_path / "run")
    counts = build_federated_data(cfg).counts
    syn = summary["synthetic"]
    assert syn["synthetic_per_client"] == [int(topup_counts(c, 0, 1.0, only_held=True).sum()) for c in counts]
    # the judge scored quality_per_class (4) samples of each class on every client holding it
    assert syn["quality_scored_per_class"] == [4 * int((counts[:, c] > 0).sum()) for c in range(10)]
    assert all(math.isnan(v) == (n == 0) for v, n in zip(syn["recognisability"], syn["quality_scored_per_class"]))
    assert len(list((tmp_path / "cache").rglob("local-c*/config.json"))) == 3 and not syn["generator_reused"]
    again = run_experiment(cfg, tmp_path / "again")["synthetic"]
    assert again["generator_reused"] and again["generator_training_s_per_client"] == syn["generator_training_s_per_client"]
    assert again["recognisability"] == syn["recognisability"]  # same generators, same seeded samples


def test_local_training_needs_client_sampling():
    from fedimb.config import ConfigError

    with pytest.raises(ConfigError, match=r"synthetic.policy.*client_sample"):
        load_config(None, ["synthetic.training=local", "synthetic.policy=server_pool"])


def test_local_topup_reply_holds_counts_only():
    import torch

    from clients.app import topup
    from clients.synthetic import load_pool
    from fedimb.protocol import JUDGE as JUDGE_KEY
    from fedimb.protocol import LOCAL_GENERATOR_DIR as LOCAL_CACHE_KEY
    from fedimb.protocol import TRAIN_LOCAL as LOCAL_KEY
    from fedimb.models import build_model

    cfg = load_config(None, DIGITS_SMALL + SYN + ["synthetic.training=local", "synthetic.policy=client_sample",
                                                  "synthetic.local_steps=2"])
    data = build_federated_data(cfg)
    judge = build_model("lenet", data.splits.input_shape, data.splits.num_classes)
    config = ConfigRecord({CONFIG_KEY: to_yaml(cfg), LOCAL_KEY: True})
    message = Message(content=RecordDict({"config": config, JUDGE_KEY: ArrayRecord(judge.state_dict())}),
                      dst_node_id=7, message_type="query.topup")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                      run_config={})
    reply = topup(message, context).content
    assert set(reply.keys()) == {"metrics"}  # no image, no generator weights
    metrics = reply["metrics"]
    assert LOCAL_CACHE_KEY not in config and int(metrics["generator-reused"]) == 0
    held = data.counts[0] > 0
    assert [n > 0 for n in metrics["quality-scored"]] == held.tolist()
    _, y = load_pool(context.state, torch.device("cpu"))
    assert int(metrics["num-synthetic"]) == len(y) and set(y.tolist()) <= set(np.flatnonzero(held).tolist())


def test_class_aware_label_table_hand_case():
    import numpy as np
    from flwr.app import Array

    from fedimb.synthetic.generator import EMBEDDING_KEY
    from strategies.generator import class_aware_rows

    # 3 clients, 2 classes + null row, D = 1. FedAvg (weights 1:1:2) gave the merged table below.
    tables = [np.array([[1.0], [0.0], [3.0]]), np.array([[0.0], [4.0], [5.0]]), np.array([[0.0], [0.0], [7.0]])]
    counts = np.array([[10, 0], [0, 30], [0, 0]])  # class 0 only on client 0, class 1 only on client 1
    fedavg = (tables[0] + tables[1] + 2 * tables[2]) / 4
    merged = ArrayRecord({EMBEDDING_KEY: Array(fedavg.astype(np.float32)), "other": Array(np.ones(2, np.float32))})
    out = class_aware_rows(merged, tables, counts)[EMBEDDING_KEY].numpy()
    assert out[:, 0].tolist() == [1.0, 4.0, 5.5]  # holders' rows taken whole; null row stays FedAvg
    both = class_aware_rows(ArrayRecord({EMBEDDING_KEY: Array(fedavg.astype(np.float32))}), tables,
                            np.array([[10, 0], [30, 0], [0, 0]]))[EMBEDDING_KEY].numpy()
    assert both[0, 0] == pytest.approx((10 * 1.0 + 30 * 0.0) / 40)
    assert both[1, 0] == pytest.approx(fedavg[1, 0])  # nobody holds class 1: FedAvg's row kept


def test_class_balanced_weights_give_every_class_the_same_mass():
    import torch

    from fedimb.synthetic.diffusion import class_balanced_weights

    labels = torch.tensor([0] * 90 + [1] * 9 + [3])
    weights = class_balanced_weights(labels)
    per_class = [float(weights[labels == c].sum()) for c in (0, 1, 3)]
    assert per_class == pytest.approx([1.0, 1.0, 1.0])
    draws = torch.multinomial(weights, 30_000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert float((labels[draws] == 3).float().mean()) == pytest.approx(1 / 3, abs=0.02)


def test_min_snr_weighting_hand_case():
    import torch
    from diffusers import DDPMScheduler

    from fedimb.synthetic.diffusion import _denoising_loss

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    t = torch.tensor([0, 999])
    alpha_bar = scheduler.alphas_cumprod[t].double()
    snr = alpha_bar / (1 - alpha_bar)  # ~1e4 at t = 0 (nearly clean), ~4e-5 at t = 999
    predicted = torch.zeros(2, 1, 2, 2)
    noise = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])  # per-sample MSE 1 and 4
    expected = ((min(float(snr[0]), 5.0) / float(snr[0])) * 1.0 + 1.0 * 4.0) / 2  # t = 999: SNR < 5, weight 1
    assert float(_denoising_loss(predicted, noise, t, scheduler, 5.0)) == pytest.approx(expected, rel=1e-4)
    assert float(_denoising_loss(predicted, noise, t, scheduler, 0.0)) == pytest.approx(2.5)  # off: plain mean


def test_min_snr_weighting_for_v_prediction_hand_case():
    import torch
    from diffusers import DDPMScheduler

    from fedimb.synthetic.diffusion import _denoising_loss

    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    t = torch.tensor([0, 999])
    alpha_bar = scheduler.alphas_cumprod[t].double()
    snr = alpha_bar / (1 - alpha_bar)
    predicted = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])  # per-sample MSE 1 and 4
    # v's error carries x0's error times (SNR + 1): the weight is min(SNR, gamma) / (SNR + 1).
    weights = [min(float(s), 5.0) / (float(s) + 1) for s in snr]
    expected = (weights[0] * 1.0 + weights[1] * 4.0) / 2
    assert weights[1] < 1e-3  # pure noise: v = -x0, nearly nothing to learn about the noise
    assert float(_denoising_loss(predicted, target, t, scheduler, 5.0)) == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_a_server_without_data_trains_the_generator_and_tops_up(tmp_path):
    """Deployed, the server holds no data: the image shape and value range come from the hello
    replies, the generator trains through the clients, the top-up arrives; no judge, so no score."""
    from tests.test_server_without_data import run_without_data

    cfg = load_config(None, DIGITS_SMALL + SYN + [f"synthetic.cache_dir={tmp_path / 'cache'}", "eval.client_every=1"])
    run_dir = tmp_path / "run"
    assert not run_without_data([cfg], [run_dir])
    synthetic = json.loads((run_dir / "summary.json").read_text())["synthetic"]
    assert synthetic["judge_data"].startswith("none")
    assert all(score is None for score in synthetic["recognisability"])  # NaN: not scored, null in JSON
    assert sum(synthetic["synthetic_per_client"]) > 0 and (run_dir / "synthetic_grid.png").is_file()
    data = build_federated_data(cfg)
    generator = Generator.from_pretrained(next((tmp_path / "cache").rglob("generator")))
    # the range the clients reported is the range of their images
    train = data.splits.train_x[np.concatenate(data.client_indices)]
    assert generator.data_range == pytest.approx((float(train.min()), float(train.max())))
