"""FedRS (Li & Zhan, KDD 2021): logits of classes missing on the client are scaled by α."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clients.losses.base import LossContext, LossSpec


@dataclass
class FedRSParams:
    """alpha: scale α ∈ (0, 1] of the logits of locally missing classes."""

    alpha: float = 0.5


def fedrs(logits: torch.Tensor, targets: torch.Tensor, ctx: LossContext, params: FedRSParams) -> torch.Tensor:
    """CE with restricted softmax."""
    scale = torch.where(ctx.class_counts > 0, 1.0, params.alpha).to(logits.device)
    return F.cross_entropy(logits * scale, targets)


LOSS = LossSpec("fedrs", fedrs, FedRSParams)
