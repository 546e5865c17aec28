"""Core-set (Sener & Savarese, ICLR 2018): greedy furthest-first on the global model's penultimate features.

The labelled samples are the initial centres; distance is squared Euclidean (same argmax as
Euclidean, so the same picks as the LoGo/IFAL code).
"""

from clients.samplers.base import NoParams, QueryContext, SamplerResult, SamplerSpec, k_center_greedy, query_size


def coreset_sampler(ctx: QueryContext, budget: int, params: NoParams) -> SamplerResult:
    """min(budget, Nu) positions by k-centre greedy with labelled samples as centres."""
    return SamplerResult(k_center_greedy(ctx.global_feats_u, ctx.global_feats_l, query_size(ctx, budget)))


SAMPLER = SamplerSpec("coreset", coreset_sampler)
