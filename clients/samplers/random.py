"""Random sampling: b positions drawn uniformly without replacement, from the context's seed."""

import numpy as np

from clients.samplers.base import NoParams, QueryContext, SamplerResult, SamplerSpec, query_size


def random_sampler(ctx: QueryContext, budget: int, params: NoParams) -> SamplerResult:
    """min(budget, Nu) distinct positions chosen uniformly at random."""
    rng = np.random.default_rng(ctx.seed)
    picks = rng.choice(ctx.num_unlabelled, size=query_size(ctx, budget), replace=False)
    return SamplerResult(picks.astype(np.int64))


SAMPLER = SamplerSpec("random", random_sampler)
