"""FedNova client (Wang et al., NeurIPS 2020): reports its normalising factor a_i.

With momentum ρ and τ local steps, a_i = (τ − ρ(1 − ρ^τ)/(1 − ρ)) / (1 − ρ) (NIID-Bench's
form); the server divides each client's update by it.
"""

from __future__ import annotations

from typing import Any

from flwr.app import RecordDict

from clients.algorithms.base import ClientAlgorithm
from fedimb import protocol


def normalising_factor(steps: int, momentum: float) -> float:
    """a_i for ``steps`` SGD steps with heavy-ball ``momentum``."""
    if momentum == 0.0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1.0 - rho**steps) / (1.0 - rho)) / (1.0 - rho)


class FedNovaClient(ClientAlgorithm):
    """Plain local SGD plus the ``fednova-a`` metric."""

    name = "fednova"

    def finish(self, steps: int, reply: RecordDict, metrics: dict[str, Any]) -> None:
        """Report a_i."""
        metrics[protocol.FEDNOVA_FACTOR] = normalising_factor(steps, self.rnd.momentum)
