"""Plain cross-entropy."""

import torch
import torch.nn.functional as F

from clients.losses.base import LossContext, LossSpec, NoParams


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ctx: LossContext, params: NoParams) -> torch.Tensor:
    """Mean cross-entropy."""
    return F.cross_entropy(logits, targets)


LOSS = LossSpec("ce", cross_entropy)
