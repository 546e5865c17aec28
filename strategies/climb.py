"""CLIMB (Shen et al., ICLR 2022): class-imbalanced FL as a constrained problem, dual re-weighting.

Each client k has a dual variable λ_k ≥ 0. The objective is the mean of the clients' losses, so
aggregation weights are 1 + λ_k − mean λ (mean over every client of the federation; clipped at 0,
renormalised over the round's replies), with no sample-size factor, as in the paper's code
(shenzebang/Federated-Learning-Pytorch, ``core/imbalance_fl.py``). After the round, with ℓ_k the
loss of the round's starting model on client k's data:
    λ_k ← clip(λ_k + η·(ℓ_k − mean ℓ − ε)/K, 0, λ_max)
so clients the global model serves badly gain weight; λ_max = 5 as that code clamps it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fedimb import protocol
from strategies.base import ReproducibleSampling, StrategyContext, StrategySpec, reweight_replies


@dataclass
class ClimbParams:
    """eta: dual step size η; epsilon: tolerance ε; lambda_max: upper bound of λ."""

    eta: float = 2.0
    epsilon: float = 0.01
    lambda_max: float = 5.0


def climb_weights(lambdas: np.ndarray, mean_lambda: float) -> np.ndarray:
    """1 + λ_k − mean λ for the round's participants (``lambdas``), clipped at 0 and normalised;
    ``mean_lambda`` is over every client of the federation."""
    raw = np.clip(1.0 + lambdas - mean_lambda, 0.0, None)
    return raw / raw.sum()


def dual_update(lambdas: np.ndarray, losses: np.ndarray, params: ClimbParams, num_clients: int) -> np.ndarray:
    """λ_k ← clip(λ_k + η(ℓ_k − mean ℓ − ε)/K, 0, λ_max)."""
    step = params.eta * (losses - losses.mean() - params.epsilon) / num_clients
    return np.clip(lambdas + step, 0.0, params.lambda_max)


class ClimbStrategy(ReproducibleSampling, FedAvg):
    """FedAvg with CLIMB's dual weights."""

    state_attrs = ("lambdas",)

    def __init__(self, params: ClimbParams, num_clients: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.params = params
        self.num_clients = num_clients
        self.lambdas = np.zeros(num_clients)

    def aggregate_screened(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Re-weight by (1 + λ − mean λ), then update λ of the participants."""
        if not replies:
            return None, None
        order = self._order()
        pids = np.array([order[m.metadata.src_node_id] for m in replies])
        key = self.weighted_by_key
        n = np.array([float(m.content["metrics"][key]) for m in replies])
        losses = np.array([float(m.content[protocol.METRICS][protocol.CLIMB_LOSS]) for m in replies])
        lam = self.lambdas[pids]
        reweight_replies(replies, list(climb_weights(lam, float(self.lambdas.mean())) * n.sum()), key)
        self.lambdas[pids] = dual_update(lam, losses, self.params, self.num_clients)
        return super().aggregate_screened(server_round, replies)


def build(ctx: StrategyContext, params: ClimbParams) -> ClimbStrategy:
    """CLIMB from the run's context."""
    return ClimbStrategy(params, ctx.num_clients, **ctx.flower_kwargs())


SPEC = StrategySpec("climb", build, ClimbParams, "climb", "dual re-weighting of clients")
