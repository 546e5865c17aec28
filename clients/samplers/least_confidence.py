"""Least-confidence sampling: the b samples with the smallest max_c p_c under the global model."""

from clients.samplers.base import NoParams, QueryContext, SamplerResult, SamplerSpec, query_size, top_k


def least_confidence_sampler(ctx: QueryContext, budget: int, params: NoParams) -> SamplerResult:
    """Bottom min(budget, Nu) by the top softmax probability."""
    return SamplerResult(top_k(-ctx.global_probs_u.double().max(dim=1).values, query_size(ctx, budget)))


SAMPLER = SamplerSpec("least_confidence", least_confidence_sampler)
