"""What every active-learning query sampler is, and the helpers several of them share.

A sampler is ``fn(ctx, budget, params) -> SamplerResult``: it reads the global (and, when
``needs_local_model``, the local-only) model's softmax and penultimate features on one
client's pools and returns positions in the unlabelled pool. Ties are always broken towards
the lower position, so every sampler is a deterministic function of (ctx, budget, params).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass
class NoParams:
    """For samplers without hyper-parameters."""


@dataclass
class QueryContext:
    """What a sampler may read at one query step on one client (all torch tensors on CPU)."""

    num_classes: int
    global_probs_u: Tensor  # (Nu, C) softmax of the global model on the unlabelled pool
    global_feats_u: Tensor  # (Nu, D) penultimate features of the global model, unlabelled
    global_probs_l: Tensor  # (Nl, C) on the labelled pool
    global_feats_l: Tensor  # (Nl, D)
    labels_l: Tensor  # (Nl,) true labels of the labelled pool
    local_probs_u: Tensor | None = None  # same, from a local-only model (only when the sampler needs it)
    local_feats_u: Tensor | None = None
    local_probs_l: Tensor | None = None
    local_feats_l: Tensor | None = None
    gamma_bar: float | None = None  # FairFAL's server-averaged global-imbalance estimate (None at the first step)
    seed: int = 0

    @property
    def num_unlabelled(self) -> int:
        """Nu, the size of the unlabelled pool."""
        return int(self.global_probs_u.shape[0])


@dataclass
class SamplerResult:
    """Chosen positions in the unlabelled pool and scalars for the server."""

    indices: np.ndarray  # positions in the unlabelled pool, distinct, len == min(budget, Nu)
    report: dict[str, float] = field(default_factory=dict)  # e.g. FairFAL's gamma, d, s, model choice


SamplerFn = Callable[[QueryContext, int, Any], SamplerResult]


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: ``fn(ctx, budget, params)``, its params dataclass, and whether it needs a local model.

    ``local_model``: ``scratch`` (a model trained on the labelled set alone at query time) or
    ``last_round`` (the client's own model after its last local training of the federation).
    """

    name: str
    fn: SamplerFn
    params_cls: type = NoParams
    needs_local_model: bool = False
    local_model: str = "scratch"


def require(tensor: Tensor | None, name: str) -> Tensor:
    """``tensor``, or a ValueError naming the missing QueryContext field."""
    if tensor is None:
        raise ValueError(f"this sampler needs QueryContext.{name} (a local-only model)")
    return tensor


def query_size(ctx: QueryContext, budget: int) -> int:
    """min(budget, Nu), never negative."""
    return max(0, min(int(budget), ctx.num_unlabelled))


def top_k(scores: Tensor | np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest scores, largest first; equal scores keep the lower position first."""
    values = scores.detach().double().numpy() if isinstance(scores, Tensor) else np.asarray(scores, dtype=np.float64)
    return np.argsort(-values, kind="stable")[: max(0, k)].astype(np.int64)


def entropy(probs: Tensor, normalised: bool = True) -> Tensor:
    """Row-wise −Σ p log p (0 log 0 = 0), divided by log C when ``normalised``."""
    probs = probs.double()
    h = -torch.special.xlogy(probs, probs).sum(dim=1)
    num_classes = probs.shape[1]
    return h / np.log(num_classes) if normalised and num_classes > 1 else h


def gradient_embedding(probs: Tensor, feats: Tensor, pseudo_labels: Tensor | None = None) -> Tensor:
    """BADGE's g(x) = [(1{c=ŷ} − p_c)·φ(x)]_c, shape (N, C·D); ŷ = argmax p unless given."""
    probs, feats = probs.double(), feats.double()
    labels = probs.argmax(dim=1) if pseudo_labels is None else pseudo_labels.long()
    coeff = torch.nn.functional.one_hot(labels, probs.shape[1]).double() - probs  # (N, C)
    return (coeff[:, :, None] * feats[:, None, :]).reshape(probs.shape[0], probs.shape[1] * feats.shape[1])


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """(len(a), len(b)) squared Euclidean distances, clamped at 0 against rounding."""
    a, b = a.double(), b.double()
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T).clamp(min=0.0)


def k_center_greedy(candidates: Tensor, centres: Tensor, k: int, start: int | None = None) -> np.ndarray:
    """Greedy furthest-first: k candidate positions, each the farthest (squared Euclidean) from all centres so far.

    With centres (M > 0) the first pick is the candidate farthest from them. With M = 0 the
    first pick is ``start`` when given (FairFAL passes its most uncertain candidate, as the
    authors' code does), else the candidate farthest from the candidates' mean. Chosen
    points become centres; ties go to the lower position. Returns min(k, N) distinct positions.
    """
    n = candidates.shape[0]
    k = max(0, min(int(k), n))
    if k == 0:
        return np.empty(0, dtype=np.int64)
    cand = candidates.double()
    if centres.shape[0] > 0:
        min_dist = squared_distances(cand, centres).min(dim=1).values
        chosen: list[int] = []
    else:
        first = start if start is not None else int(squared_distances(cand, cand.mean(0, keepdim=True))[:, 0].argmax())
        chosen = [int(first)]
        min_dist = ((cand - cand[first]) ** 2).sum(1)
    taken = torch.zeros(n, dtype=torch.bool)
    taken[chosen] = True
    while len(chosen) < k:
        # torch.argmax returns the first maximum, so ties go to the lower position.
        j = int(min_dist.masked_fill(taken, -1.0).argmax())
        chosen.append(j)
        taken[j] = True
        min_dist = torch.minimum(min_dist, ((cand - cand[j]) ** 2).sum(1))
    return np.asarray(chosen, dtype=np.int64)


def kmeanspp_seeding(emb: Tensor, k: int, rng: np.random.Generator) -> np.ndarray:
    """BADGE's k-means++ seeding: the largest-norm point first, then each next ∝ squared distance to the chosen.

    If every remaining point coincides with a chosen one (all distances 0) the rest are
    taken in position order. Returns min(k, N) distinct positions.
    """
    n = emb.shape[0]
    k = max(0, min(int(k), n))
    if k == 0:
        return np.empty(0, dtype=np.int64)
    x = emb.double()
    chosen = [int(x.norm(dim=1).argmax())]
    min_dist = ((x - x[chosen[0]]) ** 2).sum(1)
    while len(chosen) < k:
        weights = min_dist.numpy().copy()
        weights[chosen] = 0.0
        total = weights.sum()
        if total <= 0.0:
            rest = np.setdiff1d(np.arange(n), chosen)[: k - len(chosen)]
            chosen.extend(int(i) for i in rest)
            break
        j = int(rng.choice(n, p=weights / total))
        chosen.append(j)
        min_dist = torch.minimum(min_dist, ((x - x[j]) ** 2).sum(1))
    return np.asarray(chosen, dtype=np.int64)


def balanced_subset_mean_probs(probs_l: Tensor, labels_l: Tensor, num_classes: int) -> Tensor:
    """FairFAL's π: mean softmax over the labelled set with each present class oversampled to the largest.

    Each sample of class c stands for n_max / n_c copies (the expectation of the authors'
    random oversampling with replacement), so the oversampled mean Σ w_i p_i / Σ w_i equals
    the mean over present classes of each class's mean softmax. An empty labelled set gives
    the uniform vector.
    """
    if labels_l.numel() == 0:
        return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    counts = torch.bincount(labels_l.long(), minlength=num_classes).double()
    weights = counts.max() / counts[labels_l.long()]  # n_max / n_c per sample
    return (weights[:, None] * probs_l.double()).sum(0) / weights.sum()
