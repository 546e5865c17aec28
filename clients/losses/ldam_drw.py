"""LDAM with deferred re-weighting (Cao et al., NeurIPS 2019).

The model scores cosines z_j = cos(f, w_j) (``model.head=auto`` gives LDAM's normalised head);
margins m_j ∝ n_j^(−1/4) over the classes the client holds, scaled so the largest is
``max_margin``; loss CE(s·(z − m_y e_y)). From ``drw_start`` (share of the federation's rounds)
on, the held classes are weighted by (1 − β)/(1 − β^{n_j}), normalised to sum to their number.
A class the client does not hold is never a target: it gets no margin and no weight, and does not
set the scale of the others'.
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
    """m_j = max_margin · n_j^(−1/4) / max_{k held} n_k^(−1/4) for held classes (n_j > 0), 0 otherwise."""
    held = counts > 0
    raw = torch.where(held, counts.clamp(min=1.0).pow(-0.25), torch.zeros_like(counts))
    return raw * (max_margin / raw.max()) if bool(held.any()) else raw


def drw_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """(1 − β)/(1 − β^{n_j}) for held classes, normalised to sum to their number; 0 for the others."""
    held = counts > 0
    raw = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta), counts.clamp(min=1.0)))
    weights = torch.where(held, raw, torch.zeros_like(raw))
    return weights * (int(held.sum()) / weights.sum()) if bool(held.any()) else weights


def ldam_drw(logits: torch.Tensor, targets: torch.Tensor, ctx: LossContext, params: LdamDrwParams) -> torch.Tensor:
    """LDAM loss; re-weighted once the federation passes ``drw_start``."""
    margins = ldam_margins(ctx.class_counts, params.max_margin).to(logits.device)
    shifted = logits - F.one_hot(targets, logits.shape[1]) * margins[targets][:, None]
    weight = drw_weights(ctx.class_counts, params.beta).to(logits.device) if ctx.progress >= params.drw_start else None
    return F.cross_entropy(params.scale * shifted, targets, weight=weight)


LOSS = LossSpec("ldam_drw", ldam_drw, LdamDrwParams)
