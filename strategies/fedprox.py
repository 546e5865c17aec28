"""FedProx (Li et al., MLSys 2020): Flower's own; the client adds (μ/2)·||w − w_g||²."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.serverapp.strategy import FedProx

from strategies.base import ReproducibleSampling, StrategyContext, StrategySpec


@dataclass
class FedProxParams:
    """proximal_mu: μ of the proximal term (NIID-Bench: 0.01)."""

    proximal_mu: float = 0.01


class FedProxStrategy(ReproducibleSampling, FedProx):
    """Flower's FedProx sends ``proximal-mu`` in the train config."""


def build(ctx: StrategyContext, params: FedProxParams) -> FedProxStrategy:
    """FedProx from the run's context."""
    return FedProxStrategy(**ctx.flower_kwargs(), proximal_mu=params.proximal_mu)


SPEC = StrategySpec("fedprox", build, FedProxParams, "fedprox", "FedAvg + proximal term")
