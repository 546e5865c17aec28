"""Robust aggregation rules, composable with every strategy (``strategy.robust``).

A rule rewrites a round's valid replies before the strategy aggregates them, so FedAvg's
weighted mean, FedAvgM's and FedAdam's server step, FedNova's normalisation and CLIMB's weights
all apply to what the rule lets through:

- ``krum`` / ``multikrum`` (Blanchard et al. 2017) keep the 1 (resp. ``select``, default n − f)
  replies whose updates are closest to their n − f − 2 nearest neighbours (Flower's
  ``select_multikrum``); the others are dropped whole. With ``directions`` the distances are
  those of the updates scaled to unit norm: Krum's analysis assumes honest updates of one
  spread, and under non-IID sizes the clients with the most data send the longest updates.
- ``median``, ``trimmed_mean`` (Yin et al. 2018; Flower's ``trim_mean``) replace every kept
  reply's weights by the coordinate-wise median / trimmed mean, so any weighted mean of them is
  that point. Under FedNova every y_i becomes that point, so its step is the point's scaled by
  (Σ p_i a_i)(Σ p_i / a_i) ≥ 1.
- ``bulyan`` (El Mhamdi et al. 2018): multikrum keeps θ = n − 2f replies, then each coordinate
  is the mean of the β = θ − 2f values closest to its median (Flower's ``aggregate_n_closest_weights``).
- ``clip``: every update w_i − w is scaled down to norm ``max_norm`` (0: the round's median norm).
- ``exclude_after`` (krum, multikrum, bulyan): the rule's drops are remembered per client
  (:class:`~strategies.guard.ReplyGuard`); one scored in at least that many rounds and dropped in
  more than half is left out for good, and f shrinks by one for each client left out. A hostile
  client that sends every round is dropped in most of them, an honest one with unusual data now
  and then: after a few rounds the rule stops trading honest replies for hostile ones. In the
  spirit of SafeguardSGD (Allen-Zhu et al. 2021), which rules workers out on their history.
- ``cosine``: FLTrust's trust score (Cao et al. 2021), ReLU of the cosine between a reply's update and
  a reference direction, with the coordinate-wise median of the unit-norm updates as the reference,
  since the server holds no root data to train one; a reply whose cosine is at most ``min_cosine``
  (default 0) is dropped whole, the others go on as sent (unlike FLTrust, neither rescaled nor
  weighted by their score, so the strategy's own weighting applies). Unlike Multi-Krum it keeps
  no fixed count: an honest reply that points away from the others in a non-IID round is still
  averaged as long as it does not point against their median, while a sign-flipped reply does.

Beyond the weights: a reply that a selection rule (krum, multikrum, bulyan, cosine) drops takes all its
records with it (SCAFFOLD's control variate, the prototype statistics, its metrics). The
coordinate-wise rules also apply to the records a strategy lists in ``robust_records``
(SCAFFOLD: its control-variate deltas, each replaced by their median / trimmed mean / Bulyan
point). Prototype statistics are per class and masked by which classes a client holds, so no
coordinate-wise rule fits them: they pass validation (finite, right shapes) and are aggregated as
the strategy does. ``clip`` bounds the weights' update only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum

from fedimb import protocol
from fedimb.hostile import RobustConfig
from strategies.validation import update_norms

Combine = Callable[[np.ndarray], np.ndarray]  # (n, *shape) stack → (*shape)


class RobustRuleFailed(RuntimeError):
    """Too few replies for the configured rule."""


def needed_replies(rule: RobustConfig) -> int:
    """The fewest replies the rule is defined for (Krum: n > 2f + 2; Bulyan: n ≥ 4f + 3)."""
    f = rule.byzantine
    return {"krum": 2 * f + 3, "multikrum": 2 * f + 3, "bulyan": 4 * f + 3, "median": 1, "trimmed_mean": 1}.get(rule.name, 1)


def unit_updates(replies: list[Message], start: ArrayRecord) -> list[ArrayRecord]:
    """Each reply's update w_i − w over its float arrays, scaled to unit L2 norm (a zero update stays zero)."""
    norms = update_norms([m.content for m in replies], start)
    units = []
    for message, norm in zip(replies, norms):
        scale = 1.0 / norm if norm > 0 else 0.0
        units.append(ArrayRecord({key: Array(np.ascontiguousarray(
            (array.numpy().astype(np.float64) - start[key].numpy()) * scale))
            for key, array in message.content[protocol.ARRAYS].items() if np.issubdtype(array.numpy().dtype, np.floating)}))
    return units


def select_krum(replies: list[Message], byzantine: int, keep: int, start: ArrayRecord | None = None) -> list[Message]:
    """The ``keep`` replies with the lowest Krum scores, in their original order.

    With ``start`` the scores are those of the unit-norm updates (:func:`unit_updates`), not of the weights.
    """
    scored = unit_updates(replies, start) if start is not None else [m.content[protocol.ARRAYS] for m in replies]
    wrapped = [RecordDict({protocol.ARRAYS: arrays}) for arrays in scored]
    chosen = {id(c) for c in select_multikrum(wrapped, num_malicious_nodes=byzantine, num_nodes_to_select=keep)}
    return [m for m, c in zip(replies, wrapped) if id(c) in chosen]


def median_cosines(replies: list[Message], start: ArrayRecord) -> np.ndarray:
    """Each reply's cosine with the coordinate-wise median of the unit-norm updates (all 0 when that median is 0)."""
    units = unit_updates(replies, start)
    stack = np.stack([np.concatenate([u[k].numpy().ravel() for k in u.keys()]) for u in units])
    reference = np.median(stack, axis=0)
    length = float(np.linalg.norm(reference))
    return stack @ reference / length if length > 0 else np.zeros(len(replies))


def select_cosine(replies: list[Message], start: ArrayRecord, min_cosine: float) -> list[Message]:
    """The replies whose update's cosine with the median direction exceeds ``min_cosine``, in their order."""
    cosines = median_cosines(replies, start)
    kept = [m for m, c in zip(replies, cosines) if c > min_cosine]
    if not kept:
        raise RobustRuleFailed(f"strategy.robust.name=cosine left no reply: every cosine with the median direction "
                               f"is at most min_cosine={min_cosine:g} (highest {cosines.max():.3f})")
    return kept


def _combine_record(replies: list[Message], key: str, combine: Combine) -> None:
    """Replace record ``key`` of every reply by the coordinate-wise ``combine`` of them all."""
    first = replies[0].content[key]
    out = {}
    for name in first.keys():
        stack = np.stack([m.content[key][name].numpy() for m in replies])
        out[name] = np.asarray(combine(stack)).astype(stack.dtype) if np.issubdtype(stack.dtype, np.floating) else stack[0]
    for message in replies:
        message.content[key] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in out.items()})


def _bulyan_combine(beta: int) -> Combine:
    def combine(stack: np.ndarray) -> np.ndarray:
        return aggregate_n_closest_weights([np.median(stack, axis=0)], [[layer] for layer in stack], beta)[0]
    return combine


def clip_updates(replies: list[Message], start: ArrayRecord, max_norm: float) -> None:
    """Scale every update w_i − w whose norm exceeds the bound down to it (bound 0: the median norm)."""
    norms = update_norms([m.content for m in replies], start)
    bound = max_norm if max_norm > 0 else float(np.median(norms))
    for message, norm in zip(replies, norms):
        if norm <= bound or norm == 0:
            continue
        shrink = bound / norm
        weights = message.content[protocol.ARRAYS]
        clipped = {}
        for key, array in weights.items():
            values, origin = array.numpy(), start[key].numpy()
            floating = np.issubdtype(values.dtype, np.floating)
            clipped[key] = (origin + (values - origin) * shrink).astype(values.dtype) if floating else values
        message.content[protocol.ARRAYS] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in clipped.items()})


def apply_rule(rule: RobustConfig, replies: list[Message], start: ArrayRecord | None,
               records: tuple[str, ...] = (), excluded: int = 0) -> list[Message]:
    """The replies the strategy aggregates after ``rule``; weights (and ``records``) rewritten in place.

    ``excluded``: hostile clients already left out of the round (``exclude_after``): krum, multikrum
    and bulyan assume f − excluded among ``replies`` (none: multikrum and bulyan keep them all).
    """
    if rule.name == "none" or not replies:
        return replies
    if excluded:
        rule = replace(rule, byzantine=max(0, rule.byzantine - excluded))
        if rule.byzantine == 0 and rule.name in ("multikrum", "bulyan"):
            return replies
    if len(replies) < needed_replies(rule):
        raise RobustRuleFailed(f"strategy.robust.name={rule.name} with byzantine={rule.byzantine} needs at least "
                               f"{needed_replies(rule)} valid replies, got {len(replies)}")
    n, f = len(replies), rule.byzantine
    if rule.name == "clip":
        if start is not None:
            clip_updates(replies, start, rule.max_norm)
        return replies
    if rule.name == "cosine":
        return select_cosine(replies, start, rule.min_cosine) if start is not None else replies
    combine: Combine | None = None
    directions = start if rule.directions else None
    if rule.name == "krum":
        replies = select_krum(replies, f, 1, directions)
    elif rule.name == "multikrum":
        replies = select_krum(replies, f, rule.select or n - f, directions)
    elif rule.name == "bulyan":
        replies = select_krum(replies, f, n - 2 * f, directions)
        combine = _bulyan_combine(n - 4 * f)
    elif rule.name == "median":
        combine = lambda stack: np.median(stack, axis=0)  # noqa: E731 - one-line rule
    elif rule.name == "trimmed_mean":
        combine = lambda stack: trim_mean(stack, rule.trim)  # noqa: E731
    if combine is not None:
        for key in (protocol.ARRAYS, *[r for r in records if all(r in m.content.array_records for m in replies)]):
            _combine_record(replies, key, combine)
    return replies
