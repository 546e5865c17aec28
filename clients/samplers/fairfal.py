"""FairFAL (Zong & Huang, CVPR 2026): class-balanced federated active learning (docs: shared/reference/fairfal.md).

Per client and step: π_g, π_l on the class-balanced labelled set → global-imbalance
estimate γ_k and local–global divergence d_k → choose the uncertainty model by
s_k = 1 − ½(d_k + γ̄) > δ → prototype pseudo-labels → per-class quotas → top κ·b_c by
normalised entropy per pseudo-class → greedy k-centre in gradient-embedding space seeded
by the labelled samples of that class.

Two places where the reference note and the authors' code differ default to the code
(the numbers to reproduce come from it); each has a switch:
- ``prototype_similarity="cosine"``: the code re-normalises μ_c before ⟨z, μ_c⟩;
  "dot" is the note's literal ⟨z, μ_c⟩ with μ_c a mean of unit vectors.
- ``embedding_label="model"``: the code builds g(x) of unlabelled samples with ŷ = argmax
  of the embedding model's own softmax; "prototype" uses the prototype pseudo-label.
γ̄: the server averages γ_k once, at the first step. When ``ctx.gamma_bar`` is None (that
first step, before the average exists) this client's own γ_k stands in for γ̄; the authors
instead collect every γ_k first and query afterwards in the same step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clients.samplers.base import (QueryContext, SamplerResult, SamplerSpec, balanced_subset_mean_probs, entropy,
                                   gradient_embedding, k_center_greedy, query_size, require, top_k)
from fedimb import protocol
from fedimb.config import ConfigError


@dataclass
class FairFALParams:
    """delta δ: s_k threshold for the global model; kappa κ: stage-1 oversampling; the rest: module doc."""

    delta: float = 0.75
    kappa: float = 4.0
    prototype_similarity: str = "cosine"  # cosine (authors' code) | dot (note)
    embedding_label: str = "model"  # model (authors' code) | prototype (note)

    def check(self, prefix: str) -> None:
        """Reject values outside their range."""
        if self.kappa < 1.0:
            raise ConfigError(f"{prefix}.kappa", f"must be >= 1 so each bucket can fill its quota, got {self.kappa}")
        if self.prototype_similarity not in ("cosine", "dot"):
            raise ConfigError(f"{prefix}.prototype_similarity", "choose one of cosine, dot")
        if self.embedding_label not in ("model", "prototype"):
            raise ConfigError(f"{prefix}.embedding_label", "choose one of model, prototype")


def present_classes(labels_l: Tensor, num_classes: int) -> Tensor:
    """Boolean mask of the classes with at least one labelled sample (all classes if none has)."""
    present = torch.bincount(labels_l.long(), minlength=num_classes) > 0
    return present if present.any() else torch.ones(num_classes, dtype=torch.bool)


def imbalance_ratio(pi_g: Tensor, present: Tensor) -> float:
    """γ_k = min_c π_g,c / max_c π_g,c over the locally present classes."""
    values = pi_g[present]
    return float(values.min() / values.max())


def divergence(pi_g: Tensor, pi_l: Tensor) -> float:
    """d_k = (1/C) Σ_c |π_g,c − π_l,c| / (π_g,c + π_l,c), a 0/0 term counting as 0."""
    num, den = (pi_g - pi_l).abs().double(), (pi_g + pi_l).double()
    return float(torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(den)).mean())


def model_choice(d: float, gamma_bar: float, delta: float) -> tuple[float, bool]:
    """s_k = 1 − ½(d_k + γ̄) and whether the global model gives the uncertainty (s_k > δ)."""
    score = 1.0 - 0.5 * (d + gamma_bar)
    return score, score > delta


def prototype_pseudo_labels(feats_u: Tensor, feats_l: Tensor, labels_l: Tensor, num_classes: int,
                            cosine: bool = True) -> Tensor:
    """ŷ(x) = argmax_c ⟨z(x), μ_c⟩ over the classes with a labelled sample.

    z and the features averaged into μ_c are L2-normalised global features; ``cosine`` also
    normalises μ_c (authors' code). Ties go to the lower class.
    """
    z_u, z_l = F.normalize(feats_u.double(), dim=1), F.normalize(feats_l.double(), dim=1)
    counts = torch.bincount(labels_l.long(), minlength=num_classes).double()
    protos = torch.zeros(num_classes, z_l.shape[1], dtype=torch.float64).index_add_(0, labels_l.long(), z_l)
    protos = protos / counts.clamp(min=1.0)[:, None]
    if cosine:
        protos = F.normalize(protos, dim=1)
    sim = (z_u @ protos.T).masked_fill(~(counts > 0)[None, :], -math.inf)
    return sim.argmax(dim=1)


def class_quotas(bucket_sizes: np.ndarray, budget: int) -> np.ndarray:
    """Per-class quotas b_c for pseudo-label buckets of the given sizes; they sum to min(budget, total).

    Rule, with n = min(budget, Σ sizes) and C = len(bucket_sizes) (every class, empty or not):
    1. every class gets ⌊n/C⌋; the n mod C remaining units go one each to the classes with
       the largest buckets (equal sizes: lower class first);
    2. each quota is capped at its bucket size and the excess pooled;
    3. the pool is handed out one unit at a time, round-robin over the classes whose bucket
       still had room after step 2, in bucket-size order (largest first, lower class on
       ties), skipping a class once its quota equals its bucket size.
    """
    sizes = np.asarray(bucket_sizes, dtype=np.int64)
    n = max(0, min(int(budget), int(sizes.sum())))
    order = np.argsort(-sizes, kind="stable")
    quotas = np.full(len(sizes), n // len(sizes), dtype=np.int64)
    quotas[order[: n % len(sizes)]] += 1
    spare = int(np.maximum(quotas - sizes, 0).sum())
    quotas = np.minimum(quotas, sizes)
    growable = [int(c) for c in order if sizes[c] > quotas[c]]
    while spare > 0:  # ends: n ≤ Σ sizes, so some growable class always has room
        for c in growable:
            if spare > 0 and quotas[c] < sizes[c]:
                quotas[c] += 1
                spare -= 1
    return quotas


def pick_in_bucket(members: np.ndarray, quota: int, uncertainty: Tensor,
                   emb_fn: Callable[[np.ndarray], Tensor], anchors: Tensor, kappa: float) -> np.ndarray:
    """Stage 1: the ⌊κ·b_c⌋ most uncertain members; stage 2: b_c of them by k-centre greedy from ``anchors``.

    Without anchors the k-centre starts at the most uncertain candidate (authors' code).
    ``emb_fn(positions)`` gives the gradient embeddings of those unlabelled positions.
    """
    m = min(len(members), max(1, int(math.floor(kappa * quota))))
    cand = members[top_k(uncertainty[torch.from_numpy(members)], m)]
    chosen = k_center_greedy(emb_fn(cand), anchors, quota, start=0)
    return cand[chosen]


def fairfal_sampler(ctx: QueryContext, budget: int, params: FairFALParams) -> SamplerResult:
    """min(budget, Nu) positions: class-balanced by prototype pseudo-labels, uncertain and diverse within each class."""
    local_probs_u = require(ctx.local_probs_u, "local_probs_u")
    local_probs_l = require(ctx.local_probs_l, "local_probs_l")
    c = ctx.num_classes
    pi_g = balanced_subset_mean_probs(ctx.global_probs_l, ctx.labels_l, c)
    pi_l = balanced_subset_mean_probs(local_probs_l, ctx.labels_l, c)
    gamma = imbalance_ratio(pi_g, present_classes(ctx.labels_l, c))
    d = divergence(pi_g, pi_l)
    gamma_bar = gamma if ctx.gamma_bar is None else float(ctx.gamma_bar)
    score, uses_global = model_choice(d, gamma_bar, params.delta)
    emb_global = gamma_bar < 0.5
    report = {protocol.FAIRFAL_GAMMA: gamma, "divergence": d, "score": score, "uses_global": float(uses_global),
              "gamma_bar_used": gamma_bar, "embedding_uses_global": float(emb_global)}

    k = query_size(ctx, budget)
    if k == 0:
        return SamplerResult(np.empty(0, dtype=np.int64), report)
    uncertainty = entropy(ctx.global_probs_u if uses_global else local_probs_u, normalised=True)
    if ctx.labels_l.numel() > 0:
        pseudo = prototype_pseudo_labels(ctx.global_feats_u, ctx.global_feats_l, ctx.labels_l, c,
                                         cosine=params.prototype_similarity == "cosine")
    else:  # no prototypes to compare with: fall back on the global model's prediction
        pseudo = ctx.global_probs_u.argmax(dim=1)
    emb_probs_u = ctx.global_probs_u if emb_global else local_probs_u
    emb_probs_l = ctx.global_probs_l if emb_global else local_probs_l
    emb_label_u = pseudo if params.embedding_label == "prototype" else None

    def emb_fn(positions: np.ndarray) -> Tensor:
        idx = torch.from_numpy(positions)
        labels = None if emb_label_u is None else emb_label_u[idx]
        return gradient_embedding(emb_probs_u[idx], ctx.global_feats_u[idx], labels)

    quotas = class_quotas(torch.bincount(pseudo, minlength=c).numpy(), k)
    picks = []
    for cls in np.flatnonzero(quotas):
        members = torch.nonzero(pseudo == int(cls)).flatten().numpy()
        same = ctx.labels_l == int(cls)
        anchors = gradient_embedding(emb_probs_l[same], ctx.global_feats_l[same], ctx.labels_l[same])
        picks.append(pick_in_bucket(members, int(quotas[cls]), uncertainty, emb_fn, anchors, params.kappa))
    return SamplerResult(np.concatenate(picks).astype(np.int64), report)


SAMPLER = SamplerSpec("fairfal", fairfal_sampler, FairFALParams, needs_local_model=True)
