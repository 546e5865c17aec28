"""LoGo (Kim et al., CVPR 2023): cluster with the local-only model, pick by the global model's uncertainty.

Macro step: k-means with b clusters on the LOCAL model's gradient embeddings (ŷ = its own
argmax); as in the authors' code only the predicted class's block (1 − p_ŷ)·φ(x) (D-dim) is
kept, not BADGE's full C·D vector. Micro step: in each cluster the sample with the largest
GLOBAL-model entropy. Clusters left empty are made up with the most uncertain samples not
yet chosen (the authors' code instead goes round the clusters taking their next most
uncertain). Our k-means is a small deterministic one (BADGE-style k-means++ init from the
seed, ≤ ``max_iters`` Lloyd steps, one run) instead of sklearn's multi-start KMeans.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from clients.samplers.base import (QueryContext, SamplerResult, SamplerSpec, entropy,
                                   kmeanspp_seeding, query_size, require, squared_distances, top_k)
from fedimb.config import ConfigError


@dataclass
class LogoParams:
    """max_iters: cap on Lloyd iterations of the k-means."""

    max_iters: int = 20

    def check(self, prefix: str) -> None:
        """At least one Lloyd iteration."""
        if self.max_iters < 1:
            raise ConfigError(f"{prefix}.max_iters", f"must be >= 1, got {self.max_iters}")


def predicted_block_embedding(probs: Tensor, feats: Tensor) -> Tensor:
    """(1 − max_c p_c)·φ(x): the ŷ block of the gradient embedding, the other blocks dropped."""
    return (1.0 - probs.double().max(dim=1).values)[:, None] * feats.double()


def kmeans(x: Tensor, k: int, seed: int, max_iters: int = 20) -> Tensor:
    """Cluster index per row of ``x``: k-means++ init from ``seed``, then Lloyd steps until assignments settle."""
    x = x.double()
    centres = x[torch.from_numpy(kmeanspp_seeding(x, k, np.random.default_rng(seed)))].clone()
    assign = squared_distances(x, centres).argmin(dim=1)
    for _ in range(max_iters):
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        sizes = torch.bincount(assign, minlength=k).double()
        # An emptied cluster keeps its old centre rather than jumping somewhere arbitrary.
        centres = torch.where(sizes[:, None] > 0, sums / sizes.clamp(min=1.0)[:, None], centres)
        new_assign = squared_distances(x, centres).argmin(dim=1)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return assign


def most_uncertain_per_cluster(assign: Tensor, uncertainty: Tensor, k: int) -> list[int]:
    """For each non-empty cluster, the member with the largest uncertainty (lower position on ties)."""
    picks = []
    for c in range(k):
        members = torch.nonzero(assign == c).flatten()
        if members.numel() > 0:
            picks.append(int(members[top_k(uncertainty[members], 1)[0]]))
    return picks


def logo_sampler(ctx: QueryContext, budget: int, params: LogoParams) -> SamplerResult:
    """min(budget, Nu) positions: one per local-model cluster, the globally most uncertain."""
    k = query_size(ctx, budget)
    if k == 0:
        return SamplerResult(np.empty(0, dtype=np.int64))
    emb = predicted_block_embedding(require(ctx.local_probs_u, "local_probs_u"),
                                    require(ctx.local_feats_u, "local_feats_u"))
    uncertainty = entropy(ctx.global_probs_u)
    picks = most_uncertain_per_cluster(kmeans(emb, k, ctx.seed, params.max_iters), uncertainty, k)
    empty_clusters = k - len(picks)
    if empty_clusters > 0:
        rest = uncertainty.clone()
        rest[picks] = -np.inf
        picks.extend(int(i) for i in top_k(rest, k - len(picks)))
    return SamplerResult(np.asarray(picks, dtype=np.int64), {"empty_clusters": float(empty_clusters)})


SAMPLER = SamplerSpec("logo", logo_sampler, LogoParams, needs_local_model=True)
