"""FedAdam (Reddi et al., ICLR 2021): Flower's own adaptive server optimiser."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.serverapp.strategy import FedAdam

from strategies.base import ReproducibleSampling, StrategyContext, StrategySpec


@dataclass
class FedAdamParams:
    """eta: server lr; beta_1, beta_2: Adam moments; tau: adaptivity (Flower's defaults except eta)."""

    eta: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3


class FedAdamStrategy(ReproducibleSampling, FedAdam):
    """Adam on the averaged client update."""

    # Flower sets current_arrays in every configure_train; the moments carry over
    state_attrs = ("m_t", "v_t")


def build(ctx: StrategyContext, params: FedAdamParams) -> FedAdamStrategy:
    """FedAdam from the run's context."""
    return FedAdamStrategy(**ctx.flower_kwargs(), eta=params.eta, beta_1=params.beta_1,
                           beta_2=params.beta_2, tau=params.tau)


SPEC = StrategySpec("fedadam", build, FedAdamParams, "fedavg", "FedAvg + server Adam")
