"""The hooks a client-side algorithm may fill in around the shared local-SGD loop."""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import RecordDict
from torch import nn


class ClientAlgorithm:
    """Plain local SGD (FedAvg's client). Subclasses override only the hooks they need.

    ``content`` is the server's message, ``state`` the node's persistent ``context.state``;
    ``global_weights`` are the weights the round started from.
    """

    name = "fedavg"

    def __init__(self, model: nn.Module, global_weights: dict[str, torch.Tensor],
                 content: RecordDict, state: RecordDict, lr: float, momentum: float) -> None:
        self.model = model
        self.global_weights = global_weights
        self.content = content
        self.state = state
        self.lr = lr
        self.momentum = momentum

    def extra_loss(self) -> torch.Tensor | None:
        """A term added to the batch loss (FedProx's proximal term)."""
        return None

    def after_backward(self) -> None:
        """Change gradients before the optimiser step (SCAFFOLD's correction)."""

    def finish(self, steps: int, reply: RecordDict, metrics: dict[str, Any]) -> None:
        """Add records or metrics to the reply after local training."""

    def config_value(self, key: str, default: Any) -> Any:
        """A value of the server's train ConfigRecord."""
        config = self.content.get("config")
        return config[key] if config is not None and key in config else default
