"""Synthetic top-up policy and the weighting of synthetic samples in the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clients.losses import LossContext, build_loss
from clients.synthetic import labels_for, load_pool, store_pool, topup_counts
from clients.trainer import _batch_loss
from flwr.app import RecordDict


def test_topup_to_the_largest_class():
    assert topup_counts(np.array([50, 10, 0, 50]), 0, max_ratio=10).tolist() == [0, 40, 50, 0]


def test_topup_to_a_fixed_target():
    assert topup_counts(np.array([50, 10, 0]), 30, max_ratio=10).tolist() == [0, 20, 30]


def test_cap_scales_needs_and_hands_out_the_remainder():
    # need (0, 40, 50) = 90 > cap floor(0.5 * 60) = 30: exact 13.33, 16.67 -> floors 13, 16, the unit left to class 2
    assert topup_counts(np.array([50, 10, 0]), 0, max_ratio=0.5).tolist() == [0, 13, 17]
    # need (0, 40, 50, 10) = 100 > cap 50: exactly halved
    assert topup_counts(np.array([50, 10, 0, 40]), 0, max_ratio=0.5).tolist() == [0, 20, 25, 5]


def test_cap_exactness_on_many_cases():
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(0, 100, size=6)
        ratio = float(rng.uniform(0.05, 2))
        out = topup_counts(counts, int(rng.integers(0, 120)), ratio)
        assert out.sum() <= np.floor(ratio * counts.sum()) and (out >= 0).all()


def test_pool_round_trip_in_node_state():
    state = RecordDict()
    store_pool(state, torch.ones(3, 1, 4, 4), torch.tensor([2, 2, 5]))
    x, y = load_pool(state, torch.device("cpu"))
    assert x.shape == (3, 1, 4, 4) and y.tolist() == [2, 2, 5]
    assert load_pool(RecordDict(), torch.device("cpu")) is None
    assert labels_for(np.array([2, 0, 1])).tolist() == [0, 0, 2]


def test_synthetic_samples_weighted_in_the_loss():
    fn, params = build_loss("ce", {})
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    targets = torch.tensor([0, 0, 1])
    ctx = LossContext(torch.tensor([1.0, 1.0]))
    batch = torch.tensor([0, 1, 5])  # positions >= real_count (=2) are synthetic
    losses = F.cross_entropy(logits, targets, reduction="none")
    expected = (losses[0] + losses[1] + 0.5 * losses[2]) / 2.5
    assert float(_batch_loss(fn, params, ctx, logits, targets, batch, 2, 0.5)) == pytest.approx(float(expected))
    assert float(_batch_loss(fn, params, ctx, logits, targets, batch, 2, 1.0)) == pytest.approx(float(losses.mean()))


def test_generator_cache_key_ignores_sampling_knobs():
    from fedimb.config import load_config
    from strategies.synthetic import cache_key

    base = ["synthetic.enabled=true", "data.dataset=digits"]
    key = cache_key(load_config(None, base))
    # One generator serves every sampler and top-up policy ...
    for knob in ("synthetic.guidance_scale=3", "synthetic.guidance_rescale=0.7", "synthetic.ddim_steps=40",
                 "synthetic.loss_weight=0.5", "synthetic.max_ratio=0.5"):
        assert cache_key(load_config(None, [*base, knob])) == key, knob
    # ... while anything that changes its training makes another one.
    for knob in ("synthetic.lr=0.01", "synthetic.rounds=2", "seed=1", "partition.alpha=0.3"):
        assert cache_key(load_config(None, [*base, knob])) != key, knob


def test_guidance_rescale_out_of_range_names_the_field():
    from fedimb.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"synthetic.guidance_rescale.*\[0, 1\]"):
        load_config(None, ["synthetic.guidance_rescale=1.5"])
