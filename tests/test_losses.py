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


def test_logit_adjust_uses_prior():
    prior = [16 / 18, 1 / 18, 1 / 18]
    shifted = [[v + 0.5 * math.log(p) for v, p in zip(row, prior)] for row in LOGITS.tolist()]
    assert loss("logit_adjust", tau=0.5) == pytest.approx(ce_by_hand(shifted, [0, 2]))


def test_focal_reduces_to_ce_at_gamma_zero_and_downweights_easy():
    assert loss("focal", gamma=0.0) == pytest.approx(loss("ce"))
    p = F.softmax(LOGITS, 1)[[0, 1], [0, 2]]
    by_hand = float((-(1 - p) ** 2 * p.log()).mean())
    assert loss("focal", gamma=2.0) == pytest.approx(by_hand)


def test_fedlc_formula_with_client_counts():
    # z_j - tau * n_j^(-1/4): n = (16, 1, 1->clamped) -> offsets 0.5*(0.5, 1, 1)
    calibrated = fedlc_calibrated_logits(LOGITS, COUNTS, 0.5)
    expected = LOGITS - torch.tensor([0.25, 0.5, 0.5])
    assert torch.allclose(calibrated, expected)
    assert torch.isfinite(calibrated).all()
    assert loss("fedlc", tau=0.5) == pytest.approx(ce_by_hand(expected.tolist(), [0, 2]))


def test_fedrs_scales_missing_class_logits():
    scaled = (LOGITS * torch.tensor([1.0, 1.0, 0.5])).tolist()
    assert loss("fedrs", alpha=0.5) == pytest.approx(ce_by_hand(scaled, [0, 2]))


def test_ldam_margins_and_drw_schedule():
    margins = ldam_margins(COUNTS, 0.5)
    assert torch.allclose(margins, torch.tensor([0.25, 0.5, 0.5]))
    shifted = (30 * (LOGITS - torch.tensor([[0.25, 0, 0], [0, 0, 0.5]]))).tolist()
    assert loss("ldam_drw", progress=0.1) == pytest.approx(ce_by_hand(shifted, [0, 2]), rel=1e-5)
    weights = drw_weights(COUNTS, 0.9999)
    assert weights.sum() == pytest.approx(3.0) and weights[1] > weights[0]
    late = loss("ldam_drw", progress=0.9)
    assert late != pytest.approx(loss("ldam_drw", progress=0.1))


def test_unknown_loss_param():
    with pytest.raises(ConfigError, match="train.loss.params.gama"):
        build_loss("focal", {"gama": 1.0})
