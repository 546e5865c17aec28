"""SCAFFOLD client (Karimireddy et al., ICML 2020), option II of the paper.

After each optimiser step the weights move by −lr·(c − c_i), outside the momentum buffer, as
NIID-Bench's and Flower Baselines' SCAFFOLD do: added to the gradient before a momentum-0.9 step,
the correction would act about 1/(1 − 0.9) = 10 times over. After τ steps,
c_i⁺ = c_i − c + (x − y)/(τ·lr); the client keeps c_i⁺ in its node state and sends
Δc_i = c_i⁺ − c_i under the ``control-delta`` record.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, RecordDict

from clients.algorithms.base import ClientAlgorithm, ClientRound
from fedimb import protocol

STATE_KEY = "scaffold-control"


class ScaffoldClient(ClientAlgorithm):
    """Gradient correction with server and client control variates."""

    name = "scaffold"

    def __init__(self, rnd: ClientRound) -> None:
        super().__init__(rnd)
        params = dict(rnd.model.named_parameters())
        device = next(rnd.model.parameters()).device
        server = rnd.content.get(protocol.CONTROL)
        own = rnd.state.get(STATE_KEY)
        self.server_control = {k: self._tensor(server, k, p).to(device) for k, p in params.items()}
        self.client_control = {k: self._tensor(own, k, p).to(device) for k, p in params.items()}
        self.correction = {k: self.server_control[k] - self.client_control[k] for k in params}

    @staticmethod
    def _tensor(record: ArrayRecord | None, key: str, like: torch.Tensor) -> torch.Tensor:
        if record is None or key not in record:
            return torch.zeros_like(like, device="cpu")
        return torch.from_numpy(record[key].numpy().copy())

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        """w ← w − lr·(c − c_i)."""
        for name, param in self.rnd.model.named_parameters():
            param.sub_(self.correction[name], alpha=lr)

    def finish(self, steps: int, reply: RecordDict, metrics: dict[str, Any]) -> None:
        """Update c_i, store it, send Δc_i."""
        scale = 1.0 / (max(steps, 1) * self.rnd.lr)
        new_control: dict[str, torch.Tensor] = {}
        delta: dict[str, torch.Tensor] = {}
        for name, param in self.rnd.model.named_parameters():
            drift = (self.rnd.global_weights[name].to(param.device) - param.detach()) * scale
            new_control[name] = self.client_control[name] - self.server_control[name] + drift
            delta[name] = (new_control[name] - self.client_control[name]).cpu()
        self.rnd.state[STATE_KEY] = ArrayRecord({k: v.cpu() for k, v in new_control.items()})
        reply[protocol.CONTROL_DELTA] = ArrayRecord(delta)
