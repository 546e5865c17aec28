"""FedProto client (Tan et al., AAAI 2022): a model of its own, only prototypes cross the wire.

Each client keeps its model in its node state from round to round (models may differ between
clients: client i builds ``client-models[i mod len]``); it trains on

    L = CE(f(x), y) + λ · mean_{b, d} (e_b − C_{y_b})²,

e the penultimate features and C the global prototype of the sample's class (the term is 0 for a
class without one; the mean runs over the batch and the feature dimensions, as the authors'
``MSELoss``), then sends its per-class mean features and counts. It predicts the class whose
global prototype is nearest to e (squared L2); before the first global prototypes, its head.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, RecordDict

from clients.algorithms.base import ClientAlgorithm, ClientRound
from clients.algorithms.prototypes import global_prototypes
from fedimb import protocol
from fedimb.config import ExperimentConfig
from fedimb.models import FeatureClassifier, build_model, get_weights

STATE_KEY = "fedproto-model"
UNREACHABLE = -1e9  # the score of a class nobody has a prototype of


def prototype_distance_loss(features: torch.Tensor, targets: torch.Tensor, protos: torch.Tensor,
                            has: torch.Tensor) -> torch.Tensor:
    """mean over batch and dimensions of (e_b − C_{y_b})², 0 for samples whose class has no C."""
    target = torch.where(has[targets][:, None], protos[targets], features.detach())
    return ((features - target) ** 2).mean()


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean of the (unnormalised) features and the counts; zeros for absent classes."""
    counts = torch.bincount(labels, minlength=num_classes).to(features.dtype)
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    return sums / counts.clamp(min=1.0)[:, None], counts


def nearest_prototype_scores(features: torch.Tensor, protos: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """−‖e − C_j‖² per class (UNREACHABLE for classes without a prototype): argmax = nearest prototype."""
    scores = -torch.cdist(features, protos) ** 2
    return torch.where(has[None, :], scores, torch.full_like(scores, UNREACHABLE))


class FedProtoClient(ClientAlgorithm):
    """Local training with the prototype distance term; replies prototypes, never weights."""

    name = "fedproto"
    owns_model = True

    def __init__(self, rnd: ClientRound) -> None:
        super().__init__(rnd)
        self.prototypes = global_prototypes(rnd.content, rnd.x.device)
        self.lambda_proto = float(rnd.config_value(protocol.PROTO_LAMBDA, 1.0))

    def extra_loss(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """λ · the prototype distance, once global prototypes exist."""
        if self.prototypes is None or not self.lambda_proto:
            return None
        return self.lambda_proto * prototype_distance_loss(features, targets, *self.prototypes)

    @torch.no_grad()
    def finish(self, steps: int, reply: RecordDict, metrics: dict[str, Any]) -> None:
        """Keep the model in the node state; reply the per-class mean features and counts."""
        model, x = self.rnd.model, self.rnd.x
        self.rnd.state[STATE_KEY] = ArrayRecord(get_weights(model))
        model.eval()
        features = torch.cat([model.features(x[i:i + self.rnd.eval_batch_size])
                              for i in range(0, len(x), self.rnd.eval_batch_size)])
        protos, counts = class_means(features, self.rnd.y, model.head.out_features)
        reply[protocol.PROTOTYPE_STATS] = ArrayRecord({protocol.STAT_PROTOTYPES: protos.float().cpu(),
                                                       protocol.STAT_COUNTS: counts.float().cpu()})

    def reply_arrays(self) -> ArrayRecord:
        """No weights: the server never holds a model."""
        return ArrayRecord()

    @classmethod
    def own_model(cls, cfg: ExperimentConfig, content: RecordDict, state: RecordDict, input_shape: tuple[int, int, int],
                  num_classes: int, partition_id: int) -> FeatureClassifier:
        """Client i's ``client-models[i mod len]`` (``model.name`` without a list), as its last round left it."""
        config = content.get(protocol.CONFIG)
        names = list(config[protocol.CLIENT_MODELS]) if config is not None and protocol.CLIENT_MODELS in config else []
        name = names[partition_id % len(names)] if names else cfg.model.name
        model = build_model(name, input_shape, num_classes, cfg.seed)
        if STATE_KEY in state:
            model.load_state_dict(state[STATE_KEY].to_torch_state_dict(), strict=False)
        return model

    @classmethod
    @torch.no_grad()
    def evaluation_logits(cls, model: FeatureClassifier, x: torch.Tensor, content: RecordDict,
                          batch_size: int) -> torch.Tensor:
        """Scores of the nearest global prototype; the model's head before any prototype exists."""
        prototypes = global_prototypes(content, x.device)
        if prototypes is None:
            return super().evaluation_logits(model, x, content, batch_size)
        model.eval()
        return torch.cat([nearest_prototype_scores(model.features(x[i:i + batch_size]), *prototypes)
                          for i in range(0, len(x), batch_size)]) if len(x) else torch.empty(0, len(prototypes[1]))
