"""The one local-training loop every client algorithm shares: tensors in memory, no DataLoader."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from clients.algorithms.base import ClientAlgorithm
from clients.losses.base import LossContext, LossFn
from fedimb.config import TrainConfig
from fedimb.models import FeatureClassifier


@dataclass
class TrainResult:
    """What a local training run reports."""

    num_examples: int
    steps: int
    mean_loss: float


class MomentumSGD:
    """SGD with momentum and weight decay, step for step what ``torch.optim.SGD`` computes
    (dampening 0, no Nesterov): d = g + wd·w; b = d on the first step, else μ·b + d; w ← w − lr·b.

    Written out because building a ``torch.optim`` optimiser imports ``torch._dynamo`` (about a
    second of CPU), and a deployed SuperNode starts a fresh ClientApp process for every message.
    """

    def __init__(self, params: list[nn.Parameter], lr: float, momentum: float, weight_decay: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        """Drop the gradients (set to None, as ``torch.optim``'s default)."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            d = p.grad if self.weight_decay == 0 else p.grad.add(p, alpha=self.weight_decay)
            if self.momentum != 0:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = torch.clone(d).detach()
                else:
                    buf.mul_(self.momentum).add_(d)
                d = buf
            p.add_(d, alpha=-self.lr)


def round_lr(train: TrainConfig, server_round: int, stage_rounds: int) -> float:
    """The learning rate of ``server_round`` (1-based) under ``train.lr_decay_at`` step decay.

    A milestone at fraction f of ``stage_rounds`` rounds decays the rounds after round f·R:
    with R = 100 and f = 0.75, rounds 1–75 use lr and rounds 76–100 use lr × factor.
    """
    passed = sum(server_round > at * stage_rounds for at in train.lr_decay_at)
    return train.lr * train.lr_decay_factor**passed


def train_local(
    model: FeatureClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    loss_fn: LossFn,
    loss_params: Any,
    loss_ctx: LossContext,
    algorithm: ClientAlgorithm,
    seed: int,
    real_count: int | None = None,
    synthetic_weight: float = 1.0,
) -> TrainResult:
    """Run ``cfg.local_epochs`` epochs of mini-batch SGD on (x, y) in place on ``model``.

    Shuffling is drawn from ``seed`` so a client's round is reproducible. Samples from position
    ``real_count`` on are synthetic; each weighs ``synthetic_weight`` real samples in the loss.
    The convolutions run channels-last; the model is handed back in the default layout.
    """
    model.to(memory_format=torch.channels_last)
    model.train()
    optimiser = MomentumSGD(list(model.parameters()), lr=cfg.lr, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    steps, loss_sum = 0, 0.0
    n = int(x.shape[0])
    for _ in range(cfg.local_epochs):
        order = torch.randperm(n, generator=generator).to(x.device)
        for start in range(0, n, cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            if batch.numel() < 2 and n >= 2 and _has_batchnorm(model):
                continue  # BatchNorm cannot normalise a single sample
            features = model.features(x[batch])
            logits = model.head(features)
            loss = _batch_loss(loss_fn, loss_params, loss_ctx, logits, y[batch], batch, real_count, synthetic_weight)
            extra = algorithm.extra_loss(features, logits, y[batch])
            total = loss if extra is None else loss + extra
            optimiser.zero_grad()
            total.backward()
            algorithm.before_step()
            optimiser.step()
            algorithm.after_step(cfg.lr)
            steps += 1
            loss_sum += float(loss.detach())
    # the weights a client exports next are read in the default layout (a failed round exports none)
    model.to(memory_format=torch.contiguous_format)
    return TrainResult(num_examples=n, steps=steps, mean_loss=loss_sum / max(steps, 1))


def _batch_loss(loss_fn: LossFn, loss_params: Any, loss_ctx: LossContext, logits: torch.Tensor,
                targets: torch.Tensor, batch: torch.Tensor, real_count: int | None, weight: float) -> torch.Tensor:
    """The batch loss, with synthetic samples weighted: (n_r·L_r + w·n_s·L_s) / (n_r + w·n_s)."""
    if real_count is None or weight == 1.0:
        return loss_fn(logits, targets, loss_ctx, loss_params)
    synthetic = batch >= real_count
    n_syn = int(synthetic.sum())
    if n_syn == 0 or n_syn == len(batch):
        return loss_fn(logits, targets, loss_ctx, loss_params)
    real = ~synthetic
    n_real = len(batch) - n_syn
    loss_real = loss_fn(logits[real], targets[real], loss_ctx, loss_params)
    loss_syn = loss_fn(logits[synthetic], targets[synthetic], loss_ctx, loss_params)
    return (n_real * loss_real + weight * n_syn * loss_syn) / (n_real + weight * n_syn)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits of ``model`` on ``x`` in eval mode, batched, on x's device."""
    model.eval()
    outs = [model(x[i:i + batch_size]) for i in range(0, int(x.shape[0]), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def to_tensors(x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Numpy arrays to tensors on ``device``."""
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
