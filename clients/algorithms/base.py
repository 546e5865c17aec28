"""The hooks a client-side algorithm may fill in around the shared local-SGD loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import RecordDict

from fedimb import protocol
from fedimb.models import FeatureClassifier


@dataclass
class ClientRound:
    """Everything a client algorithm may read in one round.

    ``content`` is the server's message, ``state`` the node's persistent ``context.state``,
    ``global_weights`` the weights the round started from, (x, y) the local training data, of
    which the samples from position ``real_count`` on are synthetic (None: all real).
    """

    model: FeatureClassifier
    global_weights: dict[str, torch.Tensor]
    content: RecordDict
    state: RecordDict
    lr: float
    momentum: float
    x: torch.Tensor
    y: torch.Tensor
    class_counts: torch.Tensor
    eval_batch_size: int = 1024
    real_count: int | None = None

    def config_value(self, key: str, default: Any) -> Any:
        """A value of the server's train ConfigRecord."""
        config = self.content.get(protocol.CONFIG)
        return config[key] if config is not None and key in config else default


class ClientAlgorithm:
    """Plain local SGD (FedAvg's client). Subclasses override only the hooks they need."""

    name = protocol.DEFAULT_CLIENT_ALGORITHM

    def __init__(self, rnd: ClientRound) -> None:
        self.rnd = rnd

    def extra_loss(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """A term added to the batch loss (FedProx's proximal term, prototype losses)."""
        return None

    def after_step(self, lr: float) -> None:
        """Change weights after the optimiser step of learning rate ``lr`` (SCAFFOLD's correction)."""

    def finish(self, steps: int, reply: RecordDict, metrics: dict[str, Any]) -> None:
        """Add records or metrics to the reply after local training."""
