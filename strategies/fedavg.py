"""FedAvg (McMahan et al., AISTATS 2017): Flower's own, with reproducible sampling."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from strategies.base import NoParams, ReproducibleSampling, StrategyContext, StrategySpec


class FedAvgStrategy(ReproducibleSampling, FedAvg):
    """Sample-weighted average of client weights."""


def build(ctx: StrategyContext, params: NoParams) -> FedAvgStrategy:
    """FedAvg from the run's context."""
    return FedAvgStrategy(**ctx.flower_kwargs())


SPEC = StrategySpec("fedavg", build, NoParams, "fedavg", "sample-weighted average")
