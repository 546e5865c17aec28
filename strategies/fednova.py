"""FedNova (Wang et al., NeurIPS 2020), as in NIID-Bench.

Clients report a_i (``fednova-a``, their normalising factor from τ_i steps and momentum).
With p_i = n_i / Σ n and x the global weights:
    d = Σ p_i (x − y_i) / a_i,   τ_eff = Σ p_i a_i,   x ← x − τ_eff · d.
Equal a_i gives FedAvg; a client that took more steps no longer drags the average.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedimb import protocol
from strategies.base import NoParams, ReproducibleSampling, StrategyContext, StrategySpec


def fednova_update(global_weights: dict[str, np.ndarray], client_weights: list[dict[str, np.ndarray]],
                   num_examples: list[float], factors: list[float]) -> dict[str, np.ndarray]:
    """The normalised-averaging step above."""
    total = float(sum(num_examples))
    shares = [n / total for n in num_examples]
    tau_eff = sum(p * a for p, a in zip(shares, factors))
    out = {}
    for key, x in global_weights.items():
        direction = sum(p * (x - y[key]) / a for p, y, a in zip(shares, client_weights, factors))
        out[key] = (x - tau_eff * direction).astype(x.dtype)
    return out


class FedNovaStrategy(ReproducibleSampling, FedAvg):
    """Normalised averaging of client updates."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._round_start: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Remember x, the weights this round starts from."""
        self._round_start = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_screened(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedNova's update on the weights; FedAvg's weighted mean on the metrics."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid or self._round_start is None:
            return None, None
        contents = [m.content for m in valid]
        metrics = [m.content["metrics"] for m in valid]
        start = {k: v.numpy() for k, v in self._round_start.items()}
        new = fednova_update(
            start,
            [{k: c["arrays"][k].numpy() for k in start} for c in contents],
            [float(m[self.weighted_by_key]) for m in metrics],
            [float(m[protocol.FEDNOVA_FACTOR]) for m in metrics],
        )
        arrays = ArrayRecord({k: Array(v) for k, v in new.items()})
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)


def build(ctx: StrategyContext, params: NoParams) -> FedNovaStrategy:
    """FedNova from the run's context."""
    return FedNovaStrategy(**ctx.flower_kwargs())


SPEC = StrategySpec("fednova", build, NoParams, "fednova", "normalised averaging")
