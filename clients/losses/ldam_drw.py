"""LDAM with deferred re-weighting (Cao et al., NeurIPS 2019).

Margins m_j ∝ n_j^(−1/4), scaled so the largest is ``max_margin``; loss CE(s·(z − m_y e_y)).
From ``drw_start`` (share of the federation's rounds) on, classes are weighted by
(1 − β)/(1 − β^{n_j}), normalised to sum to C.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clients.losses.base import LossContext, LossSpec


@dataclass
class LdamDrwParams:
    """max_margin, scale s, beta β of the class-balanced weights, drw_start in [0, 1]."""

    max_margin: float = 0.5
    scale: float = 30.0
    beta: float = 0.9999
    drw_start: float = 0.8


def ldam_margins(counts: torch.Tensor, max_margin: float) -> torch.Tensor:
    """m_j = max_margin · (n_j^(−1/4) / max_k n_k^(−1/4)), absent classes as one sample."""
    raw = counts.clamp(min=1.0).pow(-0.25)
    return raw * (max_margin / raw.max())


def drw_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Class-balanced weights (1 − β)/(1 − β^{n_j}), normalised to sum to C."""
    weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta), counts.clamp(min=1.0)))
    return weights * (len(counts) / weights.sum())


def ldam_drw(logits: torch.Tensor, targets: torch.Tensor, ctx: LossContext, params: LdamDrwParams) -> torch.Tensor:
    """LDAM loss; re-weighted once the federation passes ``drw_start``."""
    margins = ldam_margins(ctx.class_counts, params.max_margin).to(logits.device)
    shifted = logits - F.one_hot(targets, logits.shape[1]) * margins[targets][:, None]
    weight = drw_weights(ctx.class_counts, params.beta).to(logits.device) if ctx.progress >= params.drw_start else None
    return F.cross_entropy(params.scale * shifted, targets, weight=weight)


LOSS = LossSpec("ldam_drw", ldam_drw, LdamDrwParams)
