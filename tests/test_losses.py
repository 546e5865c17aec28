"""Each loss against its formula on a hand-computed case."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clients.losses import LOSSES, LossContext, build_loss
from clients.losses.fedlc import fedlc_calibrated_logits
from clients.losses.ldam_drw import drw_weights, ldam_margins
from fedimb.config import ConfigError

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
TARGETS = torch.tensor([0, 2])
COUNTS = torch.tensor([16.0, 1.0, 0.0])  # class 2 absent on this client


def loss(name: str, progress: float = 0.0, **params) -> float:
    fn, p = build_loss(name, params)
    return float(fn(LOGITS, TARGETS, LossContext(COUNTS, progress), p))


def ce_by_hand(logits: list[list[float]], targets: list[int]) -> float:
    total = 0.0
    for row, t in zip(logits, targets):
        total += -row[t] + math.log(sum(math.exp(v) for v in row))
    return total / len(targets)


def test_registry():
    assert {"ce", "focal", "balanced_softmax", "logit_adjust", "ldam_drw", "fedlc", "fedrs"} <= set(LOSSES)


def test_ce():
    assert loss("ce") == pytest.approx(ce_by_hand(LOGITS.tolist(), [0, 2]))


def test_balanced_softmax_adds_log_counts_with_absent_class_as_one():
    shift = [math.log(16), 0.0, 0.0]
    shifted = [[v + s for v, s in zip(row, shift)] for row in LOGITS.tolist()]
    assert loss("balanced_softmax") == pytest.approx(ce_by_hand(shifted, [0, 2]))


def test_logit_adjust_uses_the_global_prior_by_default():
    global_counts = torch.tensor([30.0, 60.0, 10.0])
    fn, params = build_loss("logit_adjust", {"tau": 0.5})
    got = float(fn(LOGITS, TARGETS, LossContext(COUNTS, global_counts=global_counts), params))
    prior = [0.3, 0.6, 0.1]
    shifted = [[v + 0.5 * math.log(p) for v, p in zip(row, prior)] for row in LOGITS.tolist()]
    assert got == pytest.approx(ce_by_hand(shifted, [0, 2]))
    with pytest.raises(RuntimeError, match="global class counts"):
        fn(LOGITS, TARGETS, LossContext(COUNTS), params)


def test_logit_adjust_with_the_client_prior_at_tau_one_is_balanced_softmax():
    prior = [16 / 18, 1 / 18, 1 / 18]
    shifted = [[v + 0.5 * math.log(p) for v, p in zip(row, prior)] for row in LOGITS.tolist()]
    assert loss("logit_adjust", tau=0.5, prior="client") == pytest.approx(ce_by_hand(shifted, [0, 2]))
    assert loss("logit_adjust", tau=1.0, prior="client") == pytest.approx(loss("balanced_softmax"))
    with pytest.raises(ConfigError, match="train.loss.params.prior"):
        build_loss("logit_adjust", {"prior": "local"})


def test_focal_reduces_to_ce_at_gamma_zero_and_downweights_easy():
    assert loss("focal", gamma=0.0) == pytest.approx(loss("ce"))
    p = F.softmax(LOGITS, 1)[[0, 1], [0, 2]]
    by_hand = float((-(1 - p) ** 2 * p.log()).mean())
    assert loss("focal", gamma=2.0) == pytest.approx(by_hand)


def test_fedlc_formula_with_client_counts_both_denominators():
    # z_j - tau * n_j^(-1/4): n = (16, 1, 1->clamped) -> offsets 0.5*(0.5, 1, 1)
    calibrated = fedlc_calibrated_logits(LOGITS, COUNTS, 0.5)
    expected = LOGITS - torch.tensor([0.25, 0.5, 0.5])
    assert torch.allclose(calibrated, expected)
    assert torch.isfinite(calibrated).all()
    # row 0, y = 0: -(2 - 0.25) + log(e^0 + e^-1.5); row 1, y = 2: -(-0.5) + log(e^-0.25 + e^0.5)
    by_hand = (-1.75 + math.log(1 + math.exp(-1.5)) + 0.5 + math.log(math.exp(-0.25) + math.exp(0.5))) / 2
    assert loss("fedlc", tau=0.5, denominator="others") == pytest.approx(by_hand)
    assert loss("fedlc", tau=0.5) == pytest.approx(ce_by_hand(expected.tolist(), [0, 2]))  # "all": CE on z'
    with pytest.raises(ConfigError, match="train.loss.params.denominator"):
        build_loss("fedlc", {"denominator": "some"})


def test_fedrs_scales_missing_class_logits():
    scaled = (LOGITS * torch.tensor([1.0, 1.0, 0.5])).tolist()
    assert loss("fedrs", alpha=0.5) == pytest.approx(ce_by_hand(scaled, [0, 2]))


def test_ldam_margins_and_drw_weights_cover_the_held_classes_only():
    held = torch.tensor([16.0, 1.0, 0.0])  # class 2 absent: no margin, no weight, no say in the scale
    assert torch.allclose(ldam_margins(held, 0.5), torch.tensor([0.25, 0.5, 0.0]))
    raw = [(1 - 0.9999) / (1 - 0.9999 ** 16), 1.0]
    weights = drw_weights(held, 0.9999)
    assert torch.allclose(weights, torch.tensor([2 * raw[0] / sum(raw), 2 * raw[1] / sum(raw), 0.0]))


def test_ldam_drw_scales_cosines_with_margins_and_switches_drw_on_late():
    cosines = torch.tensor([[0.9, 0.1, -0.2], [0.3, 0.6, 0.0]])
    targets = torch.tensor([0, 1])
    held = torch.tensor([16.0, 1.0, 0.0])
    fn, params = build_loss("ldam_drw", {})
    early = float(fn(cosines, targets, LossContext(held, 0.1), params))
    shifted = (30 * (cosines - torch.tensor([[0.25, 0, 0], [0, 0.5, 0]]))).tolist()
    assert early == pytest.approx(ce_by_hand(shifted, [0, 1]), rel=1e-5)
    w = drw_weights(held, 0.9999).tolist()
    rows = [-r[t] + math.log(sum(math.exp(v) for v in r)) for r, t in zip(shifted, [0, 1])]
    late = float(fn(cosines, targets, LossContext(held, 0.9), params))
    assert late == pytest.approx((w[0] * rows[0] + w[1] * rows[1]) / (w[0] + w[1]), rel=1e-5)


def test_ldam_gets_the_cosine_head():
    from fedimb.config import load_config
    from fedimb.models import CosineHead, build_configured_model

    cfg = load_config(None, ["data.dataset=digits", "train.loss.name=ldam_drw"])
    model = build_configured_model(cfg, (1, 8, 8), 3)
    assert isinstance(model.head, CosineHead)
    x = torch.randn(4, 1, 8, 8)
    features = model.features(x)
    w = model.head.weight.detach()
    by_hand = (features / features.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
    assert torch.allclose(model(x), by_hand, atol=1e-6)
    assert isinstance(build_configured_model(load_config(None, ["data.dataset=digits"]), (1, 8, 8), 3).head,
                      torch.nn.Linear)


def test_unknown_loss_param():
    with pytest.raises(ConfigError, match="train.loss.params.gama"):
        build_loss("focal", {"gama": 1.0})
