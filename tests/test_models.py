"""Models by name: shapes, features, deterministic initialisation, exchanged weights."""

from __future__ import annotations

import pytest
import torch

from fedimb.config import ConfigError
from fedimb.models import MODELS, build_model, get_weights


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 32, 32)])
def test_logits_and_features(name, shape):
    model = build_model(name, shape, 10, seed=0)
    x = torch.randn(4, *shape)
    assert model(x).shape == (4, 10)
    assert model.features(x).shape == (4, model.feature_dim)
    model.train()
    model(torch.randn(2, *shape)).sum().backward()


def test_lenet_matches_niid_bench_shapes():
    model = build_model("lenet", (1, 28, 28), 10)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(256, 120), (120, 84), (84, 10)]


def test_cnn4_has_64_dim_embedding_on_28x28():
    assert build_model("cnn4", (1, 28, 28), 10).feature_dim == 64


def test_same_seed_same_weights_and_no_step_counters():
    a, b = get_weights(build_model("resnet8", (1, 28, 28), 10, 3)), get_weights(build_model("resnet8", (1, 28, 28), 10, 3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.endswith("num_batches_tracked") for k in a)


def test_unknown_model():
    with pytest.raises(ConfigError, match="model.name"):
        build_model("vgg", (1, 28, 28), 10)
