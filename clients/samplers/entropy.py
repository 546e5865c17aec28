"""Entropy sampling: the b samples with the largest −Σ p log p under the global model."""

from clients.samplers.base import NoParams, QueryContext, SamplerResult, SamplerSpec, entropy, query_size, top_k


def entropy_sampler(ctx: QueryContext, budget: int, params: NoParams) -> SamplerResult:
    """Top min(budget, Nu) by global-model entropy."""
    return SamplerResult(top_k(entropy(ctx.global_probs_u), query_size(ctx, budget)))


SAMPLER = SamplerSpec("entropy", entropy_sampler)
