"""Active-learning samplers on small hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clients.samplers import SAMPLERS, QueryContext, build_sampler
from clients.samplers.base import (balanced_subset_mean_probs, entropy, gradient_embedding, k_center_greedy,
                                   kmeanspp_seeding)
from clients.samplers.fairfal import class_quotas, divergence, model_choice, prototype_pseudo_labels
from fedimb.config import ConfigError


def random_ctx(nu: int = 30, nl: int = 12, c: int = 4, d: int = 3, seed: int = 0,
               labels: list[int] | None = None) -> QueryContext:
    """A context with random softmaxes/features for the global and local models."""
    g = torch.Generator().manual_seed(seed)
    probs = lambda n: torch.softmax(2 * torch.randn(n, c, generator=g), dim=1)  # noqa: E731
    feats = lambda n: torch.randn(n, d, generator=g)  # noqa: E731
    labels_l = torch.tensor(labels) if labels is not None else torch.arange(nl) % c
    nl = len(labels_l)
    return QueryContext(c, probs(nu), feats(nu), probs(nl), feats(nl), labels_l,
                        local_probs_u=probs(nu), local_feats_u=feats(nu), local_probs_l=probs(nl),
                        local_feats_l=feats(nl), seed=seed)


def run(name: str, ctx: QueryContext, budget: int, **params) -> np.ndarray:
    spec, p = build_sampler(name, params)
    return spec.fn(ctx, budget, p).indices


def test_registry_and_errors():
    assert set(SAMPLERS) == {"random", "entropy", "margin", "least_confidence", "coreset", "badge", "logo",
                             "kafal", "fairfal"}
    assert {n for n, s in SAMPLERS.items() if s.needs_local_model} == {"logo", "kafal", "fairfal"}
    with pytest.raises(ConfigError, match="active_learning.sampler: 'nope'.*choose one of"):
        build_sampler("nope", {})
    with pytest.raises(ConfigError, match="active_learning.sampler_params"):
        build_sampler("fairfal", {"bogus": 1})
    with pytest.raises(ConfigError, match="kappa"):
        build_sampler("fairfal", {"kappa": 0.5})
    assert build_sampler("fairfal", {"delta": 0.6})[1].delta == 0.6


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("budget", [0, 7, 30, 100])
def test_count_distinct_valid_deterministic(name: str, budget: int):
    ctx = random_ctx(labels=[0, 0, 0, 1, 2, 2])  # class 3 unlabelled: empty prototype bucket
    picks = run(name, ctx, budget)
    assert len(picks) == min(budget, 30) == len(set(picks.tolist()))
    assert picks.dtype == np.int64 and (picks >= 0).all() and (picks < 30).all()
    assert np.array_equal(picks, run(name, random_ctx(labels=[0, 0, 0, 1, 2, 2]), budget))


# rows: a confident, b tie on top-2, c near-uniform, d close top-2, e confident-ish with flat tail
HAND = torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.4, 0.2], [0.34, 0.33, 0.33], [0.5, 0.45, 0.05], [0.6, 0.2, 0.2]])


@pytest.mark.parametrize("name,expected", [("entropy", [2, 1, 4]), ("margin", [1, 2, 3]),
                                           ("least_confidence", [2, 1, 3])])
def test_uncertainty_samplers_hand(name: str, expected: list[int]):
    ctx = QueryContext(3, HAND, torch.zeros(5, 2), HAND[:1], torch.zeros(1, 2), torch.tensor([0]))
    assert run(name, ctx, 3).tolist() == expected


def test_entropy_normalised():
    h = entropy(torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert h.tolist() == pytest.approx([math.log(2) / math.log(4), 0.0])


def test_gradient_embedding_hand():
    probs, feats = torch.tensor([[0.7, 0.3]]), torch.tensor([[1.0, 2.0]])
    assert gradient_embedding(probs, feats).tolist()[0] == pytest.approx([0.3, 0.6, -0.3, -0.6])
    assert gradient_embedding(probs, feats, torch.tensor([1])).tolist()[0] == pytest.approx([-0.7, -1.4, 0.7, 1.4])
    assert gradient_embedding(probs[:0], feats[:0]).shape == (0, 4)


def test_k_center_greedy_1d():
    cands = torch.tensor([[1.0], [2.0], [5.0], [9.0]])
    # From centre 0: 9 (81), then min(d to 0, d to 9): 1→1, 2→4, 5→16 → 5, then 2 (4).
    assert k_center_greedy(cands, torch.tensor([[0.0]]), 2).tolist() == [3, 2]
    assert k_center_greedy(cands, torch.tensor([[0.0]]), 3).tolist() == [3, 2, 1]
    assert sorted(k_center_greedy(cands, torch.tensor([[0.0]]), 9).tolist()) == [0, 1, 2, 3]
    # No centres: start farthest from the mean 3.25 (point 10), then 0; or from ``start``.
    free = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    assert k_center_greedy(free, torch.zeros(0, 1), 2).tolist() == [3, 0]
    assert k_center_greedy(free, torch.zeros(0, 1), 2, start=1).tolist() == [1, 3]


def test_kmeanspp_seeding_distinct_even_on_duplicates():
    picks = kmeanspp_seeding(torch.zeros(5, 2), 3, np.random.default_rng(0))
    assert len(set(picks.tolist())) == 3
    far = torch.tensor([[0.0, 0.0], [0.0, 0.1], [50.0, 0.0]])
    assert kmeanspp_seeding(far, 1, np.random.default_rng(0)).tolist() == [2]  # largest norm first


@pytest.mark.parametrize("sizes,budget,expected", [
    ([10, 1, 0, 5], 12, [6, 1, 0, 5]),  # 3 each; caps free 2+3; round-robin 0,3,0,3,0
    ([3, 3, 3, 3], 6, [2, 2, 1, 1]),  # remainder 2 to the largest buckets, lower class on ties
    ([1, 8, 4, 0], 7, [1, 3, 3, 0]),  # 1 each + remainder to 1,2,0; caps free 1+1 → 1, 2
    ([6, 3, 0, 0], 8, [5, 3, 0, 0]),  # 2 each, 4 freed: 0,1,0,(1 full),0
    ([2, 0, 1], 10, [2, 0, 1]),  # budget above the total: everything
    ([4, 4], 0, [0, 0]),
])
def test_class_quotas(sizes: list[int], budget: int, expected: list[int]):
    quotas = class_quotas(np.array(sizes), budget)
    assert quotas.tolist() == expected
    assert quotas.sum() == min(budget, sum(sizes)) and (quotas <= np.array(sizes)).all()


def test_class_quotas_sum_random():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 20, size=int(rng.integers(1, 8)))
        budget = int(rng.integers(0, 60))
        quotas = class_quotas(sizes, budget)
        assert quotas.sum() == min(budget, sizes.sum()) and (0 <= quotas).all() and (quotas <= sizes).all()


def pi_ctx(gamma_bar: float | None = None) -> QueryContext:
    """Class 0 twice, class 1 once, class 2 absent: π_g = [0.3, 0.5, 0.2], π_l = [0.5, 0.35, 0.15]."""
    gl = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.3, 0.3], [0.1, 0.7, 0.2]])
    ll = torch.tensor([[0.8, 0.1, 0.1], [0.8, 0.1, 0.1], [0.2, 0.6, 0.2]])
    ctx = random_ctx(nu=10, c=3, d=2, labels=[0, 0, 1])
    ctx.global_probs_l, ctx.local_probs_l, ctx.gamma_bar = gl, ll, gamma_bar
    return ctx


def test_fairfal_gamma_divergence_and_choice():
    ctx = pi_ctx()
    pi_g = balanced_subset_mean_probs(ctx.global_probs_l, ctx.labels_l, 3)
    assert pi_g.tolist() == pytest.approx([0.3, 0.5, 0.2])  # not the plain mean [0.367, 0.433, 0.2]
    spec, params = build_sampler("fairfal", {})
    report = spec.fn(ctx, 4, params).report
    d = (0.2 / 0.8 + 0.15 / 0.85 + 0.05 / 0.35) / 3
    assert report["gamma"] == pytest.approx(0.3 / 0.5)  # class 2 absent locally: left out
    assert report["divergence"] == pytest.approx(d)
    assert report["score"] == pytest.approx(1 - 0.5 * (d + 0.6))  # own γ stands in for γ̄
    assert report["uses_global"] == 0.0 and report["embedding_uses_global"] == 0.0
    shared = spec.fn(pi_ctx(gamma_bar=0.1), 4, params).report
    assert shared["score"] == pytest.approx(1 - 0.5 * (d + 0.1)) and shared["uses_global"] == 1.0
    assert shared["embedding_uses_global"] == 1.0 and shared["gamma"] == pytest.approx(0.6)
    assert divergence(torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.5, 0.5, 0.0])) == 0.0


def test_model_choice_flips_with_delta():
    assert model_choice(0.2, 0.2, 0.75) == (pytest.approx(0.8), True)
    assert model_choice(0.2, 0.2, 0.85)[1] is False


def test_fairfal_uncertainty_model_follows_choice():
    # One bucket, budget 1, κ = 1: the pick is the most uncertain sample under the chosen model.
    certain, unsure = [0.95, 0.05], [0.5, 0.5]
    ctx = QueryContext(2, torch.tensor([unsure, certain, certain, certain]), torch.ones(4, 2),
                       torch.tensor([certain]), torch.ones(1, 2), torch.tensor([0]),
                       local_probs_u=torch.tensor([certain, certain, certain, unsure]),
                       local_probs_l=torch.tensor([certain]), gamma_bar=0.2)
    assert run("fairfal", ctx, 1, kappa=1.0, delta=0.0).tolist() == [0]
    assert run("fairfal", ctx, 1, kappa=1.0, delta=1.0).tolist() == [3]


def test_prototype_pseudo_labels_2d():
    feats_l = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])  # μ_0 = [.5, .5], μ_1 = [1, 0]; class 2 absent
    labels_l = torch.tensor([0, 0, 1])
    feats_u = torch.tensor([[1.0, 0.5], [0.0, 1.0], [1.0, -0.2], [-1.0, -0.9]])
    # ⟨z, μ⟩: [1, .5] → .671 vs .894; [-1, -.9] → −.706 vs −.743 (an empty class 2 would score 0)
    assert prototype_pseudo_labels(feats_u, feats_l, labels_l, 3, cosine=False).tolist() == [1, 0, 1, 0]
    # cosine to μ/|μ|: [1, .5] → .949 vs .894; [-1, -.9] → −.999 vs −.743
    assert prototype_pseudo_labels(feats_u, feats_l, labels_l, 3, cosine=True).tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("labels", [[0, 1, 2, 3, 0, 1], [0, 0, 0, 1, 2, 2]])
@pytest.mark.parametrize("options", [{}, {"prototype_similarity": "dot", "embedding_label": "prototype"}])
def test_fairfal_picks_respect_quotas(labels: list[int], options: dict):
    ctx = random_ctx(nu=40, c=4, labels=labels)
    pseudo = prototype_pseudo_labels(ctx.global_feats_u, ctx.global_feats_l, ctx.labels_l, 4,
                                     cosine=options.get("prototype_similarity", "cosine") == "cosine")
    sizes = np.bincount(pseudo.numpy(), minlength=4)
    for budget in (5, 13):
        picks = run("fairfal", ctx, budget, **options)
        assert np.bincount(pseudo[picks].numpy(), minlength=4).tolist() == class_quotas(sizes, budget).tolist()


def test_fairfal_stage2_spreads_away_from_labelled():
    # One class; κ = 4 keeps all 4; labelled anchor at feature 0 → k-centre takes the far sample first.
    p = [0.9, 0.1]
    ctx = QueryContext(2, torch.tensor([p] * 4), torch.tensor([[0.1], [5.0], [0.2], [0.3]]),
                       torch.tensor([p]), torch.tensor([[0.0]]), torch.tensor([0]),
                       local_probs_u=torch.tensor([p] * 4), local_probs_l=torch.tensor([p]), gamma_bar=0.2)
    assert run("fairfal", ctx, 1).tolist() == [1]


def test_kafal_picks_largest_disagreement():
    g = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.5, 0.5]])
    loc = torch.tensor([[0.5, 0.5], [0.1, 0.9], [0.6, 0.4]])
    ctx = QueryContext(2, g, torch.zeros(3, 1), g[:2], torch.zeros(2, 1), torch.tensor([0, 1]), local_probs_u=loc)
    for weighted in (True, False):
        assert run("kafal", ctx, 2, weight_by_local_distribution=weighted).tolist() == [1, 2]


def test_logo_one_per_local_cluster_most_uncertain_globally():
    feats = torch.tensor([[10.0, 0.0], [10.1, 0.0], [10.0, 0.1], [-10.0, 0.0], [-10.1, 0.0], [-10.0, 0.1]])
    glob = torch.tensor([[0.99, 0.01], [0.7, 0.3], [0.95, 0.05], [0.99, 0.01], [0.55, 0.45], [0.5, 0.5]])
    ctx = QueryContext(2, glob, torch.zeros(6, 1), glob[:1], torch.zeros(1, 1), torch.tensor([0]),
                       local_probs_u=torch.tensor([[0.9, 0.1]] * 6), local_feats_u=feats)
    assert sorted(run("logo", ctx, 2).tolist()) == [1, 5]  # plain entropy would take 5 and 4
