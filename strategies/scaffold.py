"""SCAFFOLD (Karimireddy et al., ICML 2020), as in NIID-Bench.

Server keeps a control variate c. Each round it sends c with the weights (record
``control``); clients move their weights by −lr·(c − c_i) after every optimiser step and
reply their weights plus Δc_i (record ``control-delta``). The server averages weights as FedAvg does and updates
c ← c + (1/N) Σ_{i∈S} Δc_i, N the number of clients in the federation.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedimb import protocol
from strategies.base import NoParams, ReproducibleSampling, StrategyContext, StrategySpec, attach_record, take_records
from strategies.validation import Signature

BN_STATISTICS = ("running_mean", "running_var")


def update_control(control: dict[str, np.ndarray], deltas: list[dict[str, np.ndarray]],
                   num_clients: int) -> dict[str, np.ndarray]:
    """c + (1/N) Σ Δc_i; a missing control starts at zero."""
    keys = deltas[0].keys() if deltas else control.keys()
    out = {}
    for key in keys:
        total = sum(d[key] for d in deltas)
        base = control.get(key, np.zeros_like(total))
        out[key] = (base + total / num_clients).astype(np.float32)
    return out


class ScaffoldStrategy(ReproducibleSampling, FedAvg):
    """FedAvg of weights plus the server control variate."""

    state_attrs = ("control",)
    robust_records = (protocol.CONTROL_DELTA,)  # a coordinate-wise robust rule also makes c's step robust

    def __init__(self, num_clients: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_clients = num_clients
        self.control: dict[str, np.ndarray] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send c next to the weights (clients treat a missing c as zeros)."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.control:
            attach_record(messages, protocol.CONTROL, self.control)
        return messages

    def reply_records(self, weights: Signature | None) -> dict[str, Signature | None]:
        """Δc_i: one array per trainable weight (BatchNorm's running statistics are not trained)."""
        if weights is None:
            return {protocol.CONTROL_DELTA: None}
        return {protocol.CONTROL_DELTA: {k: v for k, v in weights.items() if not k.endswith(BN_STATISTICS)}}

    def aggregate_screened(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Take Δc_i out of each reply, update c, then let FedAvg average the weights."""
        deltas = take_records(replies, protocol.CONTROL_DELTA)
        if deltas:
            self.control = update_control(self.control, deltas, self.num_clients)
        return super().aggregate_screened(server_round, replies)


def build(ctx: StrategyContext, params: NoParams) -> ScaffoldStrategy:
    """SCAFFOLD from the run's context."""
    return ScaffoldStrategy(num_clients=ctx.num_clients, **ctx.flower_kwargs())


SPEC = StrategySpec("scaffold", build, NoParams, "scaffold", "control variates", keeps_client_state=True)
