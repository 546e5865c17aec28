"""Balanced softmax (Ren et al., NeurIPS 2020): CE on z_j + log n_j with the client's counts."""

import torch
import torch.nn.functional as F

from clients.losses.base import LossContext, LossSpec, NoParams


def balanced_softmax(logits: torch.Tensor, targets: torch.Tensor, ctx: LossContext, params: NoParams) -> torch.Tensor:
    """CE on logits shifted by log counts; a locally absent class counts as one sample, not −∞."""
    return F.cross_entropy(logits + torch.log(ctx.class_counts.clamp(min=1.0)), targets)


LOSS = LossSpec("balanced_softmax", balanced_softmax)
