"""The hooks a client-side algorithm may fill in around the shared local-SGD loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, RecordDict

from fedimb import protocol
from fedimb.config import ExperimentConfig
from fedimb.models import FeatureClassifier, get_weights


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
        """A term added to the batch loss (prototype losses)."""
        return None

    def before_step(self) -> None:
        """Change gradients after the backward pass, before the optimiser step (FedProx's proximal gradient)."""

    def after_step(self, lr: float) -> None:
        """Change weights after the optimiser step of learning rate ``lr`` (SCAFFOLD's correction)."""

    def finish(self, steps: int, reply: RecordDict, metrics: dict[str, Any]) -> None:
        """Add records or metrics to the reply after local training."""

    def reply_arrays(self) -> ArrayRecord:
        """The weights the reply carries: the trained model's."""
        return ArrayRecord(get_weights(self.rnd.model))

    # ---- for algorithms whose clients keep a model of their own (no global model) ----
    owns_model: ClassVar[bool] = False

    @classmethod
    def own_model(cls, cfg: ExperimentConfig, content: RecordDict, state: RecordDict, input_shape: tuple[int, int, int],
                  num_classes: int, partition_id: int) -> FeatureClassifier:
        """This client's own model as its last round left it (``owns_model`` algorithms only)."""
        raise NotImplementedError(f"{cls.name} trains the global model the server sends")

    @classmethod
    def evaluation_logits(cls, model: FeatureClassifier, x: torch.Tensor, content: RecordDict,
                          batch_size: int) -> torch.Tensor:
        """The scores the client's evaluation takes the argmax of: the model's logits."""
        from clients.trainer import predict_logits  # the trainer imports this module

        return predict_logits(model, x, batch_size)
