"""Synthetic top-up policy and the weighting of synthetic samples in the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clients.losses import LossContext, build_loss
from clients.synthetic import load_pool, store_pool
from clients.trainer import _batch_loss
from fedimb.synthetic.topup import ClassSampler, labels_for, topup_counts
from flwr.app import ConfigRecord, RecordDict


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
    from fedimb.app.synthetic import cache_key

    base = ["synthetic.enabled=true", "data.dataset=digits"]
    key = cache_key(load_config(None, base))
    # One generator serves every sampler and top-up policy ...
    for knob in ("synthetic.guidance_scale=3", "synthetic.guidance_rescale=0.7", "synthetic.ddim_steps=40",
                 "synthetic.tail_guidance_scale=1", "synthetic.tail_guidance_rescale=0",
                 "synthetic.loss_weight=0.5", "synthetic.max_ratio=0.5"):
        assert cache_key(load_config(None, [*base, knob])) == key, knob
    # ... while anything that changes its training makes another one.
    for knob in ("synthetic.lr=0.01", "synthetic.rounds=2", "seed=1", "partition.alpha=0.3"):
        assert cache_key(load_config(None, [*base, knob])) != key, knob


@pytest.mark.parametrize("knob", ["guidance_rescale", "tail_guidance_rescale"])
def test_guidance_rescale_out_of_range_names_the_field(knob):
    from fedimb.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=rf"synthetic.{knob}.*\[0, 1\]"):
        load_config(None, [f"synthetic.{knob}=1.5"])


def test_negative_tail_guidance_names_the_field():
    from fedimb.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"synthetic.tail_guidance_scale.*>= 0"):
        load_config(None, ["synthetic.tail_guidance_scale=-1"])


def test_tail_classes_get_their_own_sampler():
    from dataclasses import replace

    from fedimb.config import SyntheticConfig

    # Classes by count: 3 > 0 > 5 > 1 > 4 > 2 > 6; C=7 splits 3 / 2 / 2, so the tail is {2, 6}.
    counts = np.array([500, 90, 20, 900, 60, 300, 5])
    syn = SyntheticConfig(guidance_scale=2.5, guidance_rescale=1.0)
    sampler = ClassSampler.for_classes(syn, counts)
    assert sampler.guidance.tolist() == [2.5] * 7 and sampler.rescale.tolist() == [1.0] * 7  # no tail knobs: one sampler
    sampler = ClassSampler.for_classes(replace(syn, tail_guidance_scale=1.5, tail_guidance_rescale=0.0), counts)
    assert sampler.guidance.tolist() == [2.5, 2.5, 1.5, 2.5, 2.5, 2.5, 1.5]
    assert sampler.rescale.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    # a tail knob left out keeps the main one for the tail
    sampler = ClassSampler.for_classes(replace(syn, tail_guidance_scale=1.5), counts)
    assert sampler.guidance[[2, 6]].tolist() == [1.5, 1.5] and sampler.rescale.tolist() == [1.0] * 7


def test_class_sampler_wire_round_trip():
    sampler = ClassSampler(np.array([2.5, 1.5, 2.0]), np.array([1.0, 0.0, 0.5]))
    config = ConfigRecord({"fedimb-config": "...", **sampler.to_config()})
    back = ClassSampler.from_config(config)
    assert back.guidance.tolist() == [2.5, 1.5, 2.0] and back.rescale.tolist() == [1.0, 0.0, 0.5]
    assert back.guidance.dtype == np.float64
    assert ClassSampler.from_config(ConfigRecord({"fedimb-config": "..."})) is None  # sent without one
    scale, rescale = back.per_label(torch.tensor([2, 0, 0, 1]))
    assert scale.tolist() == [2.0, 2.5, 2.5, 1.5] and rescale.tolist() == [0.5, 1.0, 1.0, 0.0]
    assert scale.dtype == torch.float32
    with pytest.raises(ValueError, match="3 guidance scales but 2 rescales"):
        ClassSampler(np.ones(3), np.ones(2))


def test_pool_names_carry_the_tail_sampler_only_when_set():
    from dataclasses import replace

    from fedimb.config import SyntheticConfig
    from fedimb.app.synthetic import pool_name

    syn = SyntheticConfig(guidance_scale=1.5, ddim_steps=20)
    assert pool_name(syn, 3) == "pool-t0-r1.0-w1.5-s20-c3.pt"  # the name pools had before the tail knobs
    tail = pool_name(replace(syn, tail_guidance_scale=1.0), 3)
    assert tail != pool_name(syn, 3) and tail != pool_name(replace(syn, tail_guidance_rescale=0.5), 3)
