"""Client losses by name: one file each, one line here."""

from __future__ import annotations

from typing import Any

from clients.losses import balanced_softmax, ce, fedlc, fedrs, focal, ldam_drw, logit_adjust
from clients.losses.base import LossContext, LossFn, LossSpec
from fedimb.config import build_params, registered

LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in (
    ce.LOSS,
    focal.LOSS,
    balanced_softmax.LOSS,
    logit_adjust.LOSS,
    ldam_drw.LOSS,
    fedlc.LOSS,
    fedrs.LOSS,
)}

__all__ = ["LOSSES", "LossContext", "LossFn", "LossSpec", "build_loss"]


def build_loss(name: str, params: dict[str, Any]) -> tuple[LossFn, Any]:
    """The loss function registered as ``name`` and its checked params."""
    spec = registered(LOSSES, name, "train.loss.name")
    return spec.fn, build_params(spec.params_cls, params, "train.loss.params")
