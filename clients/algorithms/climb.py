"""CLIMB client (Shen et al., ICLR 2022): reports the global model's loss on its own data."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import RecordDict

from clients.algorithms.base import ClientAlgorithm, ClientRound
from fedimb import protocol


class ClimbClient(ClientAlgorithm):
    """Measures ℓ_k = loss of the round's starting (global) model before local training."""

    name = "climb"

    def __init__(self, rnd: ClientRound) -> None:
        super().__init__(rnd)
        self.start_loss = self._loss()

    @torch.no_grad()
    def _loss(self) -> float:
        model, x, y, bs = self.rnd.model, self.rnd.x, self.rnd.y, self.rnd.eval_batch_size
        model.eval()
        total = sum(float(F.cross_entropy(model(x[i:i + bs]), y[i:i + bs], reduction="sum"))
                    for i in range(0, len(x), bs))
        return total / max(len(x), 1)

    def finish(self, steps: int, reply: RecordDict, metrics: dict[str, Any]) -> None:
        """Report ℓ_k."""
        metrics[protocol.CLIMB_LOSS] = self.start_loss
