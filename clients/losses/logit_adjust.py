"""Logit-adjusted loss (Menon et al., ICLR 2021): CE on z_j + τ log π_j (client prior)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clients.losses.base import LossContext, LossSpec


@dataclass
class LogitAdjustParams:
    """tau: strength τ of the adjustment."""

    tau: float = 1.0


def logit_adjust(logits: torch.Tensor, targets: torch.Tensor, ctx: LossContext, params: LogitAdjustParams) -> torch.Tensor:
    """CE on logits plus τ log prior; predict with plain logits."""
    return F.cross_entropy(logits + params.tau * torch.log(ctx.prior), targets)


LOSS = LossSpec("logit_adjust", logit_adjust, LogitAdjustParams)
