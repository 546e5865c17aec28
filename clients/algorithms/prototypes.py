"""Prototype client for ``cafedcl`` (CAFedCL-style) and ``fedavg_proto``.

Loss: L = CE + λ_p·L_proto + λ_g·L_geo, where
- L_proto = −log softmax_y(z·P/τ) over the classes that have a global prototype (InfoNCE);
- L_geo = mean over class pairs of (S(p) − S(P))², S the cosine-similarity matrix of class
  prototypes, p the batch's own class prototypes (so the term is differentiable), P the global.
After training the client sends per-class statistics under ``proto-stats``: prototype p_c
(mean of L2-normalised features), dispersion σ²_c = mean ||z − p_c||², mean normalised entropy
u_c = H(softmax)/log C, all over its real and synthetic samples; the real count n_c and the
synthetic count s_c apart; and the quality q_c = (n_c + r_c·s_c) / (n_c + s_c), where r_c is the
mean probability the round's global model gives class c on the class-c synthetic samples (the
local model has just been fitted to them): a prototype made of synthetic samples the federation
does not recognise weighs less than one of real samples. Its mean confidence 1 − u is a metric.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, RecordDict

from clients.algorithms.base import ClientAlgorithm, ClientRound
from fedimb import protocol


def class_statistics(features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                     num_classes: int) -> dict[str, torch.Tensor]:
    """Per-class prototype, count, dispersion and mean normalised entropy (zeros for absent classes)."""
    z = F.normalize(features, dim=1)
    probs = logits.softmax(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1) / math.log(num_classes)
    counts = torch.bincount(labels, minlength=num_classes).to(z.dtype)
    one_hot = F.one_hot(labels, num_classes).to(z.dtype)  # N×C
    safe = counts.clamp(min=1.0)
    protos = (one_hot.T @ z) / safe[:, None]
    dispersion = (one_hot * ((z[:, None, :] - protos[None]) ** 2).sum(2)).sum(0) / safe
    uncertainty = (one_hot * entropy[:, None]).sum(0) / safe
    return {protocol.STAT_PROTOTYPES: protos, protocol.STAT_COUNTS: counts, protocol.STAT_DISPERSION: dispersion,
            protocol.STAT_UNCERTAINTY: uncertainty, protocol.CONFIDENCE: 1.0 - entropy.mean()}


def global_prototypes(content: RecordDict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(C×D prototypes, C booleans: which classes have one) from the server's message, or None."""
    record = content.get(protocol.PROTOTYPES)
    if record is None:
        return None
    protos = torch.from_numpy(record[protocol.PROTOTYPE_MATRIX].numpy().copy()).to(device)
    has = torch.from_numpy(record[protocol.PROTOTYPE_PRESENT].numpy().copy()).to(device).bool()
    return protos, has


def prototype_infonce(features: torch.Tensor, targets: torch.Tensor, prototypes: torch.Tensor,
                      has: torch.Tensor, tau: float) -> torch.Tensor | None:
    """−log softmax over available global prototypes at the sample's own class."""
    available = has.nonzero().flatten()
    keep = has[targets]
    if available.numel() < 2 or not keep.any():
        return None
    index_of = torch.full((len(has),), -1, dtype=torch.long, device=targets.device)
    index_of[available] = torch.arange(available.numel(), device=targets.device)
    z = F.normalize(features[keep], dim=1)
    sims = z @ prototypes[available].T / tau
    return F.cross_entropy(sims, index_of[targets[keep]])


def geometric_consistency(features: torch.Tensor, targets: torch.Tensor, prototypes: torch.Tensor,
                          has: torch.Tensor) -> torch.Tensor | None:
    """Mean squared difference between the batch's and the global class-similarity matrices."""
    classes = torch.unique(targets)
    classes = classes[has[classes]]
    if classes.numel() < 2:
        return None
    z = F.normalize(features, dim=1)
    local = torch.stack([F.normalize(z[targets == c].mean(0), dim=0) for c in classes])
    glob = F.normalize(prototypes[classes], dim=1)
    return ((local @ local.T - glob @ glob.T) ** 2).mean()


def synthetic_quality(real_counts: torch.Tensor, synthetic_counts: torch.Tensor,
                      recognition: torch.Tensor) -> torch.Tensor:
    """q_c = (n_c + r_c·s_c) / (n_c + s_c); 1 for a class with no samples."""
    total = real_counts + synthetic_counts
    quality = (real_counts + recognition * synthetic_counts) / total.clamp(min=1.0)
    return torch.where(total > 0, quality, torch.ones_like(quality))


@torch.no_grad()
def recognition(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                batch_size: int) -> torch.Tensor:
    """r_c: the mean probability ``model`` gives class c on the (non-empty) samples labelled c (0 where none)."""
    model.eval()
    probs = torch.cat([model(x[i:i + batch_size]).softmax(1) for i in range(0, len(x), batch_size)])
    own = probs.gather(1, y[:, None]).squeeze(1)
    sums = torch.zeros(num_classes, device=x.device).index_add_(0, y, own)
    counts = torch.bincount(y, minlength=num_classes).to(sums.dtype)
    return sums / counts.clamp(min=1.0)


class PrototypeClient(ClientAlgorithm):
    """Prototype-regularised local training; reports per-class statistics."""

    name = "prototypes"

    def __init__(self, rnd: ClientRound) -> None:
        super().__init__(rnd)
        self.prototypes, self.has = global_prototypes(rnd.content, rnd.x.device) or (None, None)
        self.lambda_proto = float(rnd.config_value(protocol.PROTO_LAMBDA, protocol.PROTOTYPE_LOSS.lambda_proto))
        self.lambda_geo = float(rnd.config_value(protocol.GEO_LAMBDA, protocol.PROTOTYPE_LOSS.lambda_geo))
        self.tau = float(rnd.config_value(protocol.PROTO_TAU, protocol.PROTOTYPE_LOSS.tau))

    def extra_loss(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """λ_p·InfoNCE + λ_g·geometric consistency, once global prototypes exist."""
        if self.prototypes is None:
            return None
        total = None
        if self.lambda_proto:
            term = prototype_infonce(features, targets, self.prototypes, self.has, self.tau)
            total = None if term is None else self.lambda_proto * term
        if self.lambda_geo:
            geo = geometric_consistency(features, targets, self.prototypes, self.has)
            if geo is not None:
                total = self.lambda_geo * geo if total is None else total + self.lambda_geo * geo
        return total

    def _global_model(self) -> torch.nn.Module:
        """A copy of the model with the weights the round started from."""
        model = copy.deepcopy(self.rnd.model)
        model.load_state_dict(self.rnd.global_weights, strict=False)
        return model

    @torch.no_grad()
    def finish(self, steps: int, reply: RecordDict, metrics: dict[str, Any]) -> None:
        """Per-class statistics of the trained model on the local data."""
        model, x = self.rnd.model, self.rnd.x
        model.eval()
        feats, logits = [], []
        for i in range(0, len(x), self.rnd.eval_batch_size):
            f = model.features(x[i:i + self.rnd.eval_batch_size])
            feats.append(f)
            logits.append(model.head(f))
        num_classes = model.head.out_features
        stats = class_statistics(torch.cat(feats), torch.cat(logits), self.rnd.y, num_classes)
        real = len(self.rnd.y) if self.rnd.real_count is None else self.rnd.real_count
        real_counts = torch.bincount(self.rnd.y[:real], minlength=num_classes).to(stats[protocol.STAT_COUNTS].dtype)
        synthetic_counts = stats[protocol.STAT_COUNTS] - real_counts
        recognised = torch.ones(num_classes, device=real_counts.device)
        if real < len(self.rnd.y):
            recognised = recognition(self._global_model(), x[real:], self.rnd.y[real:], num_classes,
                                     self.rnd.eval_batch_size)
        stats[protocol.STAT_COUNTS] = real_counts
        stats[protocol.STAT_SYNTHETIC] = synthetic_counts
        stats[protocol.STAT_QUALITY] = synthetic_quality(real_counts, synthetic_counts, recognised)
        metrics[protocol.CONFIDENCE] = float(stats.pop(protocol.CONFIDENCE))
        reply[protocol.PROTOTYPE_STATS] = ArrayRecord({k: v.float().cpu() for k, v in stats.items()})
