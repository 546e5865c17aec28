"""KAFAL (Cao et al., ICCV 2023), knowledge-specialised active sampling: largest global–local discrepancy.

Score = ½[KL(p_l ‖ p_g) + KL(p_g ‖ p_l)] per unlabelled sample, top b. With
``weight_by_local_distribution`` both softmaxes are first tilted by the client's class
distribution w (the authors add log w to both logits, i.e. p ← p·w / Σ p·w), which
"intensifies" the local model's specialised knowledge. We take w from the client's labelled
counts, an absent class counting as one sample so that log w stays finite. The local model is
the client's own after its last local training (``local_model="last_round"``), as in IFAL's code.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from clients.samplers.base import QueryContext, SamplerResult, SamplerSpec, query_size, require, top_k


@dataclass
class KafalParams:
    """weight_by_local_distribution: tilt both softmaxes by the local class distribution first."""

    weight_by_local_distribution: bool = True


def local_class_distribution(labels_l: Tensor, num_classes: int) -> Tensor:
    """Labelled class frequencies with every count at least one."""
    counts = torch.bincount(labels_l.long(), minlength=num_classes).double().clamp(min=1.0)
    return counts / counts.sum()


def symmetric_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Row-wise ½[KL(p‖q) + KL(q‖p)] from log-probabilities."""
    return 0.5 * ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=1)


def kafal_scores(global_probs: Tensor, local_probs: Tensor, weights: Tensor | None) -> Tensor:
    """Symmetric KL between the (optionally w-tilted) global and local softmaxes."""
    # Going through log space keeps the tilt exact: softmax(z + log w) = p·w / Σ p·w.
    log_g = global_probs.double().clamp(min=1e-300).log()
    log_l = local_probs.double().clamp(min=1e-300).log()
    if weights is not None:
        log_g = torch.log_softmax(log_g + weights.log(), dim=1)
        log_l = torch.log_softmax(log_l + weights.log(), dim=1)
    return symmetric_kl(log_l, log_g)


def kafal_sampler(ctx: QueryContext, budget: int, params: KafalParams) -> SamplerResult:
    """Top min(budget, Nu) by global–local symmetric KL."""
    weights = local_class_distribution(ctx.labels_l, ctx.num_classes) if params.weight_by_local_distribution else None
    scores = kafal_scores(ctx.global_probs_u, require(ctx.local_probs_u, "local_probs_u"), weights)
    return SamplerResult(top_k(scores, query_size(ctx, budget)))


# IFAL's reference code takes the client's model as its last federated round left it
SAMPLER = SamplerSpec("kafal", kafal_sampler, KafalParams, needs_local_model=True, local_model="last_round")
