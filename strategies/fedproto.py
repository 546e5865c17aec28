"""FedProto (Tan et al., AAAI 2022): clients exchange class prototypes only, never model weights.

Every client keeps a model of its own (``clients/algorithms/fedproto.py``; they may differ, e.g.
``models: [cnn4, resnet8]``, as long as their features have one size). Each round the server
averages the sampled clients' per-class mean features by their counts,

    C_j = Σ_k n_k,j · c_k,j / Σ_k n_k,j,

keeps the last C_j of a class no sampled client holds, and sends C to the clients for training
(λ‖e − C_y‖²) and for evaluation (nearest prototype). There is no global model, so the run is
scored by federated evaluation of the clients' own models (``StrategySpec.global_model``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedimb import protocol
from fedimb.config import ConfigError
from fedimb.models import MODELS
from strategies.base import ReproducibleSampling, StrategyContext, StrategySpec, attach_prototypes, take_records
from strategies.validation import Signature


@dataclass
class FedProtoParams:
    """lambda_proto: λ of the prototype distance (the paper's 1); models: model names, client i
    builds ``models[i mod len]`` (empty: every client builds ``model.name``)."""

    lambda_proto: float = 1.0
    models: list[str] = field(default_factory=list)

    def check(self, prefix: str) -> None:
        """Reject a negative λ or an unknown model name."""
        if self.lambda_proto < 0:
            raise ConfigError(f"{prefix}.lambda_proto", f"must be >= 0, got {self.lambda_proto}")
        for name in self.models:
            if name not in MODELS:
                raise ConfigError(f"{prefix}.models", f"'{name}' is not allowed; choose from {', '.join(MODELS)}")


def average_prototypes(protos: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C_j = Σ_k n_k,j c_k,j / Σ_k n_k,j from K×C×D prototypes and K×C counts; returns (C, has)."""
    total = counts.sum(0)
    summed = np.einsum("kc,kcd->cd", counts, protos)
    has = total > 0
    return np.divide(summed, total[:, None], out=np.zeros_like(summed), where=has[:, None]), has


class FedProtoStrategy(ReproducibleSampling, FedAvg):
    """Sampling and failure handling as every strategy; aggregation of prototypes only."""

    state_attrs = ("prototypes", "has")

    def __init__(self, params: FedProtoParams, **kwargs) -> None:
        super().__init__(**kwargs)
        self.params = params
        self.prototypes: np.ndarray | None = None
        self.has: np.ndarray | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """No weights go out: λ, the client models and, once they exist, the global prototypes."""
        config[protocol.PROTO_LAMBDA] = self.params.lambda_proto
        if self.params.models:
            config[protocol.CLIENT_MODELS] = list(self.params.models)
        return attach_prototypes(list(super().configure_train(server_round, ArrayRecord(), config, grid)),
                                 self.prototypes, self.has)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The clients evaluate their own models against the global prototypes."""
        if self.params.models:
            config[protocol.CLIENT_MODELS] = list(self.params.models)
        return attach_prototypes(list(super().configure_evaluate(server_round, ArrayRecord(), config, grid)),
                                 self.prototypes, self.has)

    def reply_records(self, weights: Signature | None) -> dict[str, Signature | None]:
        """Per-class mean features (C×D) and counts (C), once the prototypes' shape is known."""
        if self.prototypes is None:
            return {protocol.PROTOTYPE_STATS: None}
        classes, dim = self.prototypes.shape
        return {protocol.PROTOTYPE_STATS: {protocol.STAT_PROTOTYPES: ((classes, dim), "float32"),
                                           protocol.STAT_COUNTS: ((classes,), "float32")}}

    def aggregate_screened(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The count-weighted prototypes; the train metrics; no weights."""
        stats = take_records(replies, protocol.PROTOTYPE_STATS)
        if stats:
            shapes = sorted({s[protocol.STAT_PROTOTYPES].shape for s in stats})
            if len(shapes) > 1:
                raise ConfigError("strategy.params.models", f"the clients' models give prototypes of shapes {shapes}; "
                                  "FedProto needs models whose features have one size")
            new, has = average_prototypes(np.stack([s[protocol.STAT_PROTOTYPES] for s in stats]),
                                          np.stack([s[protocol.STAT_COUNTS] for s in stats]))
            if self.prototypes is not None:
                keep_old = self.has & ~has
                new[keep_old] = self.prototypes[keep_old]
                has = has | self.has
            self.prototypes, self.has = new, has
        metrics = self.train_metrics_aggr_fn([m.content for m in replies], self.weighted_by_key) if replies else None
        return ArrayRecord(), metrics


def build(ctx: StrategyContext, params: FedProtoParams) -> FedProtoStrategy:
    """FedProto from the run's context."""
    return FedProtoStrategy(params, **ctx.flower_kwargs())


SPEC = StrategySpec("fedproto", build, FedProtoParams, "fedproto", "prototypes only, a model per client",
                    keeps_client_state=True, global_model=False)
