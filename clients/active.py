"""Client side of federated active learning: the labelled pool and one query step.

The pool lives in ``context.state`` as positions into the client's own data, so it persists
across rounds and stages. Labels of unlabelled samples are the hidden oracle: a sampler
never reads them; they are revealed only for the samples it picked.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from clients.algorithms.base import ClientAlgorithm, ClientRound
from clients.losses import LossContext, build_loss
from clients.samplers import build_sampler
from clients.samplers.base import QueryContext
from clients.trainer import predict_logits, train_local
from fedimb import protocol
from fedimb.config import ExperimentConfig, TrainConfig
from fedimb.models import FeatureClassifier, build_configured_model, build_model, get_weights

POOL_KEY = "fal-pool"
LAST_LOCAL_MODEL_KEY = "fal-last-local-model"  # the client's weights after its last local training


def keeps_last_local_model(cfg: ExperimentConfig) -> bool:
    """Whether the configured sampler queries with the client's last-round model (KAFAL)."""
    if not cfg.active_learning.enabled:
        return False
    spec, _ = build_sampler(cfg.active_learning.sampler, cfg.active_learning.sampler_params)
    return spec.needs_local_model and spec.local_model == "last_round"


def store_last_local_model(state: RecordDict, model: FeatureClassifier) -> None:
    """Keep the weights local training just left, for the next query step."""
    state[LAST_LOCAL_MODEL_KEY] = ArrayRecord(get_weights(model))


def last_local_model(state: RecordDict, cfg: ExperimentConfig, input_shape: tuple[int, int, int], num_classes: int,
                     device: torch.device) -> FeatureClassifier | None:
    """The client's model after its last local training, or None before it first trained."""
    if LAST_LOCAL_MODEL_KEY not in state:
        return None
    model = build_configured_model(cfg, input_shape, num_classes, cfg.seed)
    model.load_state_dict(state[LAST_LOCAL_MODEL_KEY].to_torch_state_dict(), strict=False)
    return model.to(device)


def labelled_positions(state: RecordDict, num_samples: int, cfg: ExperimentConfig, partition_id: int) -> np.ndarray:
    """The labelled pool (positions into the client's data); drawn at random the first time."""
    if POOL_KEY in state:
        return np.asarray(state[POOL_KEY]["labelled"], dtype=np.int64)
    rng = np.random.default_rng([cfg.seed, partition_id, 13])
    size = min(num_samples, max(1, int(round(cfg.active_learning.initial_fraction * num_samples))))
    positions = np.sort(rng.choice(num_samples, size=size, replace=False))
    store_positions(state, positions)
    return positions


def store_positions(state: RecordDict, positions: np.ndarray) -> None:
    """Persist the labelled pool in the node state."""
    state[POOL_KEY] = ConfigRecord({"labelled": [int(p) for p in np.sort(positions)]})


@torch.no_grad()
def outputs(model: FeatureClassifier, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax, penultimate features) of ``model`` on ``x``, on the CPU."""
    model.eval()
    probs, feats = [], []
    for i in range(0, len(x), batch_size):
        f = model.features(x[i:i + batch_size])
        feats.append(f.cpu())
        probs.append(model.head(f).softmax(1).cpu())
    return torch.cat(probs), torch.cat(feats)


def train_local_only(cfg: ExperimentConfig, x: torch.Tensor, y: torch.Tensor, input_shape: tuple[int, int, int],
                     num_classes: int, seed: int) -> FeatureClassifier:
    """A model trained from random init on the labelled set alone, stopping early at high train accuracy."""
    model = build_model(cfg.model.name, input_shape, num_classes, seed).to(x.device)
    loss_fn, loss_params = build_loss("ce", {})
    counts = torch.bincount(y, minlength=num_classes).float()
    one_epoch = TrainConfig(local_epochs=1, lr=0.01, batch_size=64, momentum=0.9, weight_decay=1e-5)  # FairFAL's
    empty = RecordDict()
    algorithm = ClientAlgorithm(ClientRound(model, {}, empty, empty, 0.01, 0.9, x, y, counts))
    for epoch in range(cfg.active_learning.local_epochs):
        train_local(model, x, y, one_epoch, loss_fn, loss_params, LossContext(counts), algorithm, seed + epoch)
        accuracy = float((predict_logits(model, x, cfg.eval.batch_size).argmax(1) == y).float().mean())
        if accuracy >= cfg.active_learning.local_stop_accuracy:
            break
    return model


def query_step(cfg: ExperimentConfig, global_model: FeatureClassifier, x: torch.Tensor, y: torch.Tensor,
               labelled: np.ndarray, budget: int, gamma_bar: float | None, seed: int,
               input_shape: tuple[int, int, int], num_classes: int,
               last_local: FeatureClassifier | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Run the configured sampler once; return the grown pool and what to report.

    ``last_local``: the client's model after its last local training, for a ``last_round`` sampler;
    a client that has not trained yet falls back to a model trained on its labelled set (reported
    under ``LOCAL_MODEL_FROM_SCRATCH``).
    """
    spec, params = build_sampler(cfg.active_learning.sampler, cfg.active_learning.sampler_params)
    unlabelled = np.setdiff1d(np.arange(len(x)), labelled)
    if len(unlabelled) == 0:
        return labelled, {"queried": 0, protocol.LABEL_HISTOGRAM: [0] * num_classes}
    lab_t, unl_t = torch.from_numpy(labelled).to(x.device), torch.from_numpy(unlabelled).to(x.device)
    bs = cfg.eval.batch_size
    gp_u, gf_u = outputs(global_model, x[unl_t], bs)
    gp_l, gf_l = outputs(global_model, x[lab_t], bs)
    ctx = QueryContext(num_classes=num_classes, global_probs_u=gp_u, global_feats_u=gf_u, global_probs_l=gp_l,
                       global_feats_l=gf_l, labels_l=y[lab_t].cpu(), gamma_bar=gamma_bar, seed=seed)
    from_scratch = 0
    if spec.needs_local_model:
        local = last_local if spec.local_model == "last_round" else None
        if local is None:
            local, from_scratch = train_local_only(cfg, x[lab_t], y[lab_t], input_shape, num_classes, seed), 1
        ctx.local_probs_u, ctx.local_feats_u = outputs(local, x[unl_t], bs)
        ctx.local_probs_l, ctx.local_feats_l = outputs(local, x[lab_t], bs)
    result = spec.fn(ctx, min(budget, len(unlabelled)), params)
    picked = unlabelled[np.asarray(result.indices, dtype=np.int64)]
    revealed = y[torch.from_numpy(picked).to(x.device)].cpu().numpy()  # the oracle answers
    histogram = np.bincount(revealed, minlength=num_classes)
    report = {"queried": int(len(picked)), protocol.LABEL_HISTOGRAM: [int(h) for h in histogram],
              protocol.LOCAL_MODEL_FROM_SCRATCH: from_scratch, **result.report}
    return np.union1d(labelled, picked), report
