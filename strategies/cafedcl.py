"""CAFedCL-style confidence-aware prototype aggregation, and ``fedavg_proto`` as its ablation.

Our design after Wu et al., "Breaking the Prototype Bias Loop" (arXiv 2603.03007; only the
abstract is public), built on FedProto (Tan et al., AAAI 2022). Clients send, per class c they
hold: prototype p_k,c, real and synthetic counts, dispersion σ²_k,c, mean normalised entropy
u_k,c and the quality q_k,c of the synthetic samples behind the prototype
(``clients/algorithms/prototypes.py``); n_k,c counts real and synthetic samples. Per class:

    w̃_k,c = n_k,c · exp(−β·u_k,c) · q_k,c / (σ²_k,c + ε),   w_k,c = w̃_k,c / Σ_j w̃_j,c
    P_c = normalise(Σ_k w_k,c p_k,c),   then P_c ← normalise(m·P_c(old) + (1 − m)·P_c)

so n·q = n_real + r·n_syn: a synthetic sample counts as much as the global model recognises it
(q = 1 without synthetic samples). ``fedavg_proto`` is the same loop with w̃ = n_k,c and no smoothing: what the confidence weighting adds is the difference.
Model weights: FedAvg, or ``model_weighting=confidence`` (FedAvg's weights × the client's
mean confidence 1 − u on its own data, normalised).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedimb import protocol
from fedimb.config import ConfigError
from strategies.base import (ReproducibleSampling, StrategyContext, StrategySpec, attach_prototypes, reweight_replies,
                             take_records)
from strategies.validation import Signature


@dataclass
class PrototypeParams:
    """Server and client knobs of prototype aggregation.

    prototype_weighting: ``confidence`` (CAFedCL-style) or ``count`` (FedProto's count weights);
    beta: β of exp(−β·u); eps: ε added to σ²; ema: m of the smoothing (0 = none);
    model_weighting: ``fedavg`` or ``confidence``; lambda_proto, lambda_geo, tau: client loss;
    inference: ``head`` (the model's own linear head) or ``prototype`` (nearest global
    prototype by cosine, FedProto's rule: no class prior, so no head bias towards frequent classes).
    """

    prototype_weighting: str = "confidence"
    beta: float = 2.0
    eps: float = 0.05
    ema: float = 0.5
    model_weighting: str = "fedavg"
    lambda_proto: float = protocol.PROTOTYPE_LOSS.lambda_proto
    lambda_geo: float = protocol.PROTOTYPE_LOSS.lambda_geo
    tau: float = protocol.PROTOTYPE_LOSS.tau
    inference: str = "head"

    def check(self, prefix: str) -> None:
        """Reject values outside their range."""
        if self.inference not in ("head", "prototype"):
            raise ConfigError(f"{prefix}.inference", "choose one of head, prototype")
        if self.prototype_weighting not in ("confidence", "count"):
            raise ConfigError(f"{prefix}.prototype_weighting", "choose one of confidence, count")
        if self.model_weighting not in ("fedavg", "confidence"):
            raise ConfigError(f"{prefix}.model_weighting", "choose one of fedavg, confidence")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"{prefix}.ema", f"must be in [0, 1), got {self.ema}")
        if self.tau <= 0 or self.eps <= 0:
            raise ConfigError(f"{prefix}.tau" if self.tau <= 0 else f"{prefix}.eps", "must be > 0")


def prototype_weights(counts: np.ndarray, uncertainty: np.ndarray, dispersion: np.ndarray,
                      quality: np.ndarray | None, beta: float, eps: float, mode: str) -> np.ndarray:
    """K×C weights w_k,c (columns sum to 1 where any client holds the class, else 0)."""
    if mode == "count":
        raw = counts.astype(np.float64)
    else:
        q = np.ones_like(counts, dtype=np.float64) if quality is None else quality
        raw = counts * np.exp(-beta * uncertainty) * q / (dispersion + eps)
    raw = np.where(counts > 0, raw, 0.0)
    total = raw.sum(0, keepdims=True)
    return np.divide(raw, total, out=np.zeros_like(raw), where=total > 0)


def _normalise(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)


def aggregate_prototypes(protos: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P_c = normalise(Σ_k w_k,c p_k,c) from K×C×D prototypes; returns (P, has)."""
    has = weights.sum(0) > 0
    return _normalise(np.einsum("kc,kcd->cd", weights, protos)), has


class PrototypeStrategy(ReproducibleSampling, FedAvg):
    """FedAvg of weights plus global class prototypes sent back every round."""

    state_attrs = ("prototypes", "has")  # the EMA smooths against these

    def __init__(self, params: PrototypeParams, **kwargs) -> None:
        super().__init__(**kwargs)
        self.params = params
        self.prototypes: np.ndarray | None = None
        self.has: np.ndarray | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send the loss knobs and, once they exist, the global prototypes."""
        config[protocol.PROTO_LAMBDA] = self.params.lambda_proto
        config[protocol.GEO_LAMBDA] = self.params.lambda_geo
        config[protocol.PROTO_TAU] = self.params.tau
        return attach_prototypes(list(super().configure_train(server_round, arrays, config, grid)),
                                 self.prototypes, self.has)

    def evaluation_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        """The global model as evaluated (central and client side); training always uses ``arrays``.

        ``inference=prototype``: the head becomes W = P/τ, b = 0 (−1e9 for classes nobody
        holds). argmax_c z·P_c equals argmax_c cos(z, P_c) because ‖z‖ is shared by all
        classes, so a plain linear head carries the nearest-prototype rule.
        """
        if self.params.inference != "prototype" or self.prototypes is None:
            return arrays
        state = arrays.to_torch_state_dict()
        state["head.weight"] = torch.from_numpy(self.prototypes / self.params.tau).float()
        state["head.bias"] = torch.from_numpy(np.where(self.has, 0.0, -1e9)).float()
        return ArrayRecord(state)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Client-side evaluation of the model as evaluated (see ``evaluation_arrays``)."""
        return super().configure_evaluate(server_round, self.evaluation_arrays(arrays), config, grid)

    def reply_records(self, weights: Signature | None) -> dict[str, Signature | None]:
        """Per-class statistics: C×D prototypes and C counts, dispersions, uncertainties, synthetic counts
        and qualities (C×D: the head's)."""
        if weights is None or "head.weight" not in weights:
            return {protocol.PROTOTYPE_STATS: None}
        (classes, dim), _ = weights["head.weight"]
        per_class = ((classes,), "float32")
        return {protocol.PROTOTYPE_STATS: {protocol.STAT_PROTOTYPES: ((classes, dim), "float32"),
                                           protocol.STAT_COUNTS: per_class, protocol.STAT_DISPERSION: per_class,
                                           protocol.STAT_UNCERTAINTY: per_class, protocol.STAT_SYNTHETIC: per_class,
                                           protocol.STAT_QUALITY: per_class}}

    def aggregate_screened(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate prototypes from the stats records, then the weights."""
        stats = take_records(replies, protocol.PROTOTYPE_STATS)
        if stats:
            self._update_prototypes(stats)
        if self.params.model_weighting == "confidence" and replies:
            key = self.weighted_by_key
            reweight_replies(replies, [float(m.content["metrics"][key]) * float(m.content[protocol.METRICS][protocol.CONFIDENCE])
                                       for m in replies], key)
        return super().aggregate_screened(server_round, replies)

    def _update_prototypes(self, stats: list[dict[str, np.ndarray]]) -> None:
        p = self.params
        counts = np.stack([s[protocol.STAT_COUNTS] + s[protocol.STAT_SYNTHETIC] for s in stats])
        weights = prototype_weights(
            counts, np.stack([s[protocol.STAT_UNCERTAINTY] for s in stats]),
            np.stack([s[protocol.STAT_DISPERSION] for s in stats]), np.stack([s[protocol.STAT_QUALITY] for s in stats]),
            p.beta, p.eps, p.prototype_weighting)
        new, has = aggregate_prototypes(np.stack([s[protocol.STAT_PROTOTYPES] for s in stats]), weights)
        if self.prototypes is not None and p.ema > 0:
            both = has & self.has
            new[both] = _normalise(p.ema * self.prototypes[both] + (1 - p.ema) * new[both])
            keep_old = self.has & ~has
            new[keep_old] = self.prototypes[keep_old]
            has = has | self.has
        self.prototypes, self.has = new, has


def build_cafedcl(ctx: StrategyContext, params: PrototypeParams) -> PrototypeStrategy:
    """CAFedCL-style strategy from the run's context."""
    return PrototypeStrategy(params, **ctx.flower_kwargs())


@dataclass
class FedAvgProtoParams(PrototypeParams):
    """Count-weighted prototypes, no smoothing, no geometric term."""

    prototype_weighting: str = "count"
    ema: float = 0.0
    lambda_geo: float = 0.0


CAFEDCL = StrategySpec("cafedcl", build_cafedcl, PrototypeParams, "prototypes", "confidence-aware prototypes")
# FedAvg of the weights with count-weighted prototypes and the InfoNCE term: cafedcl's ablation
# without its confidence weighting (the true FedProto, prototypes only, is strategies/fedproto.py)
FEDAVG_PROTO = StrategySpec("fedavg_proto", build_cafedcl, FedAvgProtoParams, "prototypes", "FedAvg + count-weighted prototypes")
