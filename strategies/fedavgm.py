"""FedAvgM (Hsu et al., 2019): Flower's own server momentum."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.serverapp.strategy import FedAvgM

from strategies.base import ReproducibleSampling, StrategyContext, StrategySpec


@dataclass
class FedAvgMParams:
    """server_lr: server learning rate; server_momentum: β of the server momentum buffer."""

    server_lr: float = 1.0
    server_momentum: float = 0.9


class FedAvgMStrategy(ReproducibleSampling, FedAvgM):
    """FedAvg with momentum on the server update."""

    # Flower resets current_arrays from the round's weights when it is None, so only the buffer carries over
    state_attrs = ("momentum_vector",)


def build(ctx: StrategyContext, params: FedAvgMParams) -> FedAvgMStrategy:
    """FedAvgM from the run's context."""
    return FedAvgMStrategy(**ctx.flower_kwargs(), server_learning_rate=params.server_lr,
                           server_momentum=params.server_momentum)


SPEC = StrategySpec("fedavgm", build, FedAvgMParams, "fedavg", "FedAvg + server momentum")
