"""FedLC (Zhang et al., ICML 2022): CE on calibrated logits z_j − τ·n_{k,j}^(−1/4).

n_{k,j} are the client's OWN counts (not global ones), and the true class stays in the
softmax denominator like every other class — the paper's formula, unlike two public
implementations. A class absent on the client counts as one sample, so its logit is
pushed down by τ rather than to −∞.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clients.losses.base import LossContext, LossSpec


@dataclass
class FedLCParams:
    """tau: calibration strength τ."""

    tau: float = 0.5


def fedlc_calibrated_logits(logits: torch.Tensor, counts: torch.Tensor, tau: float) -> torch.Tensor:
    """z_j − τ·n_j^(−1/4)."""
    return logits - tau * counts.clamp(min=1.0).pow(-0.25).to(logits.device)


def fedlc(logits: torch.Tensor, targets: torch.Tensor, ctx: LossContext, params: FedLCParams) -> torch.Tensor:
    """CE on FedLC's calibrated logits."""
    return F.cross_entropy(fedlc_calibrated_logits(logits, ctx.class_counts, params.tau), targets)


LOSS = LossSpec("fedlc", fedlc, FedLCParams)
