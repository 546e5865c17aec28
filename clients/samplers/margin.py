"""Margin sampling: the b samples with the smallest gap p1 − p2 between the two top classes (global model)."""

from clients.samplers.base import NoParams, QueryContext, SamplerResult, SamplerSpec, query_size, top_k


def margin_sampler(ctx: QueryContext, budget: int, params: NoParams) -> SamplerResult:
    """Bottom min(budget, Nu) by p1 − p2."""
    top2 = ctx.global_probs_u.double().topk(2, dim=1).values
    return SamplerResult(top_k(-(top2[:, 0] - top2[:, 1]), query_size(ctx, budget)))


SAMPLER = SamplerSpec("margin", margin_sampler)
