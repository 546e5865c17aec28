"""Focal loss (Lin et al., ICCV 2017): −(1 − p_y)^γ log p_y. A baseline, not a default."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clients.losses.base import LossContext, LossSpec


@dataclass
class FocalParams:
    """gamma: focusing exponent γ."""

    gamma: float = 2.0


def focal(logits: torch.Tensor, targets: torch.Tensor, ctx: LossContext, params: FocalParams) -> torch.Tensor:
    """Mean focal loss."""
    log_p = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    return (-(1.0 - log_p.exp()).pow(params.gamma) * log_p).mean()


LOSS = LossSpec("focal", focal, FocalParams)
