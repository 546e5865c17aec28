"""BADGE (Ash et al., ICLR 2020): k-means++ seeding on the global model's gradient embeddings."""

import numpy as np

from clients.samplers.base import (NoParams, QueryContext, SamplerResult, SamplerSpec, gradient_embedding,
                                   kmeanspp_seeding, query_size)


def badge_sampler(ctx: QueryContext, budget: int, params: NoParams) -> SamplerResult:
    """min(budget, Nu) seeds of k-means++ on g(x) with ŷ = argmax of the global softmax."""
    emb = gradient_embedding(ctx.global_probs_u, ctx.global_feats_u)
    return SamplerResult(kmeanspp_seeding(emb, query_size(ctx, budget), np.random.default_rng(ctx.seed)))


SAMPLER = SamplerSpec("badge", badge_sampler)
